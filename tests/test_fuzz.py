"""Fuzzing the share server: ten thousand malformed, random and valid requests to one in-process gRPC server.

Every request must get the status its defect calls for (a refused request is never computed), undecodable
bodies must get an error rather than a crash, the server must keep answering valid requests afterwards, and its
memory must stay bounded. Requests go through a raw `channel.unary_unary` with identity serializers, so the
fuzzer controls every byte on the wire.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from hss_ee_hf.ring.csprng import SEED_BYTES
from hss_ee_hf.ring.sharing import share
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.server.grpc_server import SERVICE_NAME, message_limit, start_server
from hss_ee_hf.server.security import HSSEEServerSecurity
from hss_ee_hf.transport.base import PROTOCOL_VERSION
from hss_ee_hf.transport.config import HSSEEClientConfig
from hss_ee_hf.transport.grpc_client import GrpcTransport
from hss_ee_hf.transport.protos import hss_ee_pb2

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FINGERPRINT = "ab" * 32
TOKEN = "fuzz-token-0123456789"
MAX_ROWS = 16
N_REQUESTS = 10_000
BATCH = 64
RSS_GROWTH_LIMIT_MB = 64

C = grpc.StatusCode
OK, INVALID, PRECONDITION, EXHAUSTED, UNAUTH = (
    C.OK,
    C.INVALID_ARGUMENT,
    C.FAILED_PRECONDITION,
    C.RESOURCE_EXHAUSTED,
    C.UNAUTHENTICATED,
)
ANY_REFUSAL = frozenset({INVALID, PRECONDITION, EXHAUSTED})
STAGE_METHOD = f"/{SERVICE_NAME}/Stage"
DESCRIBE_METHOD = f"/{SERVICE_NAME}/Describe"


def rss_mb() -> float:
    """This process's resident memory in MiB, from /proc (psutil may be absent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes | int) -> bytes:
    """One protobuf field: varint (0) or length-delimited (2), or a raw 64/32-bit word (1/5)."""
    tag = _varint(number << 3 | wire_type)
    if wire_type == 0:
        return tag + _varint(payload)
    if wire_type == 2:
        return tag + _varint(len(payload)) + payload
    return tag + bytes(payload)


@dataclass
class Case:
    category: str
    body: bytes
    expected: frozenset
    method: str = STAGE_METHOD
    metadata: tuple = (("authorization", f"Bearer {TOKEN}"),)
    reply_bytes: int | None = None  # expected reply length of a valid request


class Fuzzer:
    """Draws requests: a valid baseline with one defect (or several, or none), and raw garbage."""

    def __init__(self, engine: StageEngine, seed: int):
        self.rng = random.Random(seed)
        self.dims = engine.describe()
        self.stages = list(self.dims)
        self.limit = message_limit(engine)

    def _valid_fields(self) -> dict:
        stage = self.rng.choice(self.stages)
        rows = self.rng.randint(1, MAX_ROWS)
        fields = {"version": PROTOCOL_VERSION, "fingerprint": FINGERPRINT, "stage": stage, "rows": rows}
        if self.rng.random() < 0.5:
            fields["seed"] = self.rng.randbytes(SEED_BYTES)
        else:
            fields["share"] = self.rng.randbytes(rows * self.dims[stage][0] * 8)
        return fields

    def _case(self, category: str, fields: dict, expected: set, **kw) -> Case:
        return Case(category, hss_ee_pb2.StageRequest(**fields).SerializeToString(), frozenset(expected), **kw)

    def _random_string(self) -> str:
        kind = self.rng.randrange(5)
        if kind == 0:
            return "".join(chr(self.rng.randrange(32, 127)) for _ in range(self.rng.randrange(0, 40)))
        if kind == 1:
            return "".join(chr(self.rng.randrange(0x80, 0x2FFF)) for _ in range(self.rng.randrange(1, 20)))
        if kind == 2:
            return "x" * self.rng.randrange(1000, 20_000)
        if kind == 3:
            return self.rng.choice(self.stages) + self.rng.choice([" ", "\x00", ".", "x", "\n"])
        return self.rng.choice(["layers.2.qkv", "layers.-1.qkv", "Layers.0.qkv", "layers.00.qkv", "lm_head.weight"])

    def draw(self) -> Case:  # noqa: C901 - one branch per defect keeps each case readable
        r = self.rng
        fields = self._valid_fields()
        stage, rows = fields["stage"], fields["rows"]
        in_f, out_f = self.dims[stage]
        kind = r.choices(
            [
                "valid",
                "truncated_share",
                "oversized_share",
                "rows_share_mismatch",
                "over_message_limit",
                "wrong_stage",
                "nonpositive_rows",
                "too_many_rows",
                "bad_seed_length",
                "no_input",
                "wrong_fingerprint",
                "wrong_version",
                "bad_token",
                "garbage_bytes",
                "wrong_wire_types",
                "truncated_protobuf",
                "byte_flips",
                "repeated_fields",
                "several_defects",
                "unknown_method",
                "describe",
            ],
            weights=[8, 6, 6, 5, 1, 7, 5, 5, 5, 3, 5, 5, 6, 8, 5, 5, 5, 3, 4, 1, 2],
        )[0]
        if kind == "valid":
            return self._case(kind, fields, {OK}, reply_bytes=rows * out_f * 8)
        if kind in ("truncated_share", "oversized_share", "rows_share_mismatch"):
            fields.pop("seed", None)
            expected = rows * in_f * 8
            if kind == "truncated_share":
                size = r.randrange(0, expected)
            elif kind == "oversized_share":
                size = expected + r.randrange(1, 4 * in_f * 8)
            else:
                other = r.choice([n for n in range(1, MAX_ROWS + 1) if n != rows])
                size = other * in_f * 8
            fields["share"] = r.randbytes(size)
            return self._case(kind, fields, {INVALID})
        if kind == "over_message_limit":
            fields.pop("seed", None)
            fields["share"] = r.randbytes(self.limit + r.randrange(1, 100_000))
            return self._case(kind, fields, {EXHAUSTED})
        if kind == "wrong_stage":
            fields["stage"] = self._random_string()
            return self._case(kind, fields, {INVALID})
        if kind == "nonpositive_rows":
            fields["rows"] = r.choice([0, -1, -(2**63), -r.randrange(1, 2**63)])
            return self._case(kind, fields, {INVALID})
        if kind == "too_many_rows":
            fields["rows"] = r.choice([MAX_ROWS + 1, 2**31, 2**63 - 1, r.randrange(MAX_ROWS + 1, 2**63)])
            return self._case(kind, fields, {EXHAUSTED})
        if kind == "bad_seed_length":
            fields.pop("share", None)
            fields["seed"] = r.randbytes(r.choice([0, 1, SEED_BYTES - 1, SEED_BYTES + 1, r.randrange(33, 4096)]))
            return self._case(kind, fields, {INVALID})
        if kind == "no_input":
            fields.pop("share", None)
            fields.pop("seed", None)
            return self._case(kind, fields, {INVALID})
        if kind == "wrong_fingerprint":
            fields["fingerprint"] = r.choice(
                ["", "cd" * 32, FINGERPRINT.upper(), FINGERPRINT[:-1], self._random_string()]
            )
            return self._case(kind, fields, {PRECONDITION})
        if kind == "wrong_version":
            fields["version"] = r.choice([0, PROTOCOL_VERSION + 1, 2**32 - 1, r.randrange(2, 2**32)])
            return self._case(kind, fields, {PRECONDITION})
        if kind == "bad_token":
            metadata = r.choice(
                [
                    (),
                    (("authorization", "Bearer wrong"),),
                    (("authorization", f"Bearer {TOKEN}x"),),
                    (("authorization", f"bearer {TOKEN}"),),
                    (("authorization", TOKEN),),
                    (("authorization", f"Basic {TOKEN}"),),
                    (("authorization", "Bearer "),),
                    (("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer wrong")),
                    (("x-token", TOKEN),),
                ]
            )
            return self._case(kind, fields, {UNAUTH}, metadata=metadata)
        if kind == "garbage_bytes":
            return Case(kind, r.randbytes(r.choice([0, 1, 2, r.randrange(3, 64), r.randrange(64, 4096)])), ANY_REFUSAL)
        if kind == "wrong_wire_types":
            parts = [
                _field(1, 2, b"\x01"),  # version as bytes
                _field(2, 0, 12345),  # fingerprint as a number
                _field(3, 0, 7),  # stage as a number
                _field(4, 2, b"\x02"),  # rows as bytes
                _field(5, 0, 1),  # share as a number
                _field(6, 1, b"\x00" * 8),  # seed as a fixed64
                _field(r.randrange(7, 10_000), 2, r.randbytes(4)),  # unknown fields
                _field(r.randrange(7, 10_000), 0, r.randrange(2**64)),
            ]
            r.shuffle(parts)
            return Case(kind, b"".join(parts[: r.randrange(1, len(parts) + 1)]), ANY_REFUSAL)
        if kind == "truncated_protobuf":
            body = hss_ee_pb2.StageRequest(**fields).SerializeToString()
            return Case(kind, body[: r.randrange(0, len(body))], ANY_REFUSAL)
        if kind == "byte_flips":  # may hit only share or seed bytes, which leaves a valid request
            body = bytearray(hss_ee_pb2.StageRequest(**fields).SerializeToString())
            for _ in range(r.randrange(1, 4)):
                body[r.randrange(len(body))] ^= 1 << r.randrange(8)
            return Case(kind, bytes(body), ANY_REFUSAL | {OK})
        if kind == "repeated_fields":  # the last occurrence of a scalar wins on the wire
            body = hss_ee_pb2.StageRequest(**fields).SerializeToString()
            return Case(kind, body + _field(4, 0, MAX_ROWS + r.randrange(1, 10_000)), frozenset({EXHAUSTED}))
        if kind == "several_defects":
            expected = set()
            if r.random() < 0.5:
                fields["version"] = PROTOCOL_VERSION + 1
                expected.add(PRECONDITION)
            if r.random() < 0.5:
                fields["fingerprint"] = "00" * 32
                expected.add(PRECONDITION)
            if r.random() < 0.5:
                fields["stage"] = "no.such.stage"
                expected.add(INVALID)
            if r.random() < 0.5:
                fields["rows"] = -rows
                expected.add(INVALID)
            if not expected or r.random() < 0.5:
                fields.pop("seed", None)
                fields["share"] = b"\x00" * 3
                expected.add(INVALID)
            return self._case(kind, fields, expected)
        if kind == "unknown_method":
            return Case(
                kind, b"", frozenset({C.UNIMPLEMENTED}), method=f"/{SERVICE_NAME}/{self._random_string()[:50]}"
            )
        # describe: valid, or with garbage that either parses as unknown fields (OK) or does not (INVALID)
        body = b"" if r.random() < 0.5 else r.randbytes(r.randrange(1, 64))
        return Case(kind, body, frozenset({OK} if not body else {OK, INVALID}), method=DESCRIBE_METHOD)


@pytest.fixture(scope="module")
def fuzz_server(tiny_ee_checkpoint: Path) -> Iterator[tuple[StageEngine, str]]:
    engine = StageEngine(tiny_ee_checkpoint, max_rows=MAX_ROWS)
    server, port = start_server(engine, "127.0.0.1", 0, max_workers=4, security=HSSEEServerSecurity(tokens=[TOKEN]))
    yield engine, f"127.0.0.1:{port}"
    server.stop(grace=None)


def _send(channel: grpc.Channel, cases: list[Case]) -> list[tuple[grpc.StatusCode, bytes | None]]:
    """Sends a batch concurrently; returns each call's status and reply bytes."""
    futures = [
        channel.unary_unary(case.method, request_serializer=None, response_deserializer=None).future(
            case.body, metadata=case.metadata, timeout=30.0
        )
        for case in cases
    ]
    results = []
    for future in futures:
        try:
            results.append((OK, future.result()))
        except grpc.RpcError as err:
            results.append((err.code(), None))
    return results


def test_ten_thousand_fuzzed_requests_get_the_right_status(fuzz_server, caplog: pytest.LogCaptureFixture):
    engine, endpoint = fuzz_server
    fuzzer = Fuzzer(engine, seed=20_250_101)
    statuses: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    raw: Counter[tuple[str, str]] = Counter()  # (category, status) of the hand-made protobuf bytes
    mismatches = []
    rss_start = rss_peak = None
    with grpc.insecure_channel(endpoint) as channel:
        for batch_start in range(0, N_REQUESTS, BATCH):
            cases = [fuzzer.draw() for _ in range(min(BATCH, N_REQUESTS - batch_start))]
            for case, (code, reply) in zip(cases, _send(channel, cases), strict=True):
                statuses[code.name] += 1
                categories[case.category] += 1
                if case.category in ("garbage_bytes", "wrong_wire_types", "truncated_protobuf", "byte_flips"):
                    raw[case.category, code.name] += 1
                wrong_reply = (
                    case.reply_bytes is not None
                    and len(hss_ee_pb2.StageReply.FromString(reply).share) != case.reply_bytes
                )
                if code not in case.expected or wrong_reply:
                    mismatches.append((case.category, code.name, sorted(c.name for c in case.expected)))
            if batch_start >= 500 and rss_start is None:  # after warm-up: thread pools, arenas, caches
                rss_start = rss_mb()
            if rss_start is not None:
                rss_peak = max(rss_peak or 0.0, rss_mb())
    print(f"\nfuzzed requests: {sum(statuses.values())}")
    print(f"statuses: {dict(statuses.most_common())}")
    print(f"categories: {dict(categories.most_common())}")
    print(f"raw protobuf bytes: {dict(sorted(raw.items()))}")
    print(f"RSS after warm-up {rss_start:.0f} MiB, peak {rss_peak:.0f} MiB")
    assert sum(statuses.values()) == N_REQUESTS
    assert not mismatches, f"{len(mismatches)} requests got an unexpected status, e.g. {mismatches[:5]}"
    assert "INTERNAL" not in statuses and "UNKNOWN" not in statuses  # no crash, no unhandled error
    assert rss_peak - rss_start < RSS_GROWTH_LIMIT_MB
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]

    # The server still computes exactly after the storm.
    x = torch.randint(-(2**63), 2**63 - 1, (3, 32), dtype=torch.int64, generator=torch.Generator().manual_seed(9))
    config = HSSEEClientConfig(token=TOKEN, timeout=5.0)
    # The same server under a second spelling: a client refuses one address in both pools (pools.py).
    with GrpcTransport((endpoint, endpoint.replace("127.0.0.1", "localhost")), config=config) as transport:
        y_a, y_b = transport.run_stage(FINGERPRINT, "layers.0.qkv", share(x), out_features=64)
    expected = torch.frombuffer(
        bytearray(engine.compute(FINGERPRINT, "layers.0.qkv", 3, share=x.numpy().tobytes())), dtype=torch.int64
    ).view(3, 64)
    assert torch.equal(y_a + y_b, expected)


def test_undecodable_body_is_invalid_argument_with_a_clear_message(fuzz_server):
    _, endpoint = fuzz_server
    with grpc.insecure_channel(endpoint) as channel:
        call = channel.unary_unary(STAGE_METHOD, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff", metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=5.0)
    assert info.value.code() == INVALID
    assert "not a valid hss_ee.v1.StageRequest" in info.value.details()
