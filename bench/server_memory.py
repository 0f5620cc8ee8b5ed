"""Server memory after a long prompt (issue 19, row 10): RSS of a real `hss-ee serve` before and after.

Starts one SmolLM2 share server (the cached demo conversion), warms it with one-row calls to every stage of the
first `--layers` layers, records its resident memory, sends the same stages one `--rows`-row request each (a long
prompt's prefill, as party B receives it), then one-row calls again, and prints one JSON line:
`{"steady_mb", "after_prompt_mb", "after_mb", "after_over_steady"}`. `after_over_steady` within 1.10 is the target.

Usage: `python bench/server_memory.py [--rows 8295] [--layers 4]`
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from hss_ee_hf.artifacts.checkpoint import HSSEECheckpointInfo
from hss_ee_hf.cli.demo import default_cache_dir, ensure_converted, free_port
from hss_ee_hf.ring.sharing import share
from hss_ee_hf.transport.config import HSSEEClientConfig
from hss_ee_hf.transport.grpc_client import GrpcTransport
from hss_ee_hf.transport.protos import hss_ee_pb2


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8295)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    folder, _ = ensure_converted(default_cache_dir())
    fingerprint = HSSEECheckpointInfo.from_folder(folder).fingerprint
    port = free_port()
    cmd = [sys.executable, "-m", "hss_ee_hf.cli", "serve", str(folder), "--port", str(port), "--threads", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"127.0.0.1:{port}"
    try:
        with GrpcTransport(("127.0.0.1:9", endpoint), config=HSSEEClientConfig(timeout=600.0)) as transport:
            deadline = time.monotonic() + 300
            while True:
                try:
                    info = transport._call_party(1, "Describe", hss_ee_pb2.DescribeRequest(), threading.Event())
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            stages = [
                (s.name, s.in_features, s.out_features)
                for s in info.stages
                if s.name.startswith("layers.") and int(s.name.split(".")[1]) < args.layers
            ]

            def sweep(rows: int) -> None:
                for name, d_in, d_out in stages:
                    for start in range(0, rows, info.max_rows):  # chunked like the client's prefill
                        n = min(info.max_rows, rows - start)
                        x = torch.randint(-(2**20), 2**20, (n, d_in), dtype=torch.int64)
                        transport.run_party(1, fingerprint, name, share(x), d_out)

            for _ in range(3):
                sweep(1)
            steady = rss_mb(proc.pid)
            sweep(args.rows)
            peak = rss_mb(proc.pid)  # right after the long prompt
            for _ in range(3):
                sweep(1)
            time.sleep(1.0)
            after = rss_mb(proc.pid)
        print(
            json.dumps(
                {
                    "rows": args.rows,
                    "layers": args.layers,
                    "steady_mb": round(steady, 1),
                    "after_prompt_mb": round(peak, 1),
                    "after_mb": round(after, 1),
                    "after_over_steady": round(after / steady, 3),
                }
            )
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
