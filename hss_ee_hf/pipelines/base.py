"""What the `hss-ee-*` pipelines share: the registered model stand-in, the client model they build, and closing it.

How the pipelines plug into transformers 5's `pipeline()` factory without patching it: for a string `model` the
factory reads the config, then calls `from_pretrained(model, **hub_and_model_kwargs)` on the task's registered
`pt_model` classes (falling back to the config's `architectures`, i.e. a plain `LlamaForCausalLM`), loads the
tokenizer from the same folder, and passes every keyword it does not know (`key`, `endpoints`, `transport`,
`client_config`, `verify`, ...) to the pipeline class. The key therefore never reaches the model loader. The
registered `pt_model`, [`HSSEEClientReference`], only records the checkpoint and the Hub arguments (it cannot fail,
so the factory never falls back to loading the EE weights as a plaintext model), and the pipeline builds the client
model with the key and servers it is given.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoTokenizer

from ..artifacts.key import EEKey
from ..client.auto import load_client
from ..client.modeling import HSSEEForCausalLM, HSSEEPreTrainedModel
from ..client.options import LOADER_OPTIONS, generation_keywords, unknown_option_error
from ..errors import HSSEEError, InvalidInputError
from ..transport.base import Transport
from ..transport.config import HSSEEClientConfig

logger = logging.getLogger(__name__)


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
        client_config: HSSEEClientConfig | None = None,
        verify: bool | None = None,
        verify_rows: int | None = None,
        precompute: bool | None = None,
        device: int | str | torch.device | None = None,
        **kwargs: Any,
    ):
        options = dict(client_config=client_config, verify=verify, verify_rows=verify_rows, precompute=precompute)
        # The loaders' other options (Hub arguments, newer options) go to the loader, not to transformers' Pipeline,
        # which would hand them to generate() as unknown model inputs.
        options.update({name: kwargs.pop(name) for name in list(kwargs) if name in LOADER_OPTIONS})
        model, owns_model = client_model(
            model,
            self._task,
            self._client_class,
            key,
            endpoints,
            transport,
            timeout,
            max_rows,
            **{name: value for name, value in options.items() if value is not None},
        )
        try:
            kwargs = self._with_preprocessor(model, kwargs)
            super().__init__(model, *args, device=model.device if device is None else device, **kwargs)
            self._check_generate_kwargs()
        except BaseException:
            if owns_model:
                model.close()
            raise
        self._owns_model = owns_model

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' own `__call__`, after refusing an empty list of inputs (transformers fails on it with
        `IndexError: list index out of range`).

        Raises:
            `InvalidInputError`: `inputs` is an empty list or tuple.
        """
        if isinstance(inputs, (list, tuple)) and len(inputs) == 0:
            raise InvalidInputError(
                f"pipeline({self._task!r}) got an empty list of inputs; pass one input or a non-empty list of them"
            )
        return super().__call__(inputs, *args, **kwargs)

    def _check_generate_kwargs(self) -> None:
        """Refuses, when the pipeline is built, keywords its `generate()` calls would refuse only on the first input.

        Raises:
            `UnknownOptionError`: a keyword is neither a loader option, a pipeline argument nor a generation flag.
        """
        forward = getattr(self, "_forward_params", None) or {}
        if not self._pipeline_calls_generate or not forward:
            return
        unknown = set(forward) - generation_keywords(self.model)
        if unknown:
            where = f"pipeline({self._task!r})"
            raise unknown_option_error(where, unknown, generation_keywords(self.model), "generation flags")

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


def client_model(
    model: Any,
    task: str,
    client_class: type[HSSEEPreTrainedModel],
    key: EEKey | str | os.PathLike | None,
    endpoints: tuple[str, str] | list[str] | None,
    transport: Transport | None,
    timeout: float | None,
    max_rows: int | None,
    **options: Any,
) -> tuple[HSSEEPreTrainedModel, bool]:
    """A pipeline's client model and whether the pipeline built it (and so closes it).

    Args:
        model: what the user passed as `model=` (a checkpoint, a recorded reference, or a connected client).
        task (`str`): the pipeline task, for messages.
        client_class (`type`): the client class of the task.
        key, endpoints, transport, timeout, max_rows: as in `from_pretrained`.
        options: the other connection options of `from_pretrained` (`client_config`, `verify`, `verify_rows`,
            `precompute`); they only apply when the pipeline builds the client.
    """
    if isinstance(model, client_class):
        passed = (("key", key), ("endpoints", endpoints), ("transport", transport), *options.items())
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
        # The factory passes Hub arguments both to the model stand-in and to the pipeline: the explicit ones win.
        **{**model.load_kwargs, **options},
    )
    return client, True


def checkpoint_tokenizer(model: HSSEEForCausalLM):
    """The tokenizer saved in the EE checkpoint folder the client model was loaded from."""
    folder = model.config.name_or_path
    if not folder:
        raise ValueError(f"cannot tell which tokenizer {type(model).__name__} uses; pass tokenizer=")
    return AutoTokenizer.from_pretrained(folder)
