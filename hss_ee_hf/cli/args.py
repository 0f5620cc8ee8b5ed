"""Argparse helpers that give `hss-ee serve`, `generate` and `classify` the same transport-security flags."""

from __future__ import annotations

import argparse
import os

from ..server.security import HSSEEServerSecurity
from ..transport.config import DEFAULT_RETRIES, DEFAULT_TIMEOUT, TOKEN_ENV, HSSEEClientConfig
from .validators import int_in

POOL_HELP = "host:port of server A and of server B; a pool of replicas of one party is written h1:port,h2:port"


def add_server_security_args(parser: argparse.ArgumentParser) -> None:
    """Adds `--tls-cert`, `--tls-key`, `--tls-client-ca` and `--token-file` to a server's parser.

    Example:

    ```python
    >>> add_server_security_args(parser)
    >>> security = server_security_from_args(parser.parse_args())
    ```
    """
    group = parser.add_argument_group("transport security")
    group.add_argument("--tls-cert", help="PEM certificate chain of this server (enables TLS; needs --tls-key)")
    group.add_argument("--tls-key", help="PEM private key of --tls-cert (keep it mode 0600)")
    group.add_argument(
        "--tls-client-ca", help="PEM CA of client certificates: clients must present one it signed (mutual TLS)"
    )
    group.add_argument(
        "--token-file", help="file of accepted bearer tokens, one per line; calls without one are refused"
    )


def server_security_from_args(args: argparse.Namespace) -> HSSEEServerSecurity | None:
    """Builds the server's security settings from `add_server_security_args` flags (`None` when all unset)."""
    values = {
        "tls_cert": getattr(args, "tls_cert", None),
        "tls_key": getattr(args, "tls_key", None),
        "tls_client_ca": getattr(args, "tls_client_ca", None),
        "token_file": getattr(args, "token_file", None),
    }
    if all(v is None for v in values.values()):
        return None
    return HSSEEServerSecurity(**values)


def add_client_security_args(parser: argparse.ArgumentParser) -> None:
    """Adds `--tls`, `--tls-ca`, `--tls-cert`, `--tls-key`, `--tls-server-name`, `--token-file` and `--retries`.

    A `--timeout` flag, when the parser has one, is read by [`client_config_from_args`] too. The token may also
    come from the `HSS_EE_TOKEN` environment variable.
    """
    group = parser.add_argument_group("transport security")
    group.add_argument("--tls", action="store_true", help="use TLS with the system's trusted roots")
    group.add_argument("--tls-ca", help="PEM CA that signed the servers' certificates (enables TLS)")
    group.add_argument("--tls-cert", help="PEM client certificate for mutual TLS (needs --tls-key)")
    group.add_argument("--tls-key", help="PEM private key of --tls-cert")
    group.add_argument(
        "--tls-server-name",
        help="name expected in the servers' certificates, if not the host (NAME_A,NAME_B: one per party)",
    )
    group.add_argument(
        "--token-file", help=f"file holding the bearer token (or set {TOKEN_ENV}); never pass a token inline"
    )
    group.add_argument(
        "--retries",
        type=int_in(0),
        default=DEFAULT_RETRIES,
        help=f"retries of an unavailable server (default {DEFAULT_RETRIES})",
    )


def client_config_from_args(args: argparse.Namespace) -> HSSEEClientConfig:
    """Builds an [`HSSEEClientConfig`] from `add_client_security_args` flags (and `--timeout` if present)."""
    token_file = getattr(args, "token_file", None)
    token = os.environ.get(TOKEN_ENV) if token_file is None else None
    return HSSEEClientConfig(
        tls=bool(getattr(args, "tls", False)),
        tls_ca_cert=getattr(args, "tls_ca", None),
        tls_client_cert=getattr(args, "tls_cert", None),
        tls_client_key=getattr(args, "tls_key", None),
        tls_server_name=getattr(args, "tls_server_name", None),
        token=token or None,
        token_file=token_file,
        # `is None`, not `or`: a zero timeout must be refused by the config, never replaced by the default.
        timeout=DEFAULT_TIMEOUT if getattr(args, "timeout", None) is None else args.timeout,
        retries=getattr(args, "retries", DEFAULT_RETRIES),
    )


def parse_schedules(text: str) -> tuple[int, ...]:
    """`"4,2"` -> `(4, 2)` for `hss-ee serve --schedules` (4 must be among them)."""
    try:
        schedules = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--schedules takes a comma-separated list like 4,2, got {text!r}") from None
    if 4 not in schedules or any(s not in (4, 2) for s in schedules):
        raise argparse.ArgumentTypeError(f"--schedules must be 4 or 4,2, got {text!r}")
    return schedules


def add_rounds_args(parser: argparse.ArgumentParser) -> None:
    """`hss-ee generate` options that trade server work for fewer round trips."""
    parser.add_argument(
        "--stages-per-layer",
        default="4",
        choices=["4", "2", "auto"],
        help="round trips per decoder layer: 4, 2 (servers started with --schedules 4,2; ~1.9x server work for half "
        "the round trips) or auto (measured at connect time; default 4)",
    )
    drafting = parser.add_mutually_exclusive_group()
    drafting.add_argument(
        "--prompt-lookup",
        type=int,
        metavar="K",
        help="draft K tokens per pass by prompt lookup and verify them in one pass (greedy output unchanged)",
    )
    drafting.add_argument(
        "--draft-model",
        metavar="PATH",
        help="a local plaintext draft model with the same tokenizer (runs on this machine) for assisted generation",
    )
    parser.add_argument(
        "--draft-tokens", type=int, default=4, help="tokens a --draft-model drafts per pass (default 4)"
    )


def rounds_kwargs(args: argparse.Namespace) -> tuple[dict, dict]:
    """`(from_pretrained kwargs, generate kwargs)` of the options of [`add_rounds_args`]."""
    spl = args.stages_per_layer if args.stages_per_layer == "auto" else int(args.stages_per_layer)
    gen: dict = {}
    if args.prompt_lookup is not None:
        gen["prompt_lookup_num_tokens"] = args.prompt_lookup
    elif args.draft_model is not None:
        from transformers import AutoModelForCausalLM

        gen["assistant_model"] = AutoModelForCausalLM.from_pretrained(args.draft_model).eval()
        gen["num_assistant_tokens"] = args.draft_tokens
    return {"stages_per_layer": spl}, gen
