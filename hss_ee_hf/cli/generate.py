"""`hss-ee generate` and `hss-ee classify`: run a converted model through two share servers from the shell."""

from __future__ import annotations

import logging

from ..artifacts.stages import VISION_FAMILY
from ..errors import CheckpointError, InputFileError
from .args import POOL_HELP
from .base import Command
from .validators import endpoint_pool, float_in, int_in, read_prompt

logger = logging.getLogger("hss_ee_hf")


class GenerateCommand(Command):
    name = "generate"
    help = (
        "Generate text privately through two share servers (decoder LLMs and T5 text-to-text models), streaming "
        "tokens to stdout."
    )

    def add_arguments(self, p):
        p.add_argument("checkpoint", help="EE checkpoint folder or Hub repo id (only client files are fetched)")
        p.add_argument(
            "prompt",
            nargs="?",
            help="the prompt (with --chat: the user message). Visible to other users in `ps` and kept in the shell "
            "history: prefer --prompt-file",
        )
        p.add_argument(
            "--prompt-file",
            metavar="FILE",
            help="read the prompt from FILE, or from standard input with `-`, so it never appears in the process "
            "list or the shell history",
        )
        p.add_argument("--key", required=True, help="the secret key file written by `hss-ee convert`")
        p.add_argument("--endpoints", nargs=2, type=endpoint_pool, required=True, metavar=("A", "B"), help=POOL_HELP)
        p.add_argument("--max-new-tokens", type=int_in(1), default=64, help="tokens to generate, >= 1 (default 64)")
        p.add_argument("--chat", action="store_true", help="wrap PROMPT as a user message with the chat template")
        p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
        p.add_argument(
            "--temperature", type=float_in(0.0, low_open=True), default=1.0, help="temperature > 0 (with --do-sample)"
        )
        p.add_argument("--top-k", type=int_in(0), default=50, help="top-k filtering, 0 for none (with --do-sample)")
        p.add_argument(
            "--top-p", type=float_in(0, 1, low_open=True), default=1.0, help="nucleus mass, (0, 1] (with --do-sample)"
        )
        p.add_argument("--seed", type=int, help="sampling seed (with --do-sample)")
        p.add_argument(
            "--timeout", type=float_in(0.0, low_open=True), default=60.0, help="per-request deadline in seconds, > 0"
        )
        p.add_argument("--revision", help="Hub revision when CHECKPOINT is a repo id")
        p.add_argument("--cache-dir", help="Hub cache folder when CHECKPOINT is a repo id")
        p.add_argument(
            "--verify",
            action="store_true",
            help="Freivalds-check every server reply so a cheating server is detected and named (needs the weights)",
        )
        from .args import add_client_security_args, add_rounds_args

        add_client_security_args(p)
        add_rounds_args(p)

    def run(self, args):
        prompt = read_prompt(args.prompt, args.prompt_file)  # before anything is loaded or dialled
        import torch
        from transformers import AutoConfig, AutoTokenizer, TextStreamer

        from ..client.modeling import HSSEEForCausalLM, HSSEEForConditionalGeneration
        from ..hub.download import resolve_client_files
        from .args import client_config_from_args, rounds_kwargs

        folder = resolve_client_files(args.checkpoint, revision=args.revision, cache_dir=args.cache_dir)
        config = AutoConfig.from_pretrained(folder)
        if config.model_type in VISION_FAMILY:
            raise CheckpointError(f"{args.checkpoint} is an image classifier; use `hss-ee classify` for it")
        client_class = HSSEEForConditionalGeneration if config.is_encoder_decoder else HSSEEForCausalLM
        tok = AutoTokenizer.from_pretrained(folder)
        load_kwargs, gen_kwargs = rounds_kwargs(args) if client_class is HSSEEForCausalLM else ({}, {})
        with client_class.from_pretrained(
            args.checkpoint,
            key=args.key,
            endpoints=args.endpoints,
            timeout=args.timeout,
            client_config=client_config_from_args(args),
            verify=args.verify,
            revision=args.revision,
            cache_dir=args.cache_dir,
            **load_kwargs,
        ) as model:
            if args.chat:
                messages = [{"role": "user", "content": prompt}]
                inputs = tok.apply_chat_template(
                    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
                )
            else:
                inputs = tok(prompt, return_tensors="pt")
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
                **gen_kwargs,
            )
        return 0


class ClassifyCommand(Command):
    name = "classify"
    help = "Classify images privately (ResNet, ViT) through two share servers; prints the top labels of each image."

    def add_arguments(self, p):
        p.add_argument("checkpoint", help="EE checkpoint folder or Hub repo id (only client files are fetched)")
        p.add_argument("images", nargs="+", help="image files (any format Pillow reads)")
        p.add_argument("--key", required=True, help="the secret key file written by `hss-ee convert`")
        p.add_argument("--endpoints", nargs=2, type=endpoint_pool, required=True, metavar=("A", "B"), help=POOL_HELP)
        p.add_argument("--top-k", type=int_in(1), default=5, help="labels to print per image, >= 1 (default 5)")
        p.add_argument(
            "--timeout", type=float_in(0.0, low_open=True), default=60.0, help="per-request deadline in seconds, > 0"
        )
        p.add_argument("--revision", help="Hub revision when CHECKPOINT is a repo id")
        p.add_argument("--cache-dir", help="Hub cache folder when CHECKPOINT is a repo id")
        from .args import add_client_security_args

        add_client_security_args(p)

    def run(self, args):
        from pathlib import Path

        from ..client.modeling import HSSEEForImageClassification
        from ..pipelines.image_classification import HSSEEImageClassificationPipeline
        from .args import client_config_from_args

        missing = [image for image in args.images if not Path(image).is_file()]
        if missing:
            raise InputFileError(f"image file(s) not found: {', '.join(missing)}")
        empty = [image for image in args.images if Path(image).stat().st_size == 0]
        if empty:  # Pillow's own message for these ("cannot identify image file") does not say why
            raise InputFileError(f"image file(s) empty (0 bytes): {', '.join(empty)}; pass the images themselves")
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
