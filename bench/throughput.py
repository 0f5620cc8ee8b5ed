"""Aggregate tokens/s with 1, 4 and 8 concurrent client sessions against the same two servers.

Usage:

    python bench/throughput.py --model smollm2 --sessions 1 4 8 --tokens 16

Each session is its own process (its own client model, key and gRPC channels), as separate users
would be. All sessions start together and decode `--tokens` tokens greedily; aggregate tokens/s is
`sessions * tokens / wall time of the slowest`. One JSON line per session count, with the speed-up
over one session.

Each line also says what the run cost in CPU time (clients and servers, from the kernel's accounting):
`cpu_ms_per_token` and `cores_busy` (CPU seconds per wall second). On a machine with `cores` cores no number of
sessions can beat `cores / cpu_ms_per_token` tokens per ms, so `ceiling_speedup = cores / cores_busy` of the
one-session line is the most that more sessions could give unless they make a token cheaper (batching).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import psutil

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
        t0, cpu0 = time.perf_counter(), time.process_time()
        model.generate(input_ids=ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        results.put((time.perf_counter() - t0, time.process_time() - cpu0))


def _cpu(processes) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in processes)


def run(ee: Path, key: Path, endpoints, sessions: int, tokens: int, threads: int | None = None, servers=()) -> dict:
    """Aggregate tokens/s of `sessions` concurrent sessions, and the CPU seconds clients and servers spent."""
    ctx = mp.get_context("spawn")
    start_at, results = ctx.Barrier(sessions), ctx.Queue()
    procs = [
        ctx.Process(target=_session, args=(str(ee), str(key), endpoints, tokens, threads, start_at, results))
        for _ in range(sessions)
    ]
    for p in procs:
        p.start()
    server_cpu0 = _cpu(servers)
    times = [results.get() for _ in procs]
    server_cpu = _cpu(servers) - server_cpu0  # the servers were idle before the sessions' barrier and after
    for p in procs:
        p.join()
    wall = max(t for t, _ in times)
    client_cpu = sum(c for _, c in times)
    return {
        "aggregate_tokens_per_s": sessions * tokens / wall,
        "cpu_ms_per_token": 1000.0 * (client_cpu + server_cpu) / (sessions * tokens),
        "client_cpu_ms_per_token": 1000.0 * client_cpu / (sessions * tokens),
        "server_cpu_ms_per_token": 1000.0 * server_cpu / (sessions * tokens),
        "cores_busy": (client_cpu + server_cpu) / wall,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=MODELS)
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--workdir")
    p.add_argument(
        "--batch-window-ms",
        type=float,
        help="servers' batching window (`hss-ee serve --batch-window-ms`; default: the server's default, off)",
    )
    p.add_argument("--client-threads", type=int, help="torch threads per client session (default: torch's choice)")
    add_server_args(p)
    args = p.parse_args(argv)
    quiet()
    _, ee, key, _ = prepare(args.model, workdir(args.workdir))
    base = None
    window = [] if args.batch_window_ms is None else ["--batch-window-ms", str(args.batch_window_ms)]
    server_args = [*window, *server_flags(args)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with local_servers(ee, extra_args=server_args) as endpoints:
        me = psutil.Process()
        servers = [c for c in me.children(recursive=True) if "serve" in c.cmdline()]
        for n in args.sessions:
            got = run(ee, key, endpoints, n, args.tokens, args.client_threads, servers)
            base = base or got
            tps = got["aggregate_tokens_per_s"]
            emit(
                {
                    "bench": "throughput",
                    "model": args.model,
                    "sessions": n,
                    "tokens_per_session": args.tokens,
                    **got,
                    "speedup_vs_first": tps / base["aggregate_tokens_per_s"],
                    "cores": cores,
                    "ceiling_speedup": cores / got["cores_busy"],
                }
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
