"""Secure vs plaintext `generate()` in the same run: decode ms/token, prefill, bytes, round trips, breakdown.

Usage:

    python bench/decode.py --model smollm2 --tokens 64
    python bench/decode.py --model gpt2-small --tokens 32 --prefill 128

Plaintext is transformers' `generate()` of the original model; secure is `generate()` of
`HSSEEForCausalLM` through two `hss-ee serve` processes on loopback, with default settings unless flags say
otherwise (stage calls on the servers' data planes, gRPC for the rest). Both run greedy on the same
prompt with `min_new_tokens == max_new_tokens`, so they produce the same number of tokens. Decode
ms/token is `(t(N + 1 tokens) - t(1 token)) / N`, which removes prefill from the figure.

Plaintext and secure decoding alternate `--repeats` times in one process (the machine's load then weighs on
both alike); each round prints its ratio and the `decode` line gives the medians.

`overhead_us_per_stage` is what a stage call costs beyond party B's ring product: the client's time inside stage
calls (encoding, sharing, both network hops, the server's parsing and validation, reconstruction and decoding)
minus one server's products, per round trip.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MODELS, add_server_args, emit, prepare, quiet, save_plot, server_flags, timed, workdir  # noqa: E402

from hss_ee_hf.cli.demo import local_servers  # noqa: E402
from hss_ee_hf.client.modeling import HSSEEForCausalLM  # noqa: E402
from hss_ee_hf.ring.sharing import share  # noqa: E402
from hss_ee_hf.server.engine import StageEngine  # noqa: E402
from hss_ee_hf.transport.config import HSSEEClientConfig  # noqa: E402


def prompt_ids(tokenizer, vocab: int, length: int | None = None) -> dict:
    if tokenizer is not None and length is None:
        messages = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    gen = torch.Generator().manual_seed(1)  # benchmark input, nothing secret
    ids = torch.randint(3, vocab, (1, length or 32), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def decode_ms(model, inputs: dict, tokens: int) -> tuple[float, torch.Tensor]:
    """ms per decoded token, excluding prefill, and the generated ids."""
    kw = dict(do_sample=False, pad_token_id=0)
    model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
    _, t1 = timed(model.generate, **inputs, max_new_tokens=1, min_new_tokens=1, **kw)
    out, tn = timed(model.generate, **inputs, max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, **kw)
    return 1000.0 * (tn - t1) / tokens, out


@torch.no_grad()
def prefill_ms(model, ids: dict) -> float:
    """Time to first token: `generate()` with one new token (prefill plus the logits of the last position)."""
    kw = dict(max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
    model.generate(**ids, **kw)  # warm-up
    _, t = timed(model.generate, **ids, **kw)
    return 1000.0 * t


def server_compute_ms(engine: StageEngine, rows: int = 1, repeats: int = 3) -> float:
    """One server's compute for one token: every stage once on a random share, best of `repeats`."""
    best = float("inf")
    for _ in range(repeats):
        total = 0.0
        for weight in engine.weights.values():
            x = share(torch.zeros(rows, weight.in_features, dtype=torch.int64)).b
            _, t = timed(weight.matmul, x)
            total += t
        best = min(best, total)
    return 1000.0 * best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=MODELS, help="benchmark model (default smollm2)")
    p.add_argument("--tokens", type=int, default=64, help="tokens to decode (default 64)")
    p.add_argument("--prefill", type=int, nargs="*", default=[128, 512], help="prompt lengths for prefill timing")
    p.add_argument("--workdir", help="folder for converted models (default: a temporary folder)")
    p.add_argument("--plot", default="bench/results/decode_breakdown.png", help="where to write the PNG plot")
    p.add_argument("--device", default="cpu", help="server device (cpu, cuda, auto)")
    add_server_args(p)
    p.add_argument(
        "--client-threads",
        type=int,
        help="torch threads of the secure client (set after the plaintext run, which keeps torch's default); 1 "
        "keeps an idle client's thread pool from spinning on cores the servers need when all share one machine",
    )
    p.add_argument("--repeats", type=int, default=3, help="alternating plaintext/secure rounds (default 3)")
    p.add_argument("--no-stream", action="store_true", help="unary gRPC calls instead of long-lived streams")
    p.add_argument(
        "--no-data-plane", action="store_true", help="stage calls over gRPC instead of the servers' data planes"
    )
    p.add_argument(
        "--no-precompute",
        action="store_true",
        help="send every stage to both servers at once instead of preparing party A's products ahead of time",
    )
    args = p.parse_args(argv)
    quiet()
    wd = workdir(args.workdir)
    plain, ee, key, tok = prepare(args.model, wd)
    vocab = plain.config.vocab_size
    inputs = prompt_ids(tok, vocab)
    prefill_plain = {n: prefill_ms(plain, prompt_ids(None, vocab, n)) for n in args.prefill}
    layers = plain.config.num_hidden_layers
    server_args = ["--device", args.device, *server_flags(args)]
    rounds = []
    with local_servers(ee, extra_args=server_args) as endpoints:
        with HSSEEForCausalLM.from_pretrained(
            ee,
            key=key,
            endpoints=endpoints,
            precompute=not args.no_precompute,
            client_config=HSSEEClientConfig(stream=not args.no_stream, data_plane=not args.no_data_plane),
        ) as model:
            transport = type(model.hss_ee_client.transport).__name__
            for round_ in range(args.repeats):
                plain_ms, plain_out = decode_ms(plain, inputs, args.tokens)  # torch's default threads
                with _threads(args.client_threads):
                    secure_ms, secure_out, per_tok = secure_decode_ms(model, inputs, args.tokens)
                rounds.append((plain_ms, secure_ms))
                emit(
                    {
                        "bench": "decode_round",
                        "round": round_,
                        "plaintext_ms_per_token": plain_ms,
                        "secure_ms_per_token": secure_ms,
                        "ratio": secure_ms / plain_ms,
                    }
                )
            with _threads(args.client_threads):
                prefill_secure = {n: prefill_ms(model, prompt_ids(None, vocab, n)) for n in args.prefill}
    del plain
    plain_ms = statistics.median(p for p, _ in rounds)
    secure_ms = statistics.median(s for _, s in rounds)
    match = torch.equal(plain_out, secure_out)
    emit(
        {
            "bench": "decode",
            "model": args.model,
            "tokens": args.tokens,
            "plaintext_ms_per_token": plain_ms,
            "secure_ms_per_token": secure_ms,
            "ratio": statistics.median(s / p for p, s in rounds),
            "tokens_match": match,
            "precompute": not args.no_precompute,
            "kernel": args.kernel,
            "stream": not args.no_stream,
            "transport": transport,
            "client_threads": args.client_threads,
            "server_threads": args.server_threads,
            "precomputed_per_token": per_tok["precomputed"],
        }
    )
    for n in args.prefill:
        emit(
            {
                "bench": "prefill",
                "model": args.model,
                "prompt_tokens": n,
                "plaintext_ms": prefill_plain[n],
                "secure_ms": prefill_secure[n],
                "ratio": prefill_secure[n] / prefill_plain[n],
            }
        )
    emit(
        {
            "bench": "wire",
            "model": args.model,
            "round_trips_per_token": per_tok["round_trips"],
            "round_trips_bound": 4 * layers + 1,
            "bytes_sent_per_token": per_tok["bytes_sent"],
            "bytes_received_per_token": per_tok["bytes_received"],
            "mb_per_token_total": (per_tok["bytes_sent"] + per_tok["bytes_received"]) / 1e6,
        }
    )
    if args.server_threads:
        torch.set_num_threads(args.server_threads)  # time the products as a server computes them
    compute = server_compute_ms(StageEngine(ee, kernel=args.kernel))
    wait_ms = 1000.0 * per_tok["wait_seconds"]
    in_calls_ms = 1000.0 * per_tok["seconds"]
    emit(
        {
            "bench": "overhead",
            "model": args.model,
            "round_trips_per_token": per_tok["round_trips"],
            "server_compute_ms_per_token": compute,
            "in_stage_calls_ms_per_token": in_calls_ms,
            "overhead_us_per_stage": 1000.0 * (in_calls_ms - compute) / per_tok["round_trips"],
            "secure_ms_per_token": secure_ms,
            "plaintext_ms_per_token": plain_ms,
            "ratio": statistics.median(s / p for p, s in rounds),
        }
    )
    parts = {
        "server compute (one server)": min(compute, wait_ms),
        "network + (de)serialisation + queueing": max(wait_ms - compute, 0.0),
        "client sharing": 1000.0 * per_tok["share_seconds"],
        "client reconstruct + decode": 1000.0 * per_tok["decode_seconds"],
        "client nonlinear work + sampling": max(secure_ms - 1000.0 * per_tok["seconds"], 0.0),
    }
    emit({"bench": "breakdown", "model": args.model, "unit": "ms/token", **parts})
    save_plot(Path(args.plot), f"{args.model}: where a secure decode step's time goes", parts, reference=plain_ms)
    return 0


@torch.no_grad()
def secure_decode_ms(model, inputs: dict, tokens: int) -> tuple[float, torch.Tensor, dict]:
    """ms per decoded token of the secure model, its ids, and its stage-call counters per token."""
    kw = dict(do_sample=False, pad_token_id=0)
    model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up (and party A's first products)
    model.hss_ee_stats.reset()
    _, t1 = timed(model.generate, **inputs, max_new_tokens=1, min_new_tokens=1, **kw)
    one = _snapshot(model.hss_ee_stats)
    model.hss_ee_stats.reset()
    out, tn = timed(model.generate, **inputs, max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, **kw)
    many = _snapshot(model.hss_ee_stats)
    return 1000.0 * (tn - t1) / tokens, out, {k: (many[k] - one[k]) / tokens for k in many}


@contextmanager
def _threads(threads: int | None):
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _snapshot(stats) -> dict:
    keys = (
        "round_trips",
        "bytes_sent",
        "bytes_received",
        "seconds",
        "share_seconds",
        "wait_seconds",
        "decode_seconds",
        "precomputed",
    )
    return {k: float(getattr(stats, k)) for k in keys}


if __name__ == "__main__":
    sys.exit(main())
