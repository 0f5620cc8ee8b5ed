"""Auto-class registration: `HSSEEConfig` (`model_type="hss_ee"`) and the class `AutoModelForCausalLM` maps it to.

What is registered, and why this and not more:

* An EE checkpoint is an ordinary checkpoint of its original architecture (DESIGN.md §5): its `config.json` says
  `"model_type": "llama"` (or `mistral`, `qwen2`, `gpt2`), and the converter's own verification and the share
  servers load it as such with `AutoConfig` / `AutoModelForCausalLM`. The client class
  [`HSSEEForCausalLM`] is built per checkpoint as a dynamic subclass of that architecture's class, so its
  `config_class` is `LlamaConfig` etc. Registering it with `AutoModelForCausalLM.register(LlamaConfig, ...)` is
  refused by transformers for its own configs unless `exist_ok=True`, and with `exist_ok=True` it would silently
  turn *every* Llama checkpoint in the process into a remote client. That registration is therefore impossible to
  do soundly, and none is made.
* What can be registered soundly is a config of our own: [`HSSEEConfig`] (`model_type="hss_ee"`, registered with
  `AutoConfig.register`) describes a *client*: which EE checkpoint to load and where its two share servers are.
  It never holds the key. [`HSSEEForCausalLMFactory`] is registered for it with
  `AutoModelForCausalLM.register(HSSEEConfig, HSSEEForCausalLMFactory)` (its `config_class` is `HSSEEConfig`, as the
  register rules require); its `from_pretrained` / `_from_config` return the same client model
  `HSSEEForCausalLM.from_pretrained` builds. The natural Auto paths then work:

  ```python
  >>> config = HSSEEConfig(checkpoint="smollm2-ee", endpoints=["hostA:50051", "hostB:50051"])
  >>> model = AutoModelForCausalLM.from_config(config, key="smollm2.hss-ee-key")
  >>> config.save_pretrained("smollm2-client")  # a client folder: config.json with model_type "hss_ee"
  >>> model = AutoModelForCausalLM.from_pretrained("smollm2-client", key="smollm2.hss-ee-key")
  >>> model = AutoModelForCausalLM.from_pretrained("smollm2-ee", config=HSSEEConfig(endpoints=[...]), key=...)
  ```

  The same factory is what `pipeline("hss-ee-text-generation", ...)` builds its model with, so a client folder works
  there too.

Registration happens once, when `hss_ee_hf` is imported ([`register_auto_classes`]); nothing in transformers is
patched.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig

from ..artifacts.key import EEKey
from ..errors import CheckpointError, KeyFileError
from ..transport.base import Transport
from .config import HSSEEConfig
from .modeling import HSSEEForCausalLM, HSSEEPreTrainedModel

logger = logging.getLogger(__name__)

# Keyword arguments transformers' Auto classes and pipeline factory add on their own; the client loader has no use
# for them (it loads no weights and runs in float32 on the CPU).
_FRAMEWORK_KWARGS = (
    "_from_auto",
    "_from_pipeline",
    "_commit_hash",
    "adapter_kwargs",
    "trust_remote_code",
    "code_revision",
    "device_map",
    "low_cpu_mem_usage",
)


def load_client(
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    key: EEKey | str | os.PathLike | None,
    config: PreTrainedConfig | None = None,
    endpoints: tuple[str, str] | list[str] | None = None,
    transport: Transport | None = None,
    timeout: float | None = None,
    max_rows: int | None = None,
    client_class: type[HSSEEPreTrainedModel] = HSSEEForCausalLM,
    **kwargs: Any,
) -> HSSEEPreTrainedModel:
    """Builds the client model for an EE checkpoint or a client folder; what the Auto classes and the pipeline call.

    Args:
        pretrained_model_name_or_path (`str` or `os.PathLike`): an EE checkpoint (folder or Hub id), or a client
            folder whose `config.json` is an [`HSSEEConfig`].
        key (`EEKey` or path): the secret key written by `hss-ee convert`.
        config (`PreTrainedConfig`, *optional*): an [`HSSEEConfig`] with defaults for the arguments below (any
            other config is ignored: the checkpoint's own `config.json` is authoritative).
        endpoints (`tuple[str, str]`, *optional*): `host:port` of share servers A and B; overrides `config.endpoints`.
        transport (`Transport`, *optional*): a ready transport instead of endpoints (e.g. `InProcessTransport`).
        timeout (`float`, *optional*): deadline per call; overrides `config.timeout`, and both override
            `client_config.timeout` (which applies when neither is set).
        max_rows (`int`, *optional*): rows per request; overrides `config.max_rows`.
        client_class (`type`, *optional*, defaults to [`HSSEEForCausalLM`]): the client class of the task
            ([`HSSEEForConditionalGeneration`], [`HSSEEForImageClassification`]).
        kwargs: `revision`, `cache_dir`, `token`, `local_files_only`, and config overrides such as
            `attn_implementation`; keyword arguments transformers' loaders add on their own are dropped.

    Returns:
        The client model (a subclass of `client_class` and of the checkpoint's HF class), in eval mode.

    Raises:
        `KeyFileError`: no key was given, or the key file cannot be read.
        `KeyMismatchError`: the key belongs to another checkpoint.
        `ValueError`: neither endpoints nor a transport were given.
        `CheckpointError`: the path is not an EE checkpoint, or a client folder names none.
    """
    for name in _FRAMEWORK_KWARGS:
        kwargs.pop(name, None)
    dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
    if dtype not in (None, "auto", "float32") and str(dtype) != "torch.float32":
        logger.warning("the HSS-EE client computes in float32; dtype=%s is ignored", dtype)
    if key is None:
        raise KeyFileError(
            "no EE key was given: pass key='path/to/MODEL.hss-ee-key', the secret key `hss-ee convert` wrote "
            "(never inside the checkpoint folder)"
        )
    if isinstance(config, PreTrainedConfig) and not isinstance(config, HSSEEConfig):
        config = None  # an architecture config: the checkpoint's own config.json is read again below
    if config is None:
        config = _client_config_of(pretrained_model_name_or_path)
    checkpoint = os.fspath(pretrained_model_name_or_path)
    if config is not None:
        if config.checkpoint:
            checkpoint = config.checkpoint
        elif config.name_or_path and os.fspath(config.name_or_path) == checkpoint:
            raise CheckpointError(
                f"{checkpoint} is a client folder (model_type 'hss_ee') that names no EE checkpoint; set "
                "`checkpoint` in its config.json (HSSEEConfig.checkpoint) to the EE checkpoint folder or Hub id"
            )
        endpoints = endpoints if endpoints is not None else config.endpoints
        timeout = timeout if timeout is not None else config.timeout
        max_rows = max_rows if max_rows is not None else config.max_rows
        if config.checkpoint:
            # Hub arguments addressed the client folder, not the checkpoint it names.
            kwargs.pop("revision", None)
    if transport is None and endpoints is None:
        raise ValueError(
            "no share servers given: pass endpoints=('hostA:port', 'hostB:port') (two `hss-ee serve` servers run by "
            "parties that do not collude), set HSSEEConfig.endpoints, or pass transport=InProcessTransport("
            "StageEngine(checkpoint)) for a single-machine trial"
        )
    return client_class.from_pretrained(
        checkpoint,
        key=key,
        endpoints=endpoints,
        transport=transport,
        timeout=timeout,
        max_rows=4096 if max_rows is None else max_rows,
        **kwargs,
    )


def _client_config_of(path: str | os.PathLike) -> HSSEEConfig | None:
    """The `HSSEEConfig` of a local client folder; `None` for anything else (an EE checkpoint, a Hub id)."""
    config_file = os.path.join(os.fspath(path), "config.json")
    try:
        with open(config_file, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # not a local folder with a readable config: HSSEEForCausalLM reports what is wrong
    return AutoConfig.from_pretrained(os.fspath(path)) if model_type == HSSEEConfig.model_type else None


class HSSEEForCausalLMFactory:
    """What `AutoModelForCausalLM` maps [`HSSEEConfig`] to; it builds [`HSSEEForCausalLM`] client models.

    It is not a model itself: the model it returns is a subclass of the checkpoint's HF class, which cannot be known
    before the checkpoint's config is read (see the module docstring).

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained("smollm2-client", key="smollm2.hss-ee-key")
    ```
    """

    config_class = HSSEEConfig

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any
    ) -> HSSEEForCausalLM:
        """Loads the client for a client folder or an EE checkpoint; see [`load_client`] for the arguments."""
        if model_args:
            raise TypeError("HSS-EE client models take keyword arguments only (key=..., endpoints=...)")
        return load_client(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _from_config(cls, config: HSSEEConfig, **kwargs: Any) -> HSSEEForCausalLM:
        """Loads the client described by `config` (what `AutoModelForCausalLM.from_config` calls)."""
        if not isinstance(config, HSSEEConfig) or not config.checkpoint:
            raise CheckpointError(
                "AutoModelForCausalLM.from_config needs an HSSEEConfig with `checkpoint` set to the EE checkpoint "
                "folder or Hub id"
            )
        return load_client(config.checkpoint, config=config, **kwargs)


def register_auto_classes() -> None:
    """Registers [`HSSEEConfig`] with `AutoConfig` and [`HSSEEForCausalLMFactory`] with `AutoModelForCausalLM`.

    Called when `hss_ee_hf` is imported; calling it again is harmless.
    """
    AutoConfig.register(HSSEEConfig.model_type, HSSEEConfig, exist_ok=True)
    AutoModelForCausalLM.register(HSSEEConfig, HSSEEForCausalLMFactory, exist_ok=True)
