"""What each bad input gets at every public entry point, through both transports; docs/errors.md is built from here.

Every case below names a public entry point (`generate()`, the three pipelines, `from_pretrained`, `hss-ee generate` /
`classify`, the Python `convert`), the bad input (empty, zero-size, over-long, an unknown keyword), what it must get
(a typed error, a warning, or exactly what plaintext transformers gives) and an excerpt its message must contain. A
case that talks to share servers runs in-process and over gRPC. `test_errors_doc_is_current` renders the same cases as
the table in docs/errors.md and fails when the file differs; regenerate it with

    .venv/bin/python tests/test_bad_inputs.py
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, redirect_stderr
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_families import connected, convert_tiny_family  # noqa: E402
from tiny_models import convert_tiny, tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "errors.md"
TRANSPORTS = ("in-process", "grpc")
AS_PLAINTEXT = "same as plaintext"
WARNING = "warning, then runs"


@dataclass(frozen=True)
class Outcome:
    """What an entry point did: the exception type's name (or `AS_PLAINTEXT` / `WARNING`) and its message."""

    kind: str
    message: str


class Env:
    """Tiny converted checkpoints, converted once per module, and connected client models."""

    def __init__(self, root: Path):
        self.root = root
        self._converted: dict[str, tuple] = {}

    def converted(self, name: str) -> tuple:
        """`(original, folder, key)` of a tiny `llama`, `gpt2`, `resnet-basic` or `t5-relu-tied`."""
        if name not in self._converted:
            make = convert_tiny if name in ("llama", "gpt2") else convert_tiny_family
            self._converted[name] = make(name, self.root)
        return self._converted[name]

    def client(self, stack: ExitStack, name: str, transport: str):
        from hss_ee_hf import HSSEEForCausalLM, HSSEEForConditionalGeneration, HSSEEForImageClassification

        classes = {"t5-relu-tied": HSSEEForConditionalGeneration, "resnet-basic": HSSEEForImageClassification}
        _, folder, key = self.converted(name)
        return stack.enter_context(connected(classes.get(name, HSSEEForCausalLM), folder, key, transport))


def _outcome(fn: Callable[[], object]) -> Outcome:
    """Runs `fn`; its exception, or the warnings it logged, or (when it returns a string) a plaintext-equal result."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("hss_ee_hf")
    log.addHandler(handler)
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - the type and message are what the case checks
        return Outcome(type(err).__name__, str(err))
    finally:
        log.removeHandler(handler)
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    if warnings:
        return Outcome(WARNING, " ".join(warnings))
    return Outcome(AS_PLAINTEXT, str(result))


def _ids(shape: tuple[int, int]) -> torch.Tensor:
    return torch.full(shape, 5, dtype=torch.long)


def _generate(env: Env, transport: str, name: str, ids: torch.Tensor, **kwargs) -> Outcome:
    with ExitStack() as stack:
        model = env.client(stack, name, transport)
        return _outcome(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, **kwargs))


def _long_llama(env: Env, transport: str) -> Outcome:
    """20 prompt tokens for a Llama whose context is overridden to 16 positions (rotary: it runs, as plaintext)."""
    original, folder, key = env.converted("llama")
    ids = torch.arange(4, 24).unsqueeze(0)
    with _llama_with(folder, key, transport, max_position_embeddings=16) as model:
        outcome = _outcome(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2))
        plain = original.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
        secure = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    assert torch.equal(secure, plain)
    return outcome


def _llama_with(folder: Path, key: Path, transport: str, **kwargs):
    """A connected tiny Llama client built with extra `from_pretrained` keywords."""
    from contextlib import contextmanager

    from hss_ee_hf import HSSEEForCausalLM
    from hss_ee_hf.server.engine import StageEngine
    from hss_ee_hf.server.grpc_server import start_server
    from hss_ee_hf.transport.inprocess import InProcessTransport

    @contextmanager
    def manager():
        servers = []
        if transport == "in-process":
            connection = dict(transport=InProcessTransport(StageEngine(folder)))
        else:
            servers = [start_server(StageEngine(folder), "127.0.0.1", 0) for _ in range(2)]
            connection = dict(endpoints=tuple(f"127.0.0.1:{port}" for _, port in servers))
        try:
            with HSSEEForCausalLM.from_pretrained(folder, key=key, **connection, **kwargs) as model:
                yield model
        finally:
            for server, _ in servers:
                server.stop(None)

    return manager()


def _load_with(env: Env, transport: str, **kwargs) -> Outcome:
    _, folder, key = env.converted("llama")

    def load():
        with _llama_with(folder, key, transport, **kwargs):
            return "loaded"

    return _outcome(load)


def _pipeline(env: Env, transport: str, task: str, name: str, inputs, **kwargs) -> Outcome:
    from transformers import pipeline

    _, folder, key = env.converted(name)
    with ExitStack() as stack:
        model = env.client(stack, name, transport)
        if kwargs:  # keywords are checked when the pipeline builds its own client
            transport = model.hss_ee_client.transport
            return _outcome(lambda: pipeline(task, model=str(folder), key=key, transport=transport, **kwargs))
        generator = pipeline(task, model=model)
        return _outcome(lambda: generator(inputs, max_new_tokens=2, do_sample=False))


def _text_pipeline_empty_prompt(env: Env, transport: str) -> Outcome:
    from transformers import pipeline

    outcome = _pipeline(env, transport, "hss-ee-text-generation", "llama", "")
    original = env.converted("llama")[0]
    plain = pipeline("text-generation", model=original, tokenizer=tiny_tokenizer())(
        "", max_new_tokens=2, do_sample=False
    )
    assert outcome.message == str(plain)
    return Outcome(outcome.kind, "generates from bos_token_id, as pipeline('text-generation')('') does")


def _resnet_zero_batch(env: Env, transport: str) -> Outcome:
    original = env.converted("resnet-basic")[0]
    x = torch.zeros(0, 3, 48, 48)
    with ExitStack() as stack:
        model = env.client(stack, "resnet-basic", transport)
        outcome = _outcome(lambda: tuple(model(pixel_values=x).logits.shape))
    assert outcome.message == str(tuple(original(pixel_values=x).logits.shape))
    return Outcome(outcome.kind, f"logits of shape {outcome.message}")


def _cli(argv: list[str]) -> Outcome:
    """Runs `hss-ee ARGV` in this process: a refused input must exit with status 2 and one line naming the error."""
    from hss_ee_hf.cli.main import main

    err = io.StringIO()
    with redirect_stderr(err):
        rc = main(argv)
    line = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else ""
    if rc == 0:
        return Outcome(AS_PLAINTEXT, line)
    assert rc == 2, err.getvalue()
    kind, _, message = line.partition(": error: ")[2].partition(": ")
    return Outcome(kind, message)


def _cli_generate_empty(env: Env, transport: str) -> Outcome:
    from hss_ee_hf.server.engine import StageEngine
    from hss_ee_hf.server.grpc_server import start_server

    _, folder, key = env.converted("llama")
    servers = [start_server(StageEngine(folder), "127.0.0.1", 0) for _ in range(2)]
    try:
        endpoints = [f"127.0.0.1:{port}" for _, port in servers]
        return _cli(["generate", str(folder), "", "--key", str(key), "--endpoints", *endpoints])
    finally:
        for server, _ in servers:
            server.stop(None)


def _cli_classify_empty_file(env: Env, transport: str) -> Outcome:
    _, folder, key = env.converted("resnet-basic")
    image = env.root / "empty.png"
    image.write_bytes(b"")
    return _cli(["classify", str(folder), str(image), "--key", str(key), "--endpoints", "127.0.0.1:1", "127.0.0.1:2"])


def _convert(env: Env, transport: str, src: str, make: Callable[[Path], None] | None = None) -> Outcome:
    from hss_ee_hf import convert

    path = env.root / src if src else Path("")
    if make is not None:
        make(path)
    return _outcome(lambda: convert(str(path) if src else "", env.root / "out", env.root / "out.hss-ee-key"))


def _empty_config(folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text("", encoding="utf-8")


@dataclass(frozen=True)
class Case:
    """One bad input at one entry point and what it must get.

    Attributes:
        entry (`str`): the public entry point.
        given (`str`): the input, in words.
        kind (`str`): the exception type, `WARNING` or `AS_PLAINTEXT`.
        excerpt (`str`): what the message must contain (also the doc's message column).
        run (`Callable[[Env, str], Outcome]`): runs it over one transport.
        servers (`bool`): whether it talks to share servers (then it runs over every transport).
    """

    entry: str
    given: str
    kind: str
    excerpt: str
    run: Callable[[Env, str], Outcome]
    servers: bool = True


CASES = (
    Case(
        "model.generate()",
        "empty prompt: input_ids of shape (1, 0)",
        "InvalidInputError",
        "generate() got an empty prompt (0 tokens per sequence); pass at least one token",
        lambda env, t: _generate(env, t, "llama", _ids((1, 0))),
    ),
    Case(
        "model.generate()",
        "zero-size batch: input_ids of shape (0, 3)",
        "InvalidInputError",
        "generate() got a zero-size batch (no sequences); pass at least one prompt",
        lambda env, t: _generate(env, t, "llama", _ids((0, 3))),
    ),
    Case(
        "model.generate() (T5)",
        "empty encoder input: input_ids of shape (1, 0)",
        "InvalidInputError",
        "generate() got an empty prompt (0 tokens per sequence); pass at least one token",
        lambda env, t: _generate(env, t, "t5-relu-tied", _ids((1, 0))),
    ),
    Case(
        "model.generate() (GPT-2)",
        "prompt + max_new_tokens past n_positions (127 + 2 > 128)",
        "InvalidInputError",
        "past the 128 learned position embeddings of this gpt2 model (it has no embedding for a later position, so "
        "it cannot run)",
        lambda env, t: _generate(env, t, "gpt2", _ids((1, 127))),
    ),
    Case(
        "model.generate() (Llama, Mistral, Qwen2)",
        "prompt past max_position_embeddings (20 + 2 > 16)",
        WARNING,
        "past the 16 this llama model was trained for (max_position_embeddings): it runs, as in plaintext "
        "transformers, but tokens past position 16 are likely to be degraded",
        _long_llama,
    ),
    Case(
        "model(pixel_values) (ResNet)",
        "zero-size batch: pixel_values of shape (0, 3, 48, 48)",
        AS_PLAINTEXT,
        "logits of shape (0, 10)",
        _resnet_zero_batch,
    ),
    Case(
        "HSSEEForCausalLM.from_pretrained()",
        "misspelt option: verfy=True",
        "UnknownOptionError",
        "got unknown keyword argument 'verfy'. 'verfy': did you mean 'verify'?",
        lambda env, t: _load_with(env, t, verfy=True),
    ),
    Case(
        "HSSEEForCausalLM.from_pretrained()",
        "option of another version: speculative_rounds=3",
        "UnknownOptionError",
        "got unknown keyword argument 'speculative_rounds'. It is neither an hss-ee-hf option (key, endpoints,",
        lambda env, t: _load_with(env, t, speculative_rounds=3),
    ),
    Case(
        "pipeline('hss-ee-text-generation')",
        "empty prompt: ''",
        AS_PLAINTEXT,
        "generates from bos_token_id, as pipeline('text-generation')('') does",
        _text_pipeline_empty_prompt,
    ),
    Case(
        "pipeline('hss-ee-text-generation')",
        "empty list: []",
        "InvalidInputError",
        "got an empty list of inputs; pass one input or a non-empty list of them",
        lambda env, t: _pipeline(env, t, "hss-ee-text-generation", "llama", []),
    ),
    Case(
        "pipeline('hss-ee-text-generation', ...)",
        "misspelt option: verfy=True",
        "UnknownOptionError",
        "pipeline('hss-ee-text-generation') got unknown keyword argument 'verfy'. 'verfy': did you mean 'verify'?",
        lambda env, t: _pipeline(env, t, "hss-ee-text-generation", "llama", None, verfy=True),
    ),
    Case(
        "pipeline('hss-ee-text2text-generation')",
        "empty prompt: ''",
        "InvalidInputError",
        "generate() got an empty prompt",
        lambda env, t: _pipeline(env, t, "hss-ee-text2text-generation", "t5-relu-tied", ""),
    ),
    Case(
        "pipeline('hss-ee-image-classification')",
        "empty list: []",
        "InvalidInputError",
        "got an empty list of inputs; pass one input or a non-empty list of them",
        lambda env, t: _pipeline(env, t, "hss-ee-image-classification", "resnet-basic", []),
    ),
    Case(
        "hss-ee generate",
        "empty prompt: ''",
        "InvalidConfigError",
        "the prompt (PROMPT) is empty",
        _cli_generate_empty,
        servers=False,
    ),
    Case(
        "hss-ee classify",
        "empty image file (0 bytes)",
        "InputFileError",
        "image file(s) empty (0 bytes): ",
        _cli_classify_empty_file,
        servers=False,
    ),
    Case(
        "hss_ee_hf.convert()",
        "empty source: ''",
        "ConversionError",
        "the source is an empty string; pass a checkpoint folder, a .gguf file or a Hub id",
        lambda env, t: _convert(env, t, ""),
        servers=False,
    ),
    Case(
        "hss_ee_hf.convert()",
        "empty GGUF file (0 bytes)",
        "ConversionError",
        "is empty (0 bytes): an interrupted download or copy; fetch it again",
        lambda env, t: _convert(env, t, "empty.gguf", lambda p: p.write_bytes(b"")),
        servers=False,
    ),
    Case(
        "hss_ee_hf.convert()",
        "empty config.json",
        "ConversionError",
        "cannot be read as a model config",
        lambda env, t: _convert(env, t, "empty-config", _empty_config),
        servers=False,
    ),
)


def _params() -> Iterator:
    for i, case in enumerate(CASES):
        for transport in TRANSPORTS if case.servers else (None,):
            name = f"{i:02d}-{case.entry.split('(')[0].strip('.').replace(' ', '-')}"
            yield pytest.param(case, transport, id=f"{name}-{transport}" if transport else name)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Env(tmp_path_factory.mktemp("bad-inputs"))
    torch.set_num_threads(before)


@pytest.mark.parametrize(("case", "transport"), list(_params()))
def test_bad_input_gets_a_clear_answer(env: Env, case: Case, transport: str | None) -> None:
    outcome = case.run(env, transport or "in-process")
    assert outcome.kind == case.kind, f"{case.entry} with {case.given}: got {outcome}"
    assert case.excerpt in outcome.message, f"{case.entry} with {case.given}: got {outcome}"


def render_table() -> str:
    """docs/errors.md, rendered from `CASES`."""
    lines = [
        "# What each bad input gets",
        "",
        "Generated from `tests/test_bad_inputs.py` (every row is a test, run in-process and over gRPC where it talks "
        "to share servers); regenerate with `.venv/bin/python tests/test_bad_inputs.py`. Every error derives from "
        "`hss_ee_hf.HSSEEError`; `InvalidInputError` is also a `ValueError`, `UnknownOptionError` a `TypeError`.",
        "",
        "| entry point | input | gets | message (excerpt) |",
        "| --- | --- | --- | --- |",
    ]
    for case in CASES:
        kind = case.kind if case.kind in (AS_PLAINTEXT, WARNING) else f"`{case.kind}`"
        cells = (f"`{case.entry}`", case.given, kind, case.excerpt.replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def test_errors_doc_is_current() -> None:
    assert DOC.exists() and DOC.read_text(encoding="utf-8") == render_table(), (
        "docs/errors.md differs from the cases in tests/test_bad_inputs.py; regenerate it with "
        "`.venv/bin/python tests/test_bad_inputs.py`"
    )


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render_table(), encoding="utf-8")
    print(f"wrote {DOC}")
