"""`pipeline("hss-ee-text-generation")` returns what `pipeline("text-generation")` returns for the plaintext model.

Also the Auto-class registration (`HSSEEConfig`), and the errors a wrong call gets.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tiny_models import convert_tiny, tiny_config, tiny_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, pipeline

from hss_ee_hf import (
    CheatingServerError,
    CheckpointError,
    HSSEEClientConfig,
    HSSEEConfig,
    HSSEEError,
    HSSEEForCausalLM,
    HSSEETextGenerationPipeline,
    KeyFileError,
    KeyMismatchError,
)
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.server.grpc_server import start_server
from hss_ee_hf.transport.inprocess import InProcessTransport

TASK = "hss-ee-text-generation"
PROMPT = "w5 w6 w7 w8"
PROMPTS = ["w9 w10 w11 w12 w13", "w14 w15"]
CHAT = [{"role": "user", "content": "w7 w8 w9"}]
GREEDY = dict(do_sample=False, max_new_tokens=16)


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """Tiny matrices gain nothing from intra-op threads, and OpenMP spinning on a busy 2-core runner costs seconds."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass
class Tiny:
    original: torch.nn.Module
    folder: Path
    key: Path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return Tiny(*convert_tiny("llama", tmp_path_factory.mktemp("tiny-pipeline")))


@pytest.fixture(scope="module")
def reference(tiny: Tiny):
    return pipeline("text-generation", model=tiny.original, tokenizer=tiny_tokenizer())


@pytest.fixture(scope="module")
def private(tiny: Tiny) -> Iterator[HSSEETextGenerationPipeline]:
    transport = InProcessTransport(StageEngine(tiny.folder))
    with pipeline(TASK, model=str(tiny.folder), key=tiny.key, transport=transport) as generator:
        yield generator


@pytest.fixture(scope="module")
def endpoints(tiny: Tiny) -> Iterator[tuple[str, str]]:
    """Two real share servers on free loopback ports."""
    servers = [start_server(StageEngine(tiny.folder), "127.0.0.1", 0) for _ in range(2)]
    yield tuple(f"127.0.0.1:{port}" for _, port in servers)
    for server, _ in servers:
        server.stop(grace=None)


def test_factory_builds_the_private_pipeline(private: HSSEETextGenerationPipeline) -> None:
    assert isinstance(private, HSSEETextGenerationPipeline)
    assert isinstance(private.model, HSSEEForCausalLM) and isinstance(private.model, LlamaForCausalLM)
    assert private.device == torch.device("cpu")
    assert private.tokenizer.padding_side == "left"


@pytest.mark.parametrize("kwargs", [{}, {"return_full_text": False}], ids=["full-text", "new-text"])
def test_plain_prompt_equals_text_generation(private, reference, kwargs: dict) -> None:
    got = private(PROMPT, **GREEDY, **kwargs)
    want = reference(PROMPT, **GREEDY, **kwargs)
    assert got == want
    assert isinstance(got, list) and len(got) == 1 and set(got[0]) == {"generated_text"}
    assert isinstance(got[0]["generated_text"], str) and len(got[0]["generated_text"].split()) > 8


def test_prompt_batch_equals_text_generation(private, reference) -> None:
    got = private(PROMPTS, **GREEDY)
    assert got == reference(PROMPTS, **GREEDY)
    assert len(got) == 2 and all(len(item) == 1 for item in got)


def test_chat_equals_text_generation(private, reference) -> None:
    got = private(CHAT, **GREEDY)
    assert got == reference(CHAT, **GREEDY)
    messages = got[0]["generated_text"]
    assert messages[:-1] == CHAT and messages[-1]["role"] == "assistant" and messages[-1]["content"]


def test_pipeline_over_grpc_equals_text_generation(tiny: Tiny, reference, endpoints) -> None:
    with pipeline(TASK, model=str(tiny.folder), key=str(tiny.key), endpoints=endpoints) as generator:
        assert generator.model.hss_ee_client.transport.endpoints == endpoints
        assert generator(PROMPT, **GREEDY) == reference(PROMPT, **GREEDY)
        assert generator(CHAT, **GREEDY) == reference(CHAT, **GREEDY)


def test_pipeline_accepts_a_client_model(tiny: Tiny, reference) -> None:
    transport = InProcessTransport(StageEngine(tiny.folder))
    with HSSEEForCausalLM.from_pretrained(tiny.folder, key=tiny.key, transport=transport) as model:
        generator = pipeline(TASK, model=model)  # tokenizer: the EE checkpoint's own
        assert generator.model is model
        assert generator(CHAT, **GREEDY) == reference(CHAT, **GREEDY)
        generator.close()  # the pipeline did not open the connection, so it leaves it open
        assert generator(PROMPT, **GREEDY) == reference(PROMPT, **GREEDY)


@pytest.mark.parametrize(
    ("config_timeout", "timeout", "want"),
    [(None, None, 5.0), (20.0, None, 20.0), (None, 7.0, 7.0)],
    ids=["client-config", "hss-ee-config", "explicit"],
)
def test_auto_honours_client_config_timeout(tiny: Tiny, endpoints, config_timeout, timeout, want) -> None:
    # The HSSEEConfig / explicit timeout wins when set; otherwise the client_config's own deadline applies (it used
    # to be replaced by a hard-coded 60 s).
    config = HSSEEConfig(checkpoint=str(tiny.folder), endpoints=list(endpoints), timeout=config_timeout)
    extra = {} if timeout is None else {"timeout": timeout}
    client_config = HSSEEClientConfig(timeout=5.0)
    with AutoModelForCausalLM.from_config(config, key=tiny.key, client_config=client_config, **extra) as model:
        assert model.hss_ee_client.transport.timeout == want


def test_pipeline_passes_client_config_and_verify(tiny: Tiny, reference, endpoints) -> None:
    client_config = HSSEEClientConfig(timeout=5.0, retries=1)
    with pipeline(
        TASK, model=str(tiny.folder), key=tiny.key, endpoints=endpoints, client_config=client_config, verify=True
    ) as generator:
        transport = generator.model.hss_ee_client.transport
        assert transport.verifier.checks == 0 and transport.inner.timeout == 5.0
        assert transport.inner.config.retries == 1
        assert generator(PROMPT, **GREEDY) == reference(PROMPT, **GREEDY)
        assert transport.verifier.checks > 0  # every stage reply was Freivalds-checked
    assert issubclass(CheatingServerError, HSSEEError)


# --- errors -------------------------------------------------------------------------------------------------------


def test_missing_key_says_what_to_pass(tiny: Tiny) -> None:
    with pytest.raises(KeyFileError, match=r"no EE key was given: pass key="):
        pipeline(TASK, model=str(tiny.folder), endpoints=("127.0.0.1:1", "127.0.0.1:2"))


def test_missing_servers_say_what_to_pass(tiny: Tiny) -> None:
    with pytest.raises(ValueError, match=r"no share servers given: pass endpoints="):
        pipeline(TASK, model=str(tiny.folder), key=tiny.key)


def test_key_of_another_checkpoint_raises(tiny: Tiny, tmp_path: Path) -> None:
    _, _, other_key = convert_tiny("llama", tmp_path)
    transport = InProcessTransport(StageEngine(tiny.folder))
    try:
        with pytest.raises(KeyMismatchError, match="does not match checkpoint"):
            pipeline(TASK, model=str(tiny.folder), key=other_key, transport=transport)
    finally:
        transport.close()


def test_plaintext_model_is_refused(tiny: Tiny) -> None:
    with pytest.raises(TypeError, match=r"pipeline\('text-generation'\)"):
        pipeline(TASK, model=tiny.original, tokenizer=tiny_tokenizer())


def test_saving_is_refused_before_anything_is_written(private: HSSEETextGenerationPipeline, tmp_path: Path) -> None:
    with pytest.raises(HSSEEError, match="share the EE checkpoint folder"):
        private.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    assert not hasattr(private.model.config, "custom_pipelines")


def test_connected_model_with_key_is_refused(private: HSSEETextGenerationPipeline, tiny: Tiny) -> None:
    with pytest.raises(ValueError, match="already a connected HSS-EE client; drop key"):
        pipeline(TASK, model=private.model, key=tiny.key)


# --- Auto classes -------------------------------------------------------------------------------------------------


def test_auto_from_config_builds_the_client(tiny: Tiny) -> None:
    transport = InProcessTransport(StageEngine(tiny.folder))
    model = AutoModelForCausalLM.from_config(
        HSSEEConfig(checkpoint=str(tiny.folder)), key=tiny.key, transport=transport
    )
    with model:
        assert isinstance(model, HSSEEForCausalLM) and isinstance(model, LlamaForCausalLM)
        inputs = tiny_tokenizer()(PROMPTS, return_tensors="pt", padding=True)
        assert torch.equal(model.generate(**inputs, **GREEDY), tiny.original.generate(**inputs, **GREEDY))


def test_client_folder_loads_through_auto_and_pipeline(tiny: Tiny, reference, endpoints, tmp_path: Path) -> None:
    client = tmp_path / "client"
    HSSEEConfig(checkpoint=str(tiny.folder), endpoints=list(endpoints), timeout=20.0).save_pretrained(client)
    config = AutoConfig.from_pretrained(client)
    assert isinstance(config, HSSEEConfig) and config.endpoints == list(endpoints) and config.timeout == 20.0
    assert "key" not in (client / "config.json").read_text()
    with AutoModelForCausalLM.from_pretrained(client, key=tiny.key) as model:
        assert isinstance(model, HSSEEForCausalLM)
        assert model.hss_ee_client.transport.endpoints == endpoints
    with pipeline(TASK, model=str(client), key=tiny.key) as generator:
        assert generator(PROMPT, **GREEDY) == reference(PROMPT, **GREEDY)


def test_client_folder_without_checkpoint_is_refused(tiny: Tiny, tmp_path: Path) -> None:
    HSSEEConfig(endpoints=["127.0.0.1:1", "127.0.0.1:2"]).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="names no EE checkpoint"):
        AutoModelForCausalLM.from_pretrained(tmp_path, key=tiny.key)


def test_registration_leaves_plain_checkpoints_alone(tiny: Tiny) -> None:
    # The EE checkpoint is an ordinary Llama checkpoint to transformers (the converter and the servers rely on it).
    assert type(AutoConfig.from_pretrained(tiny.folder)) is LlamaConfig
    plain = AutoModelForCausalLM.from_config(tiny_config("llama"))
    assert type(plain) is LlamaForCausalLM


def test_bad_client_config_is_refused() -> None:
    with pytest.raises(ValueError, match="two 'host:port' strings"):
        HSSEEConfig(endpoints=["127.0.0.1:1"])
