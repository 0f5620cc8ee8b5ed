"""One stage call's cost over loopback gRPC: unary calls against long-lived streams.

Usage:

    python bench/roundtrip.py --model smollm2 --calls 2000

Starts one `hss-ee serve` process and sends the same one-row request `--calls` times for a few stages of
different widths, with `HSSEEClientConfig(stream=False)` and `stream=True`. One JSON line per stage and mode:
wall milliseconds per call, and the CPU milliseconds per call of the client and of the server (psutil).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MODELS, emit, prepare, quiet, workdir  # noqa: E402

from hss_ee_hf.artifacts.checkpoint import HSSEECheckpointInfo  # noqa: E402
from hss_ee_hf.cli.demo import local_servers  # noqa: E402
from hss_ee_hf.ring.sharing import share  # noqa: E402
from hss_ee_hf.transport.config import HSSEEClientConfig  # noqa: E402
from hss_ee_hf.transport.grpc_client import GrpcTransport  # noqa: E402


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=MODELS)
    p.add_argument("--calls", type=int, default=2000, help="timed calls per stage and mode")
    p.add_argument("--workdir", help="folder for converted models (default: a temporary folder)")
    p.add_argument("--server-threads", type=int, default=1, help="`hss-ee serve --threads` (default 1)")
    args = p.parse_args(argv)
    quiet()
    _, ee, _, _ = prepare(args.model, workdir(args.workdir))
    fingerprint = HSSEECheckpointInfo.from_folder(ee).fingerprint
    me = psutil.Process()
    with local_servers(ee, count=1, extra_args=["--threads", str(args.server_threads)]) as (endpoint,):
        server = next(c for c in me.children(recursive=True) if "serve" in " ".join(c.cmdline()))
        for stream in (False, True):
            with GrpcTransport((endpoint, endpoint), config=HSSEEClientConfig(stream=stream)) as transport:
                stages = transport.describe()[0]["stages"]
                picks = [name for name in stages if name.startswith("layers.0.")] + ["lm_head"]
                for stage in picks:
                    in_features, out_features = stages[stage]
                    shares = share(torch.zeros(1, in_features, dtype=torch.int64))
                    for _ in range(50):  # warm up (and open the stream)
                        transport.run_party(1, fingerprint, stage, shares, out_features)
                    calls = args.calls if out_features < 10_000 else max(1, args.calls // 20)
                    client0, server0, start = _cpu(me), _cpu(server), time.perf_counter()
                    for _ in range(calls):
                        transport.run_party(1, fingerprint, stage, shares, out_features)
                    wall = time.perf_counter() - start
                    emit(
                        {
                            "bench": "roundtrip",
                            "model": args.model,
                            "stage": stage,
                            "shape": [out_features, in_features],
                            "mode": "stream" if stream else "unary",
                            "calls": calls,
                            "wall_ms_per_call": 1000.0 * wall / calls,
                            "client_cpu_ms_per_call": 1000.0 * (_cpu(me) - client0) / calls,
                            "server_cpu_ms_per_call": 1000.0 * (_cpu(server) - server0) / calls,
                        }
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
