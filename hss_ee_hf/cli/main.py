"""The `hss-ee` command line: convert, serve, generate, classify, push and demo.

Each subcommand is a small class that adds its arguments and runs; `hss-ee COMMAND --help`
explains every flag.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import HSSEEError
from .base import Command
from .generate import ClassifyCommand, GenerateCommand
from .validators import float_in, int_in
from .version import package_version

logger = logging.getLogger("hss_ee_hf")


class ConvertCommand(Command):
    name = "convert"
    help = "Convert a Hugging Face model into an EE checkpoint and a secret key."

    def add_arguments(self, p):
        p.add_argument(
            "src", help="source model: a local HF folder, a .gguf file, or a Hub id already in the local cache"
        )
        p.add_argument("out", help="output folder for the EE checkpoint (public: copy it to both servers)")
        p.add_argument("--key", required=True, help="path of the secret key file to write (mode 0600, outside OUT)")
        p.add_argument("--gguf-file", help="GGUF file name inside the folder SRC (transformers' gguf_file)")
        p.add_argument("--revision", help="Hub revision when SRC is a Hub id")
        p.add_argument("--cache-dir", help="Hub cache folder when SRC is a Hub id")
        p.add_argument("--force", action="store_true", help="overwrite an existing OUT folder and key file")
        p.add_argument(
            "--no-verify",
            action="store_true",
            help="skip the equivariance check (only when the model does not fit in memory twice)",
        )
        p.add_argument("--frac-bits", type=int, default=16, help="fixed-point fractional bits f (default 16)")
        p.add_argument("--weight-bits", type=int, default=16, help="bits of the integer weights (default 16)")
        p.add_argument(
            "--base-model", help="Hub id of the original model, recorded for model cards (default: SRC if a Hub id)"
        )
        p.add_argument("--license", help="license of the original model, recorded for model cards")
        p.add_argument(
            "--push-to-hub",
            metavar="REPO_ID",
            help="after converting, push the EE checkpoint (never the key) to this repo",
        )
        p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")

    def run(self, args):
        from hss_ee_conversion import convert

        from ..ring.fixed_point import RingConfig

        result = convert(
            args.src,
            args.out,
            args.key,
            gguf_file=args.gguf_file,
            revision=args.revision,
            cache_dir=args.cache_dir,
            force=args.force,
            verify=not args.no_verify,
            ring=RingConfig(frac_bits=args.frac_bits, weight_bits=args.weight_bits),
            base_model=args.base_model,
            license=args.license,
        )
        print(f"EE checkpoint: {result.output}")
        print(f"secret key:    {result.key_path} (keep it; never copy it to a server)")
        print(f"fingerprint:   {result.fingerprint}")
        if result.max_abs_logit_diff is not None:
            rel = result.max_rel_logit_diff
            print(f"equivariance:  max |dlogit| = {result.max_abs_logit_diff:.3g} (relative {rel:.3g})")
        print(f"time:          {result.seconds:.1f} s")
        if args.push_to_hub:
            from ..hub.upload import push_to_hub

            url = push_to_hub(result.output, args.push_to_hub, private=args.private)
            print(f"pushed:        {url}")
        return 0


class ServeCommand(Command):
    name = "serve"
    help = "Serve an EE checkpoint as one of the two share servers (gRPC, and stage calls on a binary data plane)."

    def add_arguments(self, p):
        p.add_argument("checkpoint", help="EE checkpoint folder or Hub repo id (server weights are downloaded)")
        p.add_argument(
            "--port", type=int_in(0, 65535), default=50051, help="TCP port, 0-65535 (default 50051; 0 picks one)"
        )
        p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
        p.add_argument(
            "--data-port",
            type=int_in(0, 65535),
            default=None,
            help="TCP port of the data plane (stage calls as binary frames, same TLS and tokens; clients learn it "
            "from Describe, so open it in the firewall too). Default: PORT + 1, or a free one when PORT is 0",
        )
        p.add_argument(
            "--no-data-plane",
            action="store_true",
            help="serve stage calls over gRPC only (one port; slower: a few hundred microseconds more per call)",
        )
        p.add_argument(
            "--device",
            default="cpu",
            help="where the weights live: cpu, cuda (stages spread over all GPUs by size), cuda:N or auto ",
        )
        p.add_argument(
            "--max-rows",
            type=int_in(1),
            default=None,
            help="most rows (tokens) one request may carry (default: 8192, or fewer if the widest stage needs it)",
        )
        p.add_argument(
            "--workers",
            type=int_in(1),
            default=32,
            help="gRPC worker threads (default 32). Each client session's open stage stream holds one; a quarter "
            "(at least two) stay free for unary calls. The data plane takes twice as many connections",
        )
        p.add_argument(
            "--threads",
            type=int_in(1),
            help="torch compute threads (default: torch's choice; use 1 when client and servers share a few cores)",
        )
        p.add_argument("--revision", help="Hub revision when CHECKPOINT is a repo id")
        p.add_argument("--cache-dir", help="Hub cache folder when CHECKPOINT is a repo id")
        p.add_argument("--token", help="Hub token for a private repo (default: the logged-in token)")
        p.add_argument(
            "--batch-window-ms",
            type=float_in(0.0),
            default=0.0,
            help="batch concurrent sessions' requests for one stage arriving within this many ms (default 0: off)",
        )
        p.add_argument(
            "--kernel",
            choices=["auto", "native", "float64", "int8"],
            default=None,
            help="ring kernel: native (CPU: 2-byte weights, AVX-512 VNNI or AVX2, built once with the system C "
            "compiler), int8 (2-byte weights as two int8 limbs, torch._int_mm on tensor cores), float64 (three "
            "22-bit limbs through float64 GEMM), or auto: int8 on CUDA, native on CPU when it builds (default: "
            "$HSS_EE_KERNEL or auto)",
        )
        p.add_argument(
            "--operator",
            default="",
            help="who runs this server, reported to clients (they refuse two parties of one operator)",
        )
        p.add_argument(
            "--trust-checkpoint",
            action="store_true",
            help="skip recomputing the weights' fingerprint and checking the shards against config.json at start "
            "(saves about a second per GB; only for a checkpoint verified before)",
        )
        from .args import add_server_security_args, parse_schedules

        p.add_argument(
            "--schedules",
            type=parse_schedules,
            default=(4,),
            help="stages per decoder layer offered: 4, or 4,2 to also build the fused two-stage weights at load time "
            "(~1.9x weight memory and multiply-adds for clients that ask for half the round trips; default 4)",
        )
        add_server_security_args(p)

    def run(self, args):
        import torch

        from ..hub.download import resolve_server_files
        from ..server.grpc_server import serve
        from .args import server_security_from_args

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        folder = resolve_server_files(
            args.checkpoint, revision=args.revision, cache_dir=args.cache_dir, token=args.token
        )
        serve(
            folder,
            host=args.host,
            port=args.port,
            device=args.device,
            max_rows=args.max_rows,
            max_workers=args.workers,
            security=server_security_from_args(args),
            batch_window_ms=args.batch_window_ms,
            kernel=args.kernel,
            schedules=args.schedules,
            operator=args.operator,
            trust_checkpoint=args.trust_checkpoint,
            data_port=args.data_port,
            data_plane=not args.no_data_plane,
        )
        return 0


class DemoCommand(Command):
    name = "demo"
    help = "Convert the bundled SmolLM2, start two local share servers and compare private with plaintext generation."

    def add_arguments(self, p):
        p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per prompt (default 32)")
        p.add_argument("--cache-dir", help="where the converted demo model and its key are kept (default: user cache)")
        p.add_argument("--reconvert", action="store_true", help="convert again even if a cached conversion exists")

    def run(self, args):
        from .demo import run_demo

        return run_demo(max_new_tokens=args.max_new_tokens, cache_dir=args.cache_dir, reconvert=args.reconvert)


def _commands() -> tuple[Command, ...]:
    from .certs import CertsCommand
    from .gateway import GatewayCommand
    from .push import PushCommand

    return (
        ConvertCommand(),
        ServeCommand(),
        GenerateCommand(),
        ClassifyCommand(),
        PushCommand(),
        DemoCommand(),
        GatewayCommand(),
        CertsCommand(),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hss-ee",
        description="Private inference for Hugging Face models on two non-colluding share servers (HSS + EE).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (never secrets)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _commands():
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(handler=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hss-ee` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("hss_ee_hf").setLevel(logging.INFO)
    logging.getLogger("hss_ee_conversion").setLevel(logging.INFO)
    try:
        return args.handler.run(args)
    except HSSEEError as err:
        print(f"hss-ee {args.command}: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hss-ee {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
