"""Private `generate()` with an EE checkpoint on two share servers, streaming the reply to stdout.

Start the servers first (on two hosts run by parties that do not collude):

    hss-ee serve smollm2-ee --host 0.0.0.0 --port 50051

then:

    python examples/generate_private.py --checkpoint smollm2-ee --key ~/keys/smollm2.hss-ee-key \
        --endpoints hostA:50051 hostB:50051 --prompt "What is the capital of France?"

`--in-process` instead of `--endpoints` computes both shares in this process (a single-machine trial).
"""

from __future__ import annotations

import argparse
import time

from transformers import AutoTokenizer, TextStreamer

from hss_ee_hf import HSSEEForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="EE checkpoint folder or Hub id")
    parser.add_argument("--key", required=True, help="the secret key file written by `hss-ee convert`")
    servers = parser.add_mutually_exclusive_group(required=True)
    servers.add_argument("--endpoints", nargs=2, metavar=("A", "B"), help="host:port of share servers A and B")
    servers.add_argument("--in-process", action="store_true", help="run both parties in this process (trial)")
    parser.add_argument("--prompt", default="What is the capital of France?", help="the user message")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample (temperature 0.7, top-p 0.9) instead of greedy")
    args = parser.parse_args()

    if args.in_process:
        from hss_ee_hf.server import StageEngine
        from hss_ee_hf.transport import InProcessTransport

        connection = {"transport": InProcessTransport(StageEngine(args.checkpoint))}
    else:
        connection = {"endpoints": tuple(args.endpoints)}
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    with HSSEEForCausalLM.from_pretrained(args.checkpoint, key=args.key, **connection) as model:
        messages = [{"role": "user", "content": args.prompt}]
        if tok.chat_template:
            inputs = tok.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        else:
            inputs = tok(args.prompt, return_tensors="pt")
        sampling = dict(do_sample=True, temperature=0.7, top_p=0.9) if args.sample else dict(do_sample=False)
        start = time.perf_counter()
        out = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True),
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            **sampling,
        )
        seconds = time.perf_counter() - start
        new = out.shape[1] - inputs["input_ids"].shape[1]
        stats = model.hss_ee_stats
        print(
            f"\n[{new} tokens in {seconds:.1f} s ({1000 * seconds / max(new, 1):.0f} ms/token), "
            f"{stats.round_trips} round trips, {(stats.bytes_sent + stats.bytes_received) / 1e6:.1f} MB on the wire]"
        )


if __name__ == "__main__":
    main()
