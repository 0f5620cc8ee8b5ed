"""The `hss-ee` console script: answers `--help` and `--version` without importing hss_ee_hf.

`import hss_ee_hf` registers the client with transformers (a documented contract), which imports torch and
transformers: several seconds. A console script named `hss_ee_hf.cli:main` imports that package first, so even
`hss-ee --help` paid for it. This module sits outside the package: it prints the top-level help and the version
from the standard library alone and hands every other command line to [`hss_ee_hf.cli.main`]. Its help text is
kept identical to the full parser's by `tests/test_misconfig.py`.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata

# (name, one-line help) of every subcommand, in `hss-ee --help` order; the same strings as the Command classes.
COMMANDS = (
    ("convert", "Convert a Hugging Face model into an EE checkpoint and a secret key."),
    (
        "serve",
        "Serve an EE checkpoint as one of the two share servers (gRPC, and stage calls on a binary data plane).",
    ),
    (
        "generate",
        "Generate text privately through two share servers (decoder LLMs and T5 text-to-text models), streaming "
        "tokens to stdout.",
    ),
    (
        "classify",
        "Classify images privately (ResNet, ViT) through two share servers; prints the top labels of each image.",
    ),
    ("push", "Upload an EE checkpoint folder to the Hub with a generated model card (never the secret key)."),
    (
        "demo",
        "Convert the bundled SmolLM2, start two local share servers and compare private with plaintext generation.",
    ),
    (
        "gateway",
        "Serve an EE checkpoint as an OpenAI-compatible HTTP API on this machine (/v1/models, /v1/chat/completions, "
        "/v1/completions). It sees prompts and answers in plaintext, like the client, so it binds to loopback by "
        "default.",
    ),
    ("certs", "Make a private CA and TLS certificates for share servers (--server-name) and clients (--client-name)."),
)
_FAST = (["-h"], ["--help"], ["--version"])


def version() -> str:
    """The installed hss-ee-hf version (`"unknown"` outside an installation)."""
    try:
        return metadata.version("hss-ee-hf")
    except metadata.PackageNotFoundError:
        return "unknown"


def top_level_parser() -> argparse.ArgumentParser:
    """The `hss-ee` parser without subcommand arguments: enough for `--help` and `--version`."""
    parser = argparse.ArgumentParser(
        prog="hss-ee",
        description="Private inference for Hugging Face models on two non-colluding share servers (HSS + EE).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (never secrets)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in COMMANDS:
        sub.add_parser(name, help=text)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hss-ee` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv in _FAST:
        top_level_parser().parse_args(argv)  # prints and exits
    from hss_ee_hf.cli.main import main as full_main

    return full_main(argv)


if __name__ == "__main__":
    sys.exit(main())
