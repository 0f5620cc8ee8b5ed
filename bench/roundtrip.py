"""One stage call's cost over loopback: unary gRPC, gRPC streams and the binary data plane.

Usage:

    python bench/roundtrip.py --model smollm2 --calls 2000

Starts two `hss-ee serve` processes and sends party B the same one-row request `--calls` times for a few stages of
different widths, as unary gRPC calls (`HSSEEClientConfig(stream=False, data_plane=False)`), on a gRPC stream
(`data_plane=False`) and on the data plane (the default). One JSON line per stage and mode: wall milliseconds per
call, party B's product alone (`product_ms`, the same kernel timed in this process), the overhead beyond it
(`overhead_us`: framing, both network hops, validation, (de)serialisation), and the CPU milliseconds per call of the
client and of the server (psutil).
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
from hss_ee_hf.server.engine import StageEngine  # noqa: E402
from hss_ee_hf.transport.config import HSSEEClientConfig  # noqa: E402
from hss_ee_hf.transport.grpc_client import GrpcTransport  # noqa: E402
from hss_ee_hf.transport.socket_client import DataPlaneTransport  # noqa: E402

MODES = {
    "unary": HSSEEClientConfig(stream=False, data_plane=False),
    "stream": HSSEEClientConfig(data_plane=False),
    "dataplane": HSSEEClientConfig(),
}


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def product_ms(engine: StageEngine, stage: str, x: torch.Tensor, calls: int) -> float:
    """Best-of-three mean of party B's product alone for this stage and share (what no transport can avoid)."""
    weight = engine.weights[stage]
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            weight.matmul(x)
        best = min(best, (time.perf_counter() - start) / calls)
    return 1000.0 * best


def transport_for(mode: str, endpoints: tuple[str, str]):
    control = GrpcTransport(endpoints, config=MODES[mode])
    return DataPlaneTransport(control) if mode == "dataplane" else control


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=MODELS)
    p.add_argument("--calls", type=int, default=2000, help="timed calls per stage and mode")
    p.add_argument("--workdir", help="folder for converted models (default: a temporary folder)")
    p.add_argument("--server-threads", type=int, default=1, help="`hss-ee serve --threads` (default 1)")
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES), help="modes to measure")
    args = p.parse_args(argv)
    quiet()
    torch.set_num_threads(args.server_threads)  # the in-process product timing runs like one server
    _, ee, _, _ = prepare(args.model, workdir(args.workdir))
    fingerprint = HSSEECheckpointInfo.from_folder(ee).fingerprint
    engine = StageEngine(ee)
    me = psutil.Process()
    with local_servers(ee, extra_args=["--threads", str(args.server_threads)]) as endpoints:
        port_b = endpoints[1].rsplit(":", 1)[1]
        server = next(c for c in me.children(recursive=True) if port_b in c.cmdline())
        for mode in args.modes:
            # `pinned()`: the calling thread as `generate()` runs it (on one core with party B's thread when
            # client and servers share this machine, the default; see hss_ee_hf/transport/colocation.py)
            with transport_for(mode, endpoints) as transport, transport.pinned():
                stages = transport.describe()[0]["stages"]
                picks = [name for name in stages if name.startswith("layers.0.")] + ["lm_head"]
                for stage in picks:
                    in_features, out_features = stages[stage]
                    shares = share(torch.zeros(1, in_features, dtype=torch.int64))
                    for _ in range(50):  # warm up (and open the stream or connection)
                        transport.run_party(1, fingerprint, stage, shares, out_features)
                    calls = args.calls if out_features < 10_000 else max(1, args.calls // 20)
                    client0, server0, start = _cpu(me), _cpu(server), time.perf_counter()
                    for _ in range(calls):
                        transport.run_party(1, fingerprint, stage, shares, out_features)
                    wall = 1000.0 * (time.perf_counter() - start) / calls
                    client_cpu, server_cpu = (_cpu(me) - client0) / calls, (_cpu(server) - server0) / calls
                    product = product_ms(engine, stage, shares.b, calls)
                    emit(
                        {
                            "bench": "roundtrip",
                            "model": args.model,
                            "stage": stage,
                            "shape": [out_features, in_features],
                            "mode": mode,
                            "calls": calls,
                            "wall_ms_per_call": wall,
                            "product_ms": product,
                            "overhead_us": 1000.0 * (wall - product),
                            "client_cpu_ms_per_call": 1000.0 * client_cpu,
                            "server_cpu_ms_per_call": 1000.0 * server_cpu,
                        }
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
