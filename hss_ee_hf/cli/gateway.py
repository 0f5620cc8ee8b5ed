"""`hss-ee gateway`: the subcommand's flags. Nothing heavy is imported until it runs, so `hss-ee --help` stays fast."""

from __future__ import annotations

import argparse

from .args import POOL_HELP
from .base import Command


class GatewayCommand(Command):
    name = "gateway"
    help = (
        "Serve an EE checkpoint as an OpenAI-compatible HTTP API on this machine (/v1/models, /v1/chat/completions, "
        "/v1/completions). It sees prompts and answers in plaintext, like the client, so it binds to loopback by "
        "default."
    )

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("checkpoint", help="EE checkpoint folder or Hub repo id (only client files are fetched)")
        p.add_argument("--key", required=True, help="the secret key file written by `hss-ee convert`")
        p.add_argument("--endpoints", nargs=2, required=True, metavar=("A", "B"), help=POOL_HELP)
        p.add_argument(
            "--host",
            default="127.0.0.1",
            help="address to bind (default 127.0.0.1, this machine only). Any other address exposes plaintext "
            "prompts and answers to whoever can reach it: use --api-key-file and a TLS proxy",
        )
        p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default 8000; 0 picks one)")
        p.add_argument(
            "--api-key-file",
            help="file holding the API key clients must send as `Authorization: Bearer KEY` (default: no key; a "
            "warning is logged when --host is not loopback). Never pass a key inline",
        )
        p.add_argument(
            "--model-name",
            help="the model id clients send in `model` and /v1/models lists (default: the checkpoint folder's name, "
            "or the repo id)",
        )
        p.add_argument(
            "--max-tokens",
            type=int,
            default=1024,
            help="new tokens for a chat request that sets no max_tokens (default 1024, within the context window)",
        )
        p.add_argument(
            "--max-queue",
            type=int,
            default=64,
            help="requests queued or running at once (default 64); generations run one at a time, more get HTTP 429",
        )
        p.add_argument("--timeout", type=float, default=60.0, help="per-call deadline for the share servers (s)")
        p.add_argument(
            "--threads",
            type=int,
            help="torch compute threads of the client (default: torch's choice)",
        )
        p.add_argument(
            "--verify",
            action="store_true",
            help="Freivalds-check every server reply so a cheating server is detected and named (needs the weights)",
        )
        p.add_argument("--revision", help="Hub revision when CHECKPOINT is a repo id")
        p.add_argument("--cache-dir", help="Hub cache folder when CHECKPOINT is a repo id")
        from .args import add_client_security_args  # the share servers' TLS and token, as `hss-ee generate`

        add_client_security_args(p)

    def run(self, args: argparse.Namespace) -> int:
        from ..gateway.serve import run_gateway
        from .args import client_config_from_args

        return run_gateway(
            args.checkpoint,
            key=args.key,
            endpoints=tuple(args.endpoints),
            host=args.host,
            port=args.port,
            api_key_file=args.api_key_file,
            model_name=args.model_name,
            max_tokens=args.max_tokens,
            max_queue=args.max_queue,
            threads=args.threads,
            verify=args.verify,
            client_config=client_config_from_args(args),
            revision=args.revision,
            cache_dir=args.cache_dir,
            verbose=getattr(args, "verbose", False),
        )
