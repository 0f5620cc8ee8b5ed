"""Aggregate tokens/s with 1, 4 and 8 concurrent client sessions against the same two servers.

Usage:

    python bench/throughput.py --model smollm2 --sessions 1 4 8 --tokens 16

Each session is its own process (its own client model, key and gRPC channels), as separate users
would be. All sessions start together and decode `--tokens` tokens greedily; aggregate tokens/s is
`sessions * tokens / wall time of the slowest`. One JSON line per session count, with the speed-up
over one session.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MODELS, add_server_args, emit, prepare, quiet, server_flags, workdir  # noqa: E402

from hss_ee_hf.cli.demo import local_servers  # noqa: E402


def _session(
    ee: str, key: str, endpoints: tuple[str, str], tokens: int, threads: int | None, start_at, results
) -> None:
    import torch

    from hss_ee_hf.client.modeling import HSSEEForCausalLM

    quiet()
    if threads:
        torch.set_num_threads(threads)
    with HSSEEForCausalLM.from_pretrained(ee, key=key, endpoints=endpoints) as model:
        ids = torch.arange(5, 21).unsqueeze(0)
        kw = dict(do_sample=False, pad_token_id=0)
        model.generate(input_ids=ids, max_new_tokens=1, **kw)  # connect and warm up
        start_at.wait()
        t0 = time.perf_counter()
        model.generate(input_ids=ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        results.put(time.perf_counter() - t0)


def run(ee: Path, key: Path, endpoints, sessions: int, tokens: int, threads: int | None = None) -> float:
    ctx = mp.get_context("spawn")
    start_at, results = ctx.Barrier(sessions), ctx.Queue()
    procs = [
        ctx.Process(target=_session, args=(str(ee), str(key), endpoints, tokens, threads, start_at, results))
        for _ in range(sessions)
    ]
    for p in procs:
        p.start()
    times = [results.get() for _ in procs]
    for p in procs:
        p.join()
    return sessions * tokens / max(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=MODELS)
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--workdir")
    p.add_argument(
        "--batch-window-ms",
        type=float,
        default=2.0,
        help="servers' batching window (`hss-ee serve --batch-window-ms`)",
    )
    p.add_argument("--client-threads", type=int, help="torch threads per client session (default: torch's choice)")
    add_server_args(p)
    args = p.parse_args(argv)
    quiet()
    _, ee, key, _ = prepare(args.model, workdir(args.workdir))
    base = None
    server_args = ["--batch-window-ms", str(args.batch_window_ms), *server_flags(args)]
    with local_servers(ee, extra_args=server_args) as endpoints:
        for n in args.sessions:
            tps = run(ee, key, endpoints, n, args.tokens, args.client_threads)
            base = base or tps
            emit(
                {
                    "bench": "throughput",
                    "model": args.model,
                    "sessions": n,
                    "tokens_per_session": args.tokens,
                    "aggregate_tokens_per_s": tps,
                    "speedup_vs_first": tps / base,
                }
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
