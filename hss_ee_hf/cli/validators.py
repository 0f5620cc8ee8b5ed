"""Argparse value types of `hss-ee`: out-of-range numbers and malformed addresses are usage errors.

Each type raises `argparse.ArgumentTypeError`, so argparse prints `hss-ee CMD: error: argument --flag: ...` and
exits with status 2 before anything is loaded; the message gives the allowed range. Bounds follow transformers'
own `GenerationConfig` checks where it has one (`max_new_tokens > 0`, `temperature > 0`, `0 < top_p <= 1`).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

from ..errors import InvalidConfigError
from ..transport.endpoints import parse_endpoint


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer type accepting `low <= value (<= high)`."""
    span = f">= {low}" if high is None else f"in {low}-{high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {span}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(low: float, high: float | None = None, low_open: bool = False) -> Callable[[str], float]:
    """A finite float type accepting `low <= value` (`low < value` when `low_open`) and `value <= high`."""
    span = ("> " if low_open else ">= ") + f"{low:g}" + ("" if high is None else f" and <= {high:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {span}, got {text!r}") from None
        too_low = value < low or (low_open and value == low)
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be a number {span}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def endpoint(text: str) -> str:
    """A `host:port` type (port 1-65535; IPv6 as `[::1]:50051`)."""
    try:
        parse_endpoint(text)
    except InvalidConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def endpoint_pool(text: str) -> str:
    """One party's servers: a `host:port` or a pool of replicas `h1:port,h2:port` (each checked as [`endpoint`])."""
    for item in text.split(","):
        endpoint(item.strip())
    return text


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """The prompt from the argument, a file, or stdin (`-`); refuses an empty one.

    Raises:
        `InputFileError`: the prompt file cannot be read.
        `InvalidConfigError`: no prompt, both a prompt and a file, or an empty prompt.
    """
    from ..errors import InputFileError

    if (prompt is None) == (prompt_file is None):
        raise InvalidConfigError(
            "pass exactly one of PROMPT or --prompt-file FILE (`--prompt-file -` reads stdin); prefer the file: a "
            "prompt on the command line is visible to other users in `ps` and stays in the shell history"
        )
    if prompt_file == "-":
        text = sys.stdin.read()
    elif prompt_file is not None:
        try:
            with open(prompt_file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise InputFileError(f"cannot read the prompt file {prompt_file} ({err}); check --prompt-file") from err
    else:
        text = prompt
    if not text.strip():
        where = "standard input" if prompt_file == "-" else prompt_file or "PROMPT"
        raise InvalidConfigError(f"the prompt ({where}) is empty; give the text to generate from")
    return text.rstrip("\n") if prompt_file is not None else text
