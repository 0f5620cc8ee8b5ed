"""`pipeline("hss-ee-text-generation", ...)`: transformers' text-generation pipeline over two share servers.

[`HSSEETextGenerationPipeline`] is transformers' `TextGenerationPipeline` with an HSS-EE client model: the
preprocessing (tokenizer, chat template), `generate()` and postprocessing are transformers' own, so for a plain
prompt or a chat it returns exactly what `pipeline("text-generation")` returns for the plaintext model.

How the task plugs into `pipeline()` is in `base.py`.
"""

from __future__ import annotations

import logging

from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.text_generation import TextGenerationPipeline

from ..client.modeling import HSSEEForCausalLM
from .base import HSSEEClientReference, HSSEEPipelineMixin, checkpoint_tokenizer

logger = logging.getLogger(__name__)

TASK = "hss-ee-text-generation"


class HSSEETextGenerationPipeline(HSSEEPipelineMixin, TextGenerationPipeline):
    """Text generation with an HSS-EE client model: plain prompts and chats, exactly like `"text-generation"`.

    Built by `pipeline("hss-ee-text-generation", model=..., key=..., endpoints=...)` or directly.

    Args:
        model (`str`, `os.PathLike` or [`HSSEEForCausalLM`]): an EE checkpoint (local folder or Hub id), a client
            folder ([`HSSEEConfig`]), or an already connected client model (then pass no `key`, `endpoints` or
            `transport`).
        key (`EEKey` or path, *optional*): the secret key written by `hss-ee convert`; required unless `model` is
            a client model.
        endpoints (`tuple[str, str]`, *optional*): `host:port` of share servers A and B.
        transport (`Transport`, *optional*): a ready transport instead of `endpoints` (e.g.
            `InProcessTransport(StageEngine(folder))` for a single-machine trial).
        timeout (`float`, *optional*): deadline per call in seconds (default: `client_config.timeout`).
        client_config (`HSSEEClientConfig`, *optional*): TLS / mutual TLS, bearer token, deadline and retries of the
            connections to the share servers.
        verify (`bool`, *optional*): Freivalds-check every returned share (`CheatingServerError` names a cheating
            server); `verify_rows` sets the secret check rows.
        precompute (`bool`, *optional*): prepare party A's products ahead of time (default `True`).
        max_rows (`int`, *optional*): the most rows sent in one request.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): defaults to the EE checkpoint's tokenizer.
        kwargs: the other arguments of transformers' `TextGenerationPipeline` (generation defaults such as
            `max_new_tokens`, `device`, ...).

    Raises:
        `KeyFileError`: no key was given for a checkpoint, or the key file cannot be read.
        `KeyMismatchError`: the key belongs to another checkpoint.
        `ValueError`: neither endpoints nor a transport were given, or they were given with a connected model.
        `TypeError`: `model` is a plaintext model (use `pipeline("text-generation")` for that).

    Example:

    ```python
    >>> import hss_ee_hf  # registers the task
    >>> from transformers import pipeline
    >>> generator = pipeline(
    ...     "hss-ee-text-generation", model="smollm2-ee", key="smollm2.hss-ee-key",
    ...     endpoints=("10.0.0.1:50051", "10.0.0.2:50051"),
    ... )
    >>> generator([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=32)
    ```
    """

    _client_class = HSSEEForCausalLM
    _task = TASK
    # The factory's tokenizer lookup may fail (a client model or a client folder carries no tokenizer); `None` makes
    # that failure soft, and `__init__` then loads the tokenizer from the EE checkpoint itself.
    _load_tokenizer = None

    def _with_preprocessor(self, model, kwargs):
        if kwargs.get("tokenizer") is None:
            kwargs["tokenizer"] = checkpoint_tokenizer(model)
        return kwargs


def register_pipeline() -> None:
    """Registers the `"hss-ee-text-generation"` task with transformers' `PIPELINE_REGISTRY`.

    Called when `hss_ee_hf` is imported.
    """
    if PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl") is HSSEETextGenerationPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=HSSEETextGenerationPipeline, pt_model=HSSEEClientReference, type="text"
    )
