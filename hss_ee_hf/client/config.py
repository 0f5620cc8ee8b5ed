"""`HSSEEConfig`: the client configuration (`model_type="hss_ee"`) that `AutoConfig` knows.

It describes a *client*: which EE checkpoint to load and where its two share servers are. It never holds the key
(see `auto.py` for why this, and not the checkpoint's own architecture config, is what gets registered).
"""

from __future__ import annotations

import os
from typing import Any

from transformers import PreTrainedConfig


class HSSEEConfig(PreTrainedConfig):
    r"""Client configuration: which EE checkpoint to load and which two share servers compute its linear layers.

    It is what `AutoConfig` returns for a folder whose `config.json` says `"model_type": "hss_ee"` (a *client
    folder*, written with `save_pretrained`), and what `AutoModelForCausalLM` maps to the HSS-EE client. The secret
    key is never part of it: pass `key=` when loading.

    Args:
        checkpoint (`str`, *optional*): the EE checkpoint, a local folder (absolute, or relative to the current
            directory) or a Hub repo id. When unset, the path given to `from_pretrained` is the checkpoint.
        endpoints (`list`, *optional*): `host:port` of share server A and share server B; each may be a pool of
            replicas instead (`"a1:port,a2:port"` or a list of addresses).
        timeout (`float`, *optional*): per-call deadline in seconds; unset, the `client_config`'s deadline applies
            (`HSSEEClientConfig.timeout`, 60 s by default).
        max_rows (`int`, *optional*, defaults to 4096): the most rows the client sends in one request.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> from hss_ee_hf import HSSEEConfig
    >>> config = HSSEEConfig(checkpoint="smollm2-ee", endpoints=["10.0.0.1:50051", "10.0.0.2:50051"])
    >>> model = AutoModelForCausalLM.from_config(config, key="smollm2.hss-ee-key")
    ```
    """

    model_type = "hss_ee"

    checkpoint: str | None = None
    endpoints: list[str | list[str]] | None = None
    timeout: float | None = None
    max_rows: int = 4096

    def __post_init__(self, **kwargs: Any) -> None:
        if self.checkpoint is not None:
            self.checkpoint = os.fspath(self.checkpoint)
        if self.endpoints is not None:
            if isinstance(self.endpoints, str) or len(self.endpoints) != 2:
                raise ValueError(
                    "HSSEEConfig.endpoints must be two 'host:port' strings (server A, server B), or two pools of "
                    f"them ('a1:port,a2:port' or a list), got {self.endpoints!r}"
                )
            # A pool stays a list (JSON-serialisable); a single address stays a string.
            self.endpoints = [e if isinstance(e, str) else [str(a) for a in e] for e in self.endpoints]
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"HSSEEConfig.timeout must be positive seconds, got {self.timeout!r}")
        if not (isinstance(self.max_rows, int) and self.max_rows > 0):
            raise ValueError(f"HSSEEConfig.max_rows must be a positive integer, got {self.max_rows!r}")
        super().__post_init__(**kwargs)
