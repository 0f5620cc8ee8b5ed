"""`pipeline("hss-ee-text-generation", ...)`: transformers' text-generation pipeline over two share servers.

[`HSSEETextGenerationPipeline`] is transformers' `TextGenerationPipeline` with an HSS-EE client model: the
preprocessing (tokenizer, chat template), `generate()` and postprocessing are transformers' own, so for a plain
prompt or a chat it returns exactly what `pipeline("text-generation")` returns for the plaintext model.

How it plugs into transformers 5's `pipeline()` factory without patching it: for a string `model` the factory reads
the config, then calls `from_pretrained(model, **hub_and_model_kwargs)` on the task's registered `pt_model` classes
(falling back to the config's `architectures`, i.e. a plain `LlamaForCausalLM`), loads the tokenizer from the same
folder, and passes every keyword it does not know (`key`, `endpoints`, `transport`, ...) to the pipeline class.
The key therefore never reaches the model loader. The registered `pt_model`, [`HSSEEClientReference`], only records
the checkpoint and the Hub arguments (it cannot fail, so the factory never falls back to loading the EE weights as a
plaintext model), and the pipeline builds the client model with the key and servers it is given.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoTokenizer
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.text_generation import TextGenerationPipeline

from .auto import load_client
from .errors import HSSEEError
from .key import EEKey
from .modeling import HSSEEForCausalLM, HSSEEPreTrainedModel
from .transport import Transport

logger = logging.getLogger(__name__)

TASK = "hss-ee-text-generation"


@dataclass
class HSSEEClientReference:
    """A checkpoint the pipeline factory asked for, not loaded yet (the factory does not have the key).

    Attributes:
        name_or_path (`str`): the EE checkpoint (or client folder) passed as `model=`.
        load_kwargs (`dict`): Hub arguments and config overrides the factory passed to `from_pretrained`.
    """

    name_or_path: str
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    # The factory reads these when a `device_map` is given; the client always starts on the CPU.
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    hf_device_map: None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> HSSEEClientReference:
        """Records what to load; called by transformers' `pipeline()` factory as the task's `pt_model`."""
        return cls(os.fspath(pretrained_model_name_or_path), kwargs)


class HSSEEPipelineMixin:
    """What the HSS-EE pipelines share: model type checks, refusing to save, closing the server connections.

    Subclasses set `_client_class` (the task's client model class) and `_task`.
    """

    _client_class: type[HSSEEPreTrainedModel] = HSSEEPreTrainedModel
    _task: str = ""
    _owns_model: bool = False

    def __init__(
        self,
        model: Any,
        *args: Any,
        key: EEKey | str | os.PathLike | None = None,
        endpoints: tuple[str, str] | list[str] | None = None,
        transport: Transport | None = None,
        timeout: float | None = None,
        max_rows: int | None = None,
        device: int | str | torch.device | None = None,
        **kwargs: Any,
    ):
        model, owns_model = client_model(
            model, self._task, self._client_class, key, endpoints, transport, timeout, max_rows
        )
        try:
            kwargs = self._with_preprocessor(model, kwargs)
            super().__init__(model, *args, device=model.device if device is None else device, **kwargs)
        except BaseException:
            if owns_model:
                model.close()
            raise
        self._owns_model = owns_model

    def _with_preprocessor(self, model: HSSEEPreTrainedModel, kwargs: dict[str, Any]) -> dict[str, Any]:
        """`kwargs` with the task's tokenizer or image processor, from the EE checkpoint unless one was passed."""
        return kwargs

    def check_model_type(self, supported_models: Any) -> None:
        """Accepts exactly the HSS-EE client models of the task (their class names are not in transformers' tables)."""
        if not isinstance(self.model, self._client_class):
            raise TypeError(f"{type(self.model).__name__} is not an {self._client_class.__name__}")

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Refuses: a client pipeline holds only the client side of an EE checkpoint (and its key must stay private).

        Raises:
            `HSSEEError`: always, saying what to share instead.
        """
        raise HSSEEError(
            "an HSS-EE pipeline cannot be saved: share the EE checkpoint folder itself (or `hss-ee push` it), keep "
            f"the key to yourself, and rebuild the pipeline with pipeline('{self._task}', model=CHECKPOINT, key=..., "
            "endpoints=...)"
        )

    def close(self) -> None:
        """Closes the connection to the share servers if this pipeline opened it (a passed-in model stays open)."""
        if self._owns_model:
            self.model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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
        timeout (`float`, *optional*): gRPC deadline per call in seconds.
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
            kwargs["tokenizer"] = _checkpoint_tokenizer(model)
        return kwargs


def client_model(
    model: Any,
    task: str,
    client_class: type[HSSEEPreTrainedModel],
    key: EEKey | str | os.PathLike | None,
    endpoints: tuple[str, str] | list[str] | None,
    transport: Transport | None,
    timeout: float | None,
    max_rows: int | None,
) -> tuple[HSSEEPreTrainedModel, bool]:
    """A pipeline's client model and whether the pipeline built it (and so closes it).

    Args:
        model: what the user passed as `model=` (a checkpoint, a recorded reference, or a connected client).
        task (`str`): the pipeline task, for messages.
        client_class (`type`): the client class of the task.
        key, endpoints, transport, timeout, max_rows: as in `from_pretrained`.
    """
    if isinstance(model, client_class):
        passed = (("key", key), ("endpoints", endpoints), ("transport", transport))
        given = [name for name, value in passed if value is not None]
        if given:
            raise ValueError(
                f"the model passed is already a connected HSS-EE client; drop {', '.join(given)} (they only apply "
                "when `model` is an EE checkpoint folder or Hub id)"
            )
        return model, False
    if isinstance(model, (str, os.PathLike)):
        model = HSSEEClientReference.from_pretrained(model)
    if not isinstance(model, HSSEEClientReference):
        plain = task.removeprefix("hss-ee-")
        raise TypeError(
            f"pipeline('{task}') needs an EE checkpoint (folder or Hub id) with key= and endpoints=, or an "
            f"{client_class.__name__}; got a {type(model).__name__}. For a plaintext model use pipeline('{plain}')"
        )
    client = load_client(
        model.name_or_path,
        key=key,
        endpoints=endpoints,
        transport=transport,
        timeout=timeout,
        max_rows=max_rows,
        client_class=client_class,
        **model.load_kwargs,
    )
    return client, True


def _checkpoint_tokenizer(model: HSSEEForCausalLM):
    """The tokenizer saved in the EE checkpoint folder the client model was loaded from."""
    folder = model.config.name_or_path
    if not folder:
        raise ValueError(f"cannot tell which tokenizer {type(model).__name__} uses; pass tokenizer=")
    return AutoTokenizer.from_pretrained(folder)


def register_pipeline() -> None:
    """Registers the `"hss-ee-text-generation"` task with transformers' `PIPELINE_REGISTRY`.

    Called when `hss_ee_hf` is imported.
    """
    if PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl") is HSSEETextGenerationPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=HSSEETextGenerationPipeline, pt_model=HSSEEClientReference, type="text"
    )
