"""The keyword arguments a client loader accepts, and the error an unknown one gets.

`from_pretrained` passes keyword arguments it does not know to the checkpoint's config (overrides such as
`use_cache=False`); transformers 5 silently drops those that are no config field, so a misspelt option (`verfy=True`)
or an option of another hss-ee-hf version used to be accepted and ignored. Now an unknown keyword raises
[`UnknownOptionError`] naming the closest valid ones.

[`LOADER_OPTIONS`] is the one table of the loaders' own options: `from_pretrained`'s keyword parameters (a test
keeps the two equal), which the pipelines also route to the loader. A new option is one line here.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import threading
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import UnknownOptionError

LOADER_OPTIONS: dict[str, str] = {
    "key": "the secret EE key (`EEKey` or the path `hss-ee convert` wrote)",
    "endpoints": "`host:port` of share servers A and B",
    "transport": "a ready transport instead of endpoints (e.g. `InProcessTransport`)",
    "client_config": "TLS, bearer token, deadline and retries (`HSSEEClientConfig`)",
    "timeout": "per-call deadline in seconds",
    "verify": "Freivalds-check every server reply",
    "verify_rows": "secret check rows of `verify`",
    "max_rows": "the most rows sent in one request",
    "precompute": "ask party A for its products ahead of time",
    "stages_per_layer": 'round trips per decoder layer: 4, 2 (fused stages; the servers must offer them) or "auto"',
    "revision": "Hub revision",
    "cache_dir": "Hub cache folder",
    "token": "Hub token",
    "local_files_only": "never download",
    "attn_implementation": "the client's attention kernel (`eager`, `sdpa`)",
}


def unknown_option_error(
    where: str, unknown: Iterable[str], valid: Iterable[str], fields_of: str
) -> UnknownOptionError:
    """An [`UnknownOptionError`] for keywords `where` cannot use, with the closest valid names and all options.

    Args:
        where (`str`): the call, e.g. `"HSSEEForCausalLM.from_pretrained()"`.
        unknown (`Iterable[str]`): the keywords refused.
        valid (`Iterable[str]`): the other names that would have been accepted (config fields, generation flags).
        fields_of (`str`): what `valid` are, e.g. `"fields of LlamaConfig"`.
    """
    unknown, valid = sorted(unknown), set(valid)
    candidates = sorted(valid | set(LOADER_OPTIONS))
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, candidates, n=2, cutoff=0.75)
        if close:
            hints.append(f"{name!r}: did you mean {' or '.join(repr(c) for c in close)}?")
    names = ", ".join(repr(n) for n in unknown)
    return UnknownOptionError(
        f"{where} got unknown keyword argument{'s' if len(unknown) > 1 else ''} {names}. "
        + (" ".join(hints) + " " if hints else "")
        + f"It is neither an hss-ee-hf option ({', '.join(LOADER_OPTIONS)}) nor one of the {fields_of}. "
        "An option of a newer hss-ee-hf needs that version: upgrade with `pip install -U hss-ee-hf`"
    )


def generation_keywords(model: Any) -> set[str]:
    """Every keyword `model.generate()` uses: generation-config fields, `generate()`'s parameters and model inputs."""
    names = set(model.generation_config.to_dict())
    for fn in (model.generate, model.forward):
        names |= set(inspect.signature(fn).parameters)
    return names


@contextmanager
def torch_threads(threads: int | None):
    """Runs the block at `threads` torch threads (restored after); `None`, or no fewer than now, changes nothing."""
    before = torch.get_num_threads()
    if threads is None or threads >= before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def place_forward_passes(model) -> None:
    """Runs each top-level forward pass of `model` as `generate()` runs: at `model.hss_ee_client_threads` torch
    threads and, when both servers share this machine, on one core with party B's thread (`colocation.py`).

    Used for models called directly (image classifiers); hooks rather than a `forward` override, so transformers still
    reads the checkpoint class's own `forward` signature.
    """
    local = threading.local()

    def enter(module, args, kwargs):
        stack = contextlib.ExitStack()
        stack.enter_context(torch_threads(model.hss_ee_client_threads))
        stack.enter_context(model.hss_ee_client.transport.pinned())
        local.__dict__.setdefault("stacks", []).append(stack)

    def leave(module, args, kwargs, output):
        stacks = local.__dict__.get("stacks")
        if stacks:
            stacks.pop().close()

    model.register_forward_pre_hook(enter, with_kwargs=True)
    model.register_forward_hook(leave, with_kwargs=True, always_call=True)
