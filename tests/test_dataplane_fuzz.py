"""Fuzzing the data plane: ten thousand malformed, random and valid frames to one in-process server (and two
thousand more through TLS).

Frames that keep the stream delimited (a bad kind, stage, row count, flag, seed or payload length) are sent in
batches on long-lived connections and must each get the ERROR status their defect calls for, with their request id,
while the connection stays open; valid frames in between must get exact replies. Frames that cannot be delimited
(garbage, flipped bytes, oversized or truncated frames, broken HELLOs) go on a connection of their own, which the
server may answer with a refusal and must then close. Nothing may crash the server, leak memory, log an error or
answer `INTERNAL`, and it must still compute exactly afterwards.
"""

from __future__ import annotations

import random
import socket
import ssl
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from hss_ee_hf.ring.sharing import share
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.server.grpc_server import start_server
from hss_ee_hf.server.security import HSSEEServerSecurity
from hss_ee_hf.transport.base import PROTOCOL_VERSION
from hss_ee_hf.transport.config import HSSEEClientConfig
from hss_ee_hf.transport.frames import (
    ERROR,
    HEADER,
    HEADER_BYTES,
    HELLO,
    HELLO_FIXED,
    HELLO_OK,
    MAGIC,
    REPLY,
    STAGE,
    FrameReader,
    hello_frame,
    padded,
    status_name,
)
from hss_ee_hf.transport.grpc_client import GrpcTransport
from hss_ee_hf.transport.socket_client import DataPlaneTransport

sys.path.insert(0, str(Path(__file__).parent))
from test_dataplane import make_pki  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FINGERPRINT = "ab" * 32
TOKEN = "fuzz-token-0123456789"
MAX_ROWS = 16
N_FRAMES = {"plaintext": 10_000, "tls": 2_000}
BATCH = 64
RSS_GROWTH_LIMIT_MB = 64
REFUSALS = frozenset({"INVALID_ARGUMENT", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"})
# What a frame that breaks the stream may get: a reply (flips in the payload), a refusal, or the connection closed.
ANYTHING_BUT_A_CRASH = REFUSALS | {"REPLY", "CLOSED", "UNAUTHENTICATED"}


def rss_mb() -> float:
    """This process's resident memory in MiB, from /proc (psutil may be absent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def stage_frame(
    request_id: int, stage: bytes, rows: int, payload: bytes, flag: int = 0, kind: int = STAGE, name_len=None
) -> bytes:
    """A STAGE-shaped frame with every field under the caller's control."""
    name = stage + bytes(padded(len(stage)) - len(stage))
    name_len = len(stage) if name_len is None else name_len
    body = name + payload
    return HEADER.pack(len(body), kind, flag, name_len, request_id, rows) + body


@dataclass
class Case:
    category: str
    data: bytes
    expected: frozenset[str]  # "REPLY", status names, "CLOSED"
    request_id: int = 0
    reply: bytes | None = None  # the exact reply a valid frame must get
    fresh: bool = False  # sent on a connection of its own (the stream cannot be trusted after it)
    hello: bytes | None = None  # a fresh connection's first bytes instead of a valid HELLO
    conn: str = "good"  # in-sync frames: which long-lived connection ("good", "wrong_fingerprint", "old_version")


class Fuzzer:
    def __init__(self, engine: StageEngine, seed: int):
        self.engine, self.r = engine, random.Random(seed)
        self.stages = engine.describe()
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _valid(self) -> tuple[bytes, int, bytes, bytes]:
        """A valid share request: `(stage, rows, payload, reply)`."""
        name = self.r.choice(list(self.stages))
        rows = self.r.randrange(1, MAX_ROWS + 1)
        payload = self.r.randbytes(rows * self.stages[name][0] * 8)
        reply = self.engine.compute(FINGERPRINT, name, rows, share=payload)
        return name.encode(), rows, payload, reply

    def draw(self) -> Case:  # noqa: C901 - one branch per defect keeps each case readable
        r, rid = self.r, self._id()
        kind = r.choices(
            [
                "valid",
                "valid_seed",
                "unknown_stage",
                "non_utf8_stage",
                "rows_zero",
                "rows_over",
                "payload_length",
                "bad_flag",
                "seed_length",
                "wrong_kind",
                "name_too_long",
                "wrong_fingerprint",
                "old_version",
                "oversized",
                "garbage",
                "byte_flips",
                "truncated",
                "hello_garbage",
                "hello_wrong_token",
                "hello_bad_magic",
                "hello_oversized",
                "hello_truncated",
            ],
            weights=[12, 4, 6, 4, 4, 4, 6, 4, 4, 6, 4, 4, 3, 4, 6, 8, 4, 3, 3, 2, 2, 2],
        )[0]
        if kind == "valid":
            name, rows, payload, reply = self._valid()
            return Case(kind, stage_frame(rid, name, rows, payload), frozenset({"REPLY"}), rid, reply)
        if kind == "valid_seed":
            name = r.choice(list(self.stages))
            rows, seed = r.randrange(1, MAX_ROWS + 1), r.randbytes(32)
            reply = self.engine.compute(FINGERPRINT, name, rows, seed=seed)
            return Case(kind, stage_frame(rid, name.encode(), rows, seed, flag=1), frozenset({"REPLY"}), rid, reply)
        if kind in ("unknown_stage", "non_utf8_stage"):
            name = (
                r.choice(["", "lm_head ", "layers.99.qkv", "LAYERS.0.QKV", "layers.0.qkv\x00"]).encode()
                if kind == "unknown_stage"
                else bytes([0xFF, 0xFE]) + r.randbytes(r.randrange(0, 40))
            )
            return Case(kind, stage_frame(rid, name, 1, r.randbytes(8 * 32)), frozenset({"INVALID_ARGUMENT"}), rid)
        if kind in ("rows_zero", "rows_over", "payload_length"):
            name, rows, payload, _ = self._valid()
            if kind == "rows_zero":
                rows, expected = 0, "INVALID_ARGUMENT"
            elif kind == "rows_over":
                rows, expected = r.choice([MAX_ROWS + 1, 2**31, 2**32 - 1]), "RESOURCE_EXHAUSTED"
            else:
                cut = r.choice([-8, -1, 1, 7, 8, 64])
                payload = payload[:cut] if cut < 0 else payload + r.randbytes(cut)
                expected = "INVALID_ARGUMENT"
            return Case(kind, stage_frame(rid, name, rows, payload), frozenset({expected}), rid)
        if kind in ("bad_flag", "seed_length"):
            name, rows, payload, _ = self._valid()
            if kind == "bad_flag":
                return Case(kind, stage_frame(rid, name, rows, payload, flag=r.randrange(2, 256)), _only("I"), rid)
            seed = r.randbytes(r.choice([0, 1, 31, 33, 64]))
            return Case(kind, stage_frame(rid, name, rows, seed, flag=1), frozenset({"INVALID_ARGUMENT"}), rid)
        if kind == "wrong_kind":
            name, rows, payload, _ = self._valid()
            bad = r.choice([0, HELLO, HELLO_OK, REPLY, ERROR, r.randrange(6, 256)])
            return Case(kind, stage_frame(rid, name, rows, payload, kind=bad), frozenset({"INVALID_ARGUMENT"}), rid)
        if kind == "name_too_long":
            name, rows, payload, _ = self._valid()
            name_len = r.choice([257, 4096, 65535, len(name) + len(payload) + 8])
            return Case(kind, stage_frame(rid, name, rows, payload, name_len=name_len), _only("I"), rid)
        if kind in ("wrong_fingerprint", "old_version"):
            name, rows, payload, _ = self._valid()
            return Case(kind, stage_frame(rid, name, rows, payload), _only("F"), rid, conn=kind)
        if kind == "oversized":
            length = r.choice([1 << 20, 1 << 31, 2**32 - 1])
            data = HEADER.pack(length, STAGE, 0, 12, rid, 1) + r.randbytes(r.randrange(0, 64))
            return Case(kind, data, frozenset({"RESOURCE_EXHAUSTED", "CLOSED"}), rid, fresh=True)
        if kind == "garbage":
            return Case(kind, r.randbytes(r.randrange(1, 200)), ANYTHING_BUT_A_CRASH, fresh=True)
        if kind == "byte_flips":
            name, rows, payload, _ = self._valid()
            data = bytearray(stage_frame(rid, name, rows, payload))
            for _ in range(r.randrange(1, 5)):
                i = r.randrange(0, min(len(data), 64) if r.random() < 0.7 else len(data))
                data[i] ^= 1 << r.randrange(8)
            return Case(kind, bytes(data), ANYTHING_BUT_A_CRASH, rid, fresh=True)
        if kind == "truncated":
            name, rows, payload, _ = self._valid()
            data = stage_frame(rid, name, rows, payload)
            return Case(kind, data[: r.randrange(1, len(data))], frozenset({"CLOSED"}), rid, fresh=True)
        # a broken first frame: refused (no HELLO_OK) and closed
        good = hello_frame(PROTOCOL_VERSION, TOKEN.encode(), FINGERPRINT.encode())
        if kind == "hello_garbage":
            hello = r.randbytes(r.randrange(1, 100))
        elif kind == "hello_wrong_token":
            token = r.choice([b"", TOKEN.encode()[:-1], TOKEN.encode() + b"x", r.randbytes(r.randrange(1, 64))])
            hello = hello_frame(PROTOCOL_VERSION, token, FINGERPRINT.encode())
            return Case(kind, b"", frozenset({"UNAUTHENTICATED", "CLOSED"}), fresh=True, hello=hello)
        elif kind == "hello_bad_magic":
            body = HELLO_FIXED.pack(b"HTTP", len(TOKEN), 64) + TOKEN.encode() + FINGERPRINT.encode()
            hello = HEADER.pack(len(body), HELLO, 0, PROTOCOL_VERSION, 0, 0) + body
        elif kind == "hello_oversized":
            hello = HEADER.pack(r.choice([1 << 16, 2**32 - 1]), HELLO, 0, PROTOCOL_VERSION, 0, 0) + MAGIC
        else:
            hello = good[: r.randrange(1, len(good))]
        return Case(kind, b"", frozenset({"INVALID_ARGUMENT", "CLOSED"}), fresh=True, hello=hello)


def _only(letter: str) -> frozenset[str]:
    return frozenset({"INVALID_ARGUMENT" if letter == "I" else "FAILED_PRECONDITION"})


def _socket(port: int, context: ssl.SSLContext | None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10.0)
    return sock if context is None else context.wrap_socket(sock, server_hostname="127.0.0.1")


def _connect(
    port: int, context: ssl.SSLContext | None, fingerprint: str = FINGERPRINT, version: int = PROTOCOL_VERSION
):
    sock = _socket(port, context)
    sock.sendall(hello_frame(version, TOKEN.encode(), fingerprint.encode()))
    reader = FrameReader(sock)
    length, kind, *_ = HEADER.unpack(reader.read(HEADER_BYTES))
    assert kind == HELLO_OK and length == 0
    return sock, reader


def _outcome(reader: FrameReader) -> tuple[str, int, bytes]:
    """`(REPLY or a status name, request id, body)` of the next frame."""
    length, kind, flag, _, request_id, _ = HEADER.unpack(reader.read(HEADER_BYTES))
    body = bytes(reader.read(length))
    return ("REPLY" if kind == REPLY else status_name(flag) if kind == ERROR else f"kind {kind}"), request_id, body


def _fresh(port: int, context: ssl.SSLContext | None, case: Case) -> set[str]:
    """Sends a case on a connection of its own, half-closes, and collects every answer up to the server's close."""
    sock = _socket(port, context)
    seen = set()
    try:
        reader = FrameReader(sock)
        if case.hello is None:
            sock.sendall(hello_frame(PROTOCOL_VERSION, TOKEN.encode(), FINGERPRINT.encode()))
            assert _outcome(reader)[0] == "kind 2"  # HELLO_OK
        try:
            sock.sendall(case.hello if case.hello is not None else case.data)
            # the server reads to the end of what was sent, then sees EOF (a TCP half-close under TLS too)
            socket.socket.shutdown(sock, socket.SHUT_WR)
            while True:
                seen.add(_outcome(reader)[0])
        except (ConnectionError, ssl.SSLError, struct.error):
            seen.add("CLOSED")
    finally:
        sock.close()
    return seen


@pytest.fixture(scope="module", params=["plaintext", "tls"])
def fuzz_server(tiny_ee_checkpoint: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """`(plane, engine, server, gRPC port, client TLS context or None, client config)`."""
    engine = StageEngine(tiny_ee_checkpoint, max_rows=MAX_ROWS)
    security, context, config = HSSEEServerSecurity(tokens=[TOKEN]), None, HSSEEClientConfig(token=TOKEN, timeout=5.0)
    if request.param == "tls":
        pki = make_pki(tmp_path_factory.mktemp("fuzz-pki"))
        security = HSSEEServerSecurity(tls_cert=pki.server_cert, tls_key=pki.server_key, tokens=[TOKEN])
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(pki.ca))
        config = HSSEEClientConfig(tls_ca_cert=pki.ca, token=TOKEN, timeout=5.0)
    server, port = start_server(engine, "127.0.0.1", 0, max_workers=4, security=security)
    # party B of the exactness check after the storm: the client refuses one server as both parties
    twin, twin_port = start_server(engine, "127.0.0.1", 0, max_workers=4, security=security)
    yield request.param, engine, server, (port, twin_port), context, config
    server.stop(grace=None)
    twin.stop(grace=None)


def test_ten_thousand_fuzzed_frames_get_the_right_answer(fuzz_server, caplog: pytest.LogCaptureFixture):
    plane, engine, server, grpc_ports, context, config = fuzz_server
    port = server.data_port
    fuzzer = Fuzzer(engine, seed=20_250_102)
    conns = {
        "good": _connect(port, context),
        "wrong_fingerprint": _connect(port, context, fingerprint="cd" * 32),
        "old_version": _connect(port, context, version=PROTOCOL_VERSION + 1),
    }
    outcomes: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    mismatches = []
    rss_start = rss_peak = None
    sent = 0
    while sent < N_FRAMES[plane]:
        cases = [fuzzer.draw() for _ in range(min(BATCH, N_FRAMES[plane] - sent))]
        sent += len(cases)
        in_sync: dict[str, list[Case]] = {name: [] for name in conns}
        for case in cases:
            categories[case.category] += 1
            if case.fresh:
                seen = _fresh(port, context, case)
                outcomes.update(seen)
                if not seen <= case.expected:
                    mismatches.append((case.category, sorted(seen), sorted(case.expected)))
            else:
                in_sync[case.conn].append(case)
        for name, batch in in_sync.items():  # one write per connection, then the answers in order
            sock, reader = conns[name]
            sock.sendall(b"".join(case.data for case in batch))
            for case in batch:
                got, request_id, body = _outcome(reader)
                outcomes[got] += 1
                if (
                    got not in case.expected
                    or request_id != case.request_id
                    or (case.reply is not None and body != case.reply)
                ):
                    mismatches.append((case.category, got, sorted(case.expected)))
        if sent >= 500 and rss_start is None:  # after warm-up: threads, buffers, arenas
            rss_start = rss_mb()
        if rss_start is not None:
            rss_peak = max(rss_peak or 0.0, rss_mb())
    for sock, _ in conns.values():
        sock.close()
    print(f"\nfuzzed frames ({plane}): {sent}")
    print(f"outcomes: {dict(outcomes.most_common())}")
    print(f"categories: {dict(categories.most_common())}")
    print(f"RSS after warm-up {rss_start:.0f} MiB, peak {rss_peak:.0f} MiB")
    assert sent == N_FRAMES[plane]
    assert not mismatches, f"{len(mismatches)} frames got an unexpected answer, e.g. {mismatches[:5]}"
    assert "INTERNAL" not in outcomes and "UNKNOWN" not in outcomes  # no crash, no unhandled error
    assert rss_peak - rss_start < RSS_GROWTH_LIMIT_MB
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]

    # The server still computes exactly after the storm, on the data plane.
    x = torch.randint(-(2**63), 2**63 - 1, (3, 32), dtype=torch.int64, generator=torch.Generator().manual_seed(9))
    endpoints = tuple(f"127.0.0.1:{p}" for p in grpc_ports)
    with DataPlaneTransport(GrpcTransport(endpoints, config=config)) as transport:
        y_a, y_b = transport.run_stage(FINGERPRINT, "layers.0.qkv", share(x), out_features=64)
        assert transport.data_plane_calls == 2
    expected = engine.compute(FINGERPRINT, "layers.0.qkv", 3, share=x.numpy().tobytes())
    assert (y_a + y_b).numpy().tobytes() == expected
    deadline = time.monotonic() + 5.0
    while len(server.data_plane._connections) > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not server.data_plane._connections  # every fuzzing connection was closed, its thread gone
