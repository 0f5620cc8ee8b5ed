"""The ring kernels per stage shape: native (2-byte weights, AVX2) against float64 (three 22-bit limbs).

Usage:

    python bench/kernel.py --model smollm2 --rows 1 4 16 128

For every stage shape of the model (from its config; weights are random integers, which the kernels' speed
does not depend on) and every row count, one JSON line with the best-of-`--repeats` time of each kernel, the
ratio, and a check that both equal the int64 reference on the same input. A last line sums one decode
step (every stage once, one row): the ring products one server computes per generated token.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RANDOM_CONFIGS, emit  # noqa: E402

from hss_ee_hf.artifacts.layouts import stage_layout  # noqa: E402
from hss_ee_hf.ring.csprng import ChaChaStream  # noqa: E402
from hss_ee_hf.ring.matmul import RingWeight, ring_matmul_reference  # noqa: E402


def _config(name: str):
    if name == "smollm2":
        from transformers import LlamaConfig

        # SmolLM2-135M's shape (the bundled GGUF's config), without loading its weights
        return LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            tie_word_embeddings=True,
        )
    return RANDOM_CONFIGS[name]()


def _best(fn, x: torch.Tensor, repeats: int) -> float:
    fn(x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
    return 1000.0 * best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=("smollm2", *RANDOM_CONFIGS))
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 128], help="rows (tokens) per product")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions; the best is reported")
    p.add_argument("--threads", type=int, help="torch threads (the native kernel uses as many)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = _config(args.model)
    rng = ChaChaStream()
    with init_empty_weights():  # shapes only: no memory for weights
        model = AutoModelForCausalLM.from_config(config)
    shapes: dict[tuple[int, int], int] = {}  # (out, in) -> stages of that shape
    for stage in stage_layout(config):
        weights = [model.get_submodule(part.module).weight for part in stage.parts]
        key = (sum(w.shape[0] for w in weights), weights[0].shape[1])
        shapes[key] = shapes.get(key, 0) + 1
    step = {"native": 0.0, "float64": 0.0}
    for (out_features, in_features), count in shapes.items():
        w_int = torch.remainder(rng.int64((out_features, in_features)), 2**16 - 1) - (2**15 - 1)
        kernels = {name: RingWeight(w_int, kernel=name) for name in ("native", "float64")}
        for rows in args.rows:
            x = rng.int64((rows, in_features))
            reference = ring_matmul_reference(x, w_int)
            exact = all(torch.equal(k.matmul(x), reference) for k in kernels.values())
            ms = {name: _best(k.matmul, x, args.repeats) for name, k in kernels.items()}
            if rows == 1:
                for name in step:
                    step[name] += count * ms[name]
            emit(
                {
                    "bench": "kernel",
                    "model": args.model,
                    "out_features": out_features,
                    "in_features": in_features,
                    "stages": count,
                    "rows": rows,
                    "native_ms": ms["native"],
                    "float64_ms": ms["float64"],
                    "float64_over_native": ms["float64"] / ms["native"],
                    "exact": exact,
                    "threads": torch.get_num_threads(),
                }
            )
    emit(
        {
            "bench": "kernel_decode_step",
            "model": args.model,
            "native_ms_per_token": step["native"],
            "float64_ms_per_token": step["float64"],
            "float64_over_native": step["float64"] / step["native"],
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
