"""`pipeline("hss-ee-text-generation")`: the text-generation pipeline, with the model on two share servers.

    python examples/pipeline_private.py --checkpoint smollm2-ee --key ~/keys/smollm2.hss-ee-key \
        --endpoints hostA:50051 hostB:50051

It answers a chat and continues a plain prompt; the outputs have exactly the structure
`pipeline("text-generation")` returns. `--in-process` instead of `--endpoints` runs both parties here (a trial).
"""

from __future__ import annotations

import argparse

from transformers import pipeline

import hss_ee_hf  # noqa: F401 - registers the "hss-ee-text-generation" task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="EE checkpoint folder or Hub id")
    parser.add_argument("--key", required=True, help="the secret key file written by `hss-ee convert`")
    servers = parser.add_mutually_exclusive_group(required=True)
    servers.add_argument("--endpoints", nargs=2, metavar=("A", "B"), help="host:port of share servers A and B")
    servers.add_argument("--in-process", action="store_true", help="run both parties in this process (trial)")
    parser.add_argument("--chat", default="Write a haiku about the sea.", help="a user message")
    parser.add_argument("--prompt", default="The three primary colors are", help="a plain prompt to continue")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    if args.in_process:
        from hss_ee_hf.server import StageEngine
        from hss_ee_hf.transport import InProcessTransport

        connection = {"transport": InProcessTransport(StageEngine(args.checkpoint))}
    else:
        connection = {"endpoints": tuple(args.endpoints)}
    with pipeline("hss-ee-text-generation", model=args.checkpoint, key=args.key, **connection) as generator:
        settings = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
        if generator.tokenizer.chat_template:
            reply = generator([{"role": "user", "content": args.chat}], **settings)
            print(f"User: {args.chat}\nAssistant: {reply[0]['generated_text'][-1]['content'].strip()}\n")
        completion = generator(args.prompt, **settings)
        print(completion[0]["generated_text"])


if __name__ == "__main__":
    main()
