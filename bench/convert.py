"""Converter wall time and peak RSS against model size.

Usage:

    python bench/convert.py --models gpt2-small llama-1b

Each model is first saved with random weights (float32, safetensors) by this process; then
`hss-ee convert` runs as a child process so its peak RSS is measured alone. One JSON line per model:
model bytes, largest tensor bytes, wall time, peak RSS, and the headroom against the target
"peak RSS < 2 GB + largest tensor".
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RANDOM_CONFIGS, emit, quiet, workdir  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def save_random(name: str, folder: Path) -> None:
    torch.manual_seed(0)  # benchmark weights, nothing secret
    model = AutoModelForCausalLM.from_config(RANDOM_CONFIGS[name]()).float()
    model.save_pretrained(folder)


def sizes(folder: Path) -> tuple[int, int]:
    """(total bytes, largest tensor bytes) of a safetensors checkpoint."""
    total = largest = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                n = 4
                for d in sl.get_shape():
                    n *= d
                total += n
                largest = max(largest, n)
    return total, largest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt2-small", "llama-1b"], choices=sorted(RANDOM_CONFIGS))
    p.add_argument("--workdir", help="folder for the models (default: a temporary folder)")
    p.add_argument("--no-verify", action="store_true", help="pass --no-verify to the converter")
    args = p.parse_args(argv)
    quiet()
    wd = workdir(args.workdir)
    for name in args.models:
        src, out, key = wd / f"{name}-src", wd / f"{name}-ee", wd / f"{name}.hss-ee-key"
        if not (src / "config.json").exists():
            save_random(name, src)
        total, largest = sizes(src)
        cmd = [sys.executable, "-m", "hss_ee_hf.cli.main", "convert", str(src), str(out), "--key", str(key), "--force"]
        if args.no_verify:
            cmd.append("--no-verify")
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        start = time.perf_counter()
        env = dict(os.environ, TQDM_DISABLE="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        if peak_kb <= before:
            print("warning: child peak RSS not above an earlier child's; figure is a lower bound", file=sys.stderr)
        peak = peak_kb * 1024
        target = 2 * 1024**3 + largest
        emit(
            {
                "bench": "convert",
                "model": name,
                "model_mb": total / 1e6,
                "largest_tensor_mb": largest / 1e6,
                "seconds": seconds,
                "peak_rss_mb": peak / 1e6,
                "target_mb": target / 1e6,
                "within_target": peak < target,
                "verified": not args.no_verify,
            }
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
