"""`bench/gpu.py` runs end to end on a small shape on the CPU (the same code the GPU run uses)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"


@pytest.mark.slow
def test_gpu_bench_runs_on_a_tiny_shape_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu.jsonl"
    argv = ["--shape", "tiny", "--device", "cpu", "--tokens", "2", "--prefill", "16", "--workdir", str(tmp_path)]
    assert bench.main([*argv, "--out", str(out)]) == 0
    records = {r["side"]: r for r in map(json.loads, out.read_text().splitlines())}
    plain, secure = records["plaintext"], records["secure (client on CPU)"]
    # The tiny plaintext's decode is a difference of two ~ms timings: on a busy runner it can come out below zero.
    assert math.isfinite(plain["decode_ms_per_token"]) and plain["prefill_16_ms"] > 0
    assert secure["decode_ms_per_token"] > 0 and secure["prefill_16_ms"] > 0
    assert secure["tokens"] == plain["tokens"]  # greedy tokens of the fp32 plaintext, through the int8 servers
    assert len(records["servers"]["memory"]) == 2 and all(m["rss_mb"] for m in records["servers"]["memory"])
    (part,) = records["stage split (one server)"]["split"]
    assert part["device"] == "cpu" and part["bytes"] == records["servers"]["weight_bytes"]
