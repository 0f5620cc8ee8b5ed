"""Keyword checking keeps valid keywords working, and a long prefill split by `max_rows` shows its progress.

The refusals themselves (a misspelt or unknown option) are cases of `test_bad_inputs.py`; here: the options table
matches `from_pretrained`, real config fields and generation flags still pass, loader options given to a pipeline
reach the loader, and a prompt longer than `max_rows` draws one progress bar over the stages of its pass.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch
from transformers import pipeline
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import convert_tiny  # noqa: E402

from hss_ee_hf import HSSEEForCausalLM  # noqa: E402
from hss_ee_hf.client.modeling import HSSEEPreTrainedModel  # noqa: E402
from hss_ee_hf.client.options import LOADER_OPTIONS  # noqa: E402
from hss_ee_hf.server.engine import StageEngine  # noqa: E402
from hss_ee_hf.transport.inprocess import InProcessTransport  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    original, folder, key = convert_tiny("llama", tmp_path_factory.mktemp("options-llama"))
    return original, folder, key, StageEngine(folder)


def test_options_table_lists_every_from_pretrained_option() -> None:
    """A new `from_pretrained` option must be one line in `LOADER_OPTIONS` (pipelines route it from there)."""
    params = inspect.signature(HSSEEPreTrainedModel.from_pretrained).parameters.values()
    keywords = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(LOADER_OPTIONS) == keywords | {"attn_implementation"}


def test_config_fields_still_override_the_checkpoint(tiny) -> None:
    _, folder, key, engine = tiny
    with HSSEEForCausalLM.from_pretrained(
        folder, key=key, transport=InProcessTransport(engine), use_cache=False, attn_implementation="eager"
    ) as model:
        assert model.config.use_cache is False and model.config._attn_implementation == "eager"


def test_pipeline_routes_loader_options_and_keeps_generation_flags(tiny) -> None:
    _, folder, key, engine = tiny
    transport = InProcessTransport(engine)
    # `local_files_only` used to reach generate() as an unknown model input and fail on the first prompt.
    generator = pipeline(
        "hss-ee-text-generation",
        model=str(folder),
        key=key,
        transport=transport,
        local_files_only=True,
        max_new_tokens=2,
        do_sample=False,
    )
    with generator:
        assert generator("w5 w6")[0]["generated_text"].startswith("w5 w6")


def test_long_prefill_shows_progress_and_equals_plaintext(
    tiny, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    original, folder, key, engine = tiny
    # Progress bars on for this test (another test or library may have turned transformers' bars off process-wide).
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    request.addfinalizer(lambda: None if was_enabled else hf_logging.disable_progress_bar())
    ids = torch.arange(4, 24).unsqueeze(0)  # 20 rows per stage, 3 requests of at most 8
    with HSSEEForCausalLM.from_pretrained(folder, key=key, transport=InProcessTransport(engine), max_rows=8) as model:
        secure = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        stages = len(model.hss_ee_client.in_features)
    plain = original.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert torch.equal(secure, plain)
    err = capsys.readouterr().err
    assert "HSS-EE prefill: 20 rows, 3 requests per stage (max_rows=8)" in err
    # One bar for the pass, over the stages that took the 20 rows (the lm_head then takes the last position only).
    assert f"0/{stages}" in err and "100%" in err and "HSS-EE prefill: 1 rows" not in err
