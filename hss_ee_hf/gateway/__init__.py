"""The OpenAI-compatible gateway: `hss-ee gateway`, an HTTP API on the user's side in front of the two share servers.

It has the client's trust (it holds the key and sees prompts and answers in plaintext) and binds to loopback by
default; see docs/gateway.md for what of OpenAI's API it supports.

* [`create_app`] (`app.py`): the FastAPI routes, errors and server-sent events.
* [`GatewayModel`] (`manager.py`): the one model, its tokenizer and the queue its generations run in.
* `schema.py` (requests) and `wire.py` (OpenAI's response types, SSE framing, errors).
* [`run_gateway`] (`serve.py`): what `hss-ee gateway` (`hss_ee_hf/cli/gateway.py`) runs.

The web stack (`pip install "hss-ee-hf[gateway]"`) is imported on first use of these names, so importing this package
(as `hss-ee --help` does) stays light.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "create_app": "app",
    "GatewayModel": "manager",
    "Prompt": "manager",
    "SamplingParams": "schema",
    "GatewayError": "wire",
    "run_gateway": "serve",
    "GatewayConfigError": "serve",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
