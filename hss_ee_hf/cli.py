"""The `hss-ee` command line: convert, serve, generate, classify, push and demo.

Each subcommand is a small class that adds its arguments and runs; `hss-ee COMMAND --help`
explains every flag.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .commands import Command
from .errors import CheckpointError, HSSEEError, InputFileError
from .stages import VISION_FAMILY

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

        from .ring import RingConfig

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
            from .push import push_to_hub

            url = push_to_hub(result.output, args.push_to_hub, private=args.private)
            print(f"pushed:        {url}")
        return 0


class ServeCommand(Command):
    name = "serve"
    help = "Serve an EE checkpoint as one of the two share servers (gRPC, and stage calls on a binary data plane)."

    def add_arguments(self, p):
        p.add_argument("checkpoint", help="EE checkpoint folder or Hub repo id (server weights are downloaded)")
        p.add_argument("--port", type=int, default=50051, help="TCP port to listen on (default 50051; 0 picks one)")
        p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
        p.add_argument(
            "--data-port",
            type=int,
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
            "--device", default="cpu", help="where the weights live: cpu, cuda, cuda:N or auto (default cpu)"
        )
        p.add_argument(
            "--max-rows",
            type=int,
            default=None,
            help="most rows (tokens) one request may carry (default: 8192, or fewer if the widest stage needs it)",
        )
        p.add_argument(
            "--workers",
            type=int,
            default=32,
            help="gRPC worker threads (default 32). Each client session's open stage stream holds one; a quarter "
            "(at least two) stay free for unary calls. The data plane takes twice as many connections",
        )
        p.add_argument(
            "--threads",
            type=int,
            help="torch compute threads (default: torch's choice; use 1 when client and servers share a few cores)",
        )
        p.add_argument("--revision", help="Hub revision when CHECKPOINT is a repo id")
        p.add_argument("--cache-dir", help="Hub cache folder when CHECKPOINT is a repo id")
        p.add_argument("--token", help="Hub token for a private repo (default: the logged-in token)")
        p.add_argument(
            "--batch-window-ms",
            type=float,
            default=0.0,
            help="batch concurrent sessions' requests for one stage arriving within this many ms (default 0: off)",
        )
        p.add_argument(
            "--kernel",
            choices=["auto", "native", "float64"],
            default=None,
            help="CPU ring kernel: native (2-byte weights, AVX2, built once with the system C compiler), float64 "
            "(three 22-bit limbs through float64 GEMM), or auto: native when it builds (default: $HSS_EE_KERNEL "
            "or auto)",
        )
        from .security import add_server_security_args

        add_server_security_args(p)

    def run(self, args):
        import torch

        from .hub import resolve_server_files
        from .security import server_security_from_args
        from .server import serve

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
            data_port=args.data_port,
            data_plane=not args.no_data_plane,
        )
        return 0


class GenerateCommand(Command):
    name = "generate"
    help = (
        "Generate text privately through two share servers (decoder LLMs and T5 text-to-text models), streaming "
        "tokens to stdout."
    )

    def add_arguments(self, p):
        p.add_argument("checkpoint", help="EE checkpoint folder or Hub repo id (only client files are fetched)")
        p.add_argument("prompt", help="the prompt (with --chat: the user message)")
        p.add_argument("--key", required=True, help="the secret key file written by `hss-ee convert`")
        p.add_argument("--endpoints", nargs=2, required=True, metavar=("A", "B"), help="host:port of servers A and B")
        p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
        p.add_argument("--chat", action="store_true", help="wrap PROMPT as a user message with the chat template")
        p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
        p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
        p.add_argument("--top-k", type=int, default=50, help="top-k filtering (with --do-sample)")
        p.add_argument("--top-p", type=float, default=1.0, help="nucleus filtering (with --do-sample)")
        p.add_argument("--seed", type=int, help="sampling seed (with --do-sample)")
        p.add_argument("--timeout", type=float, default=60.0, help="per-request deadline in seconds")
        p.add_argument("--revision", help="Hub revision when CHECKPOINT is a repo id")
        p.add_argument("--cache-dir", help="Hub cache folder when CHECKPOINT is a repo id")
        p.add_argument(
            "--verify",
            action="store_true",
            help="Freivalds-check every server reply so a cheating server is detected and named (needs the weights)",
        )
        from .security import add_client_security_args

        add_client_security_args(p)

    def run(self, args):
        import torch
        from transformers import AutoConfig, AutoTokenizer, TextStreamer

        from .hub import resolve_client_files
        from .modeling import HSSEEForCausalLM, HSSEEForConditionalGeneration
        from .security import client_config_from_args

        folder = resolve_client_files(args.checkpoint, revision=args.revision, cache_dir=args.cache_dir)
        config = AutoConfig.from_pretrained(folder)
        if config.model_type in VISION_FAMILY:
            raise CheckpointError(f"{args.checkpoint} is an image classifier; use `hss-ee classify` for it")
        client_class = HSSEEForConditionalGeneration if config.is_encoder_decoder else HSSEEForCausalLM
        tok = AutoTokenizer.from_pretrained(folder)
        with client_class.from_pretrained(
            args.checkpoint,
            key=args.key,
            endpoints=args.endpoints,
            timeout=args.timeout,
            client_config=client_config_from_args(args),
            verify=args.verify,
            revision=args.revision,
            cache_dir=args.cache_dir,
        ) as model:
            if args.chat:
                messages = [{"role": "user", "content": args.prompt}]
                inputs = tok.apply_chat_template(
                    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
                )
            else:
                inputs = tok(args.prompt, return_tensors="pt")
            if args.seed is not None:
                torch.manual_seed(args.seed)  # HF sampling draws from torch's generator; nothing secret
            sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p) if args.do_sample else {}
            model.generate(
                **inputs,
                max_new_tokens=args.max_new_tokens,
                do_sample=args.do_sample,
                streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True),
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                **sampling,
            )
        return 0


class ClassifyCommand(Command):
    name = "classify"
    help = "Classify images privately (ResNet, ViT) through two share servers; prints the top labels of each image."

    def add_arguments(self, p):
        p.add_argument("checkpoint", help="EE checkpoint folder or Hub repo id (only client files are fetched)")
        p.add_argument("images", nargs="+", help="image files (any format Pillow reads)")
        p.add_argument("--key", required=True, help="the secret key file written by `hss-ee convert`")
        p.add_argument("--endpoints", nargs=2, required=True, metavar=("A", "B"), help="host:port of servers A and B")
        p.add_argument("--top-k", type=int, default=5, help="labels to print per image (default 5)")
        p.add_argument("--timeout", type=float, default=60.0, help="per-request deadline in seconds")
        p.add_argument("--revision", help="Hub revision when CHECKPOINT is a repo id")
        p.add_argument("--cache-dir", help="Hub cache folder when CHECKPOINT is a repo id")
        from .security import add_client_security_args

        add_client_security_args(p)

    def run(self, args):
        from pathlib import Path

        from .image_pipeline import HSSEEImageClassificationPipeline
        from .modeling import HSSEEForImageClassification
        from .security import client_config_from_args

        missing = [image for image in args.images if not Path(image).is_file()]
        if missing:
            raise InputFileError(f"image file(s) not found: {', '.join(missing)}")
        with HSSEEForImageClassification.from_pretrained(
            args.checkpoint,
            key=args.key,
            endpoints=args.endpoints,
            timeout=args.timeout,
            client_config=client_config_from_args(args),
            revision=args.revision,
            cache_dir=args.cache_dir,
        ) as model:
            classify = HSSEEImageClassificationPipeline(model)
            for image, rows in zip(args.images, classify(list(args.images), top_k=args.top_k), strict=True):
                print(image)
                for row in rows:
                    print(f"  {row['score']:.4f}  {row['label']}")
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
    from .push import PushCommand

    return (ConvertCommand(), ServeCommand(), GenerateCommand(), ClassifyCommand(), PushCommand(), DemoCommand())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hss-ee",
        description="Private inference for Hugging Face models on two non-colluding share servers (HSS + EE).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (never secrets)")
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
