"""Share servers on a GPU with the int8 kernel vs plaintext fp16 `generate()` on the same GPU, in one run.

Usage:

    python bench/gpu.py --shape 7b --device cuda      # LLaMA-2-7B-shaped random model, servers on the GPU(s)
    python bench/gpu.py --shape tiny --device cpu     # the same code on a small shape: CI proves it runs (< 1 min)

What it does: converts a random model of the shape (no download; cached in `--workdir`), times plaintext `generate()`
(fp16 on CUDA, fp32 on CPU) on the device, frees it, starts both `hss-ee serve --device DEVICE --kernel KERNEL`
processes, and times `HSSEEForCausalLM.generate()` with the client on the CPU. It prints and writes to
`bench/results/gpu_<shape>_<device>.jsonl`: decode ms/token (prefill removed: `(t(N + 1) - t(1)) / N`), prefill ms
for 128 and 512 prompt tokens, each server's memory (GPU memory from `nvidia-smi` per process on CUDA, resident set
on CPU), the stage weights' bytes, and the per-device stage split (the plan `hss-ee serve` makes with the same
function, taken from the GPUs' free memory before the servers start).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RANDOM_CONFIGS, emit, quiet, timed, workdir  # noqa: E402
from decode import prompt_ids  # noqa: E402

from hss_ee_hf import convert  # noqa: E402
from hss_ee_hf.artifacts.weights import iter_stage_shapes  # noqa: E402
from hss_ee_hf.cli.demo import local_servers  # noqa: E402
from hss_ee_hf.client.modeling import HSSEEForCausalLM  # noqa: E402
from hss_ee_hf.ring.matmul import held_bytes  # noqa: E402
from hss_ee_hf.ring.native import KERNEL_CHOICES  # noqa: E402
from hss_ee_hf.server.placement import StagePlacement, device_capacities, plan_placement  # noqa: E402

SHAPES = {
    "7b": RANDOM_CONFIGS["llama2-7b"],
    "tiny": lambda: LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    ),
}
RESULTS = Path(__file__).resolve().parent / "results"
GEN = dict(do_sample=False, pad_token_id=0)


def prepare(shape: str, folder: Path) -> tuple[Path, Path, Path]:
    """`(source, ee_checkpoint, key)`: a random model of `shape` and its conversion, reused when already there."""
    src, ee, key = folder / f"{shape}-src", folder / f"{shape}-ee", folder / f"{shape}.hss-ee-key"
    if not (src / "config.json").exists():
        torch.manual_seed(0)  # benchmark weights, nothing secret
        # fp16 on disk halves a 7B source (13.5 GB); the converter reads it back as fp32.
        dtype = torch.float16 if shape == "7b" else torch.float32
        AutoModelForCausalLM.from_config(SHAPES[shape](), dtype=dtype).save_pretrained(src)
    if not (ee / "config.json").exists() or not key.exists():
        _, seconds = timed(convert, src, ee, key, force=True)
        emit({"bench": "gpu", "step": "convert", "shape": shape, "seconds": seconds})
    return src, ee, key


@torch.no_grad()
def measure(model, vocab: int, tokens: int, prefill: list[int], device: str) -> dict:
    """Decode ms/token and prefill ms per prompt length of `model.generate()` (inputs on `device`)."""

    def run(ids: dict, new: int) -> tuple[torch.Tensor, float]:
        out, seconds = timed(model.generate, **ids, max_new_tokens=new, min_new_tokens=new, **GEN)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, seconds

    ids = {k: v.to(device) for k, v in prompt_ids(None, vocab, 32).items()}
    run(ids, 2)  # warm-up: kernels, connections, party A's precomputation
    _, t1 = run(ids, 1)
    out, tn = run(ids, tokens + 1)
    result = {"decode_ms_per_token": 1000.0 * (tn - t1) / tokens, "tokens": out[0, -tokens:].tolist()}
    for n in prefill:
        long_ids = {k: v.to(device) for k, v in prompt_ids(None, vocab, n).items()}
        run(long_ids, 1)
        result[f"prefill_{n}_ms"] = 1000.0 * run(long_ids, 1)[1]
    return result


def stage_split(ee: Path, device: str, kernel: str) -> StagePlacement:
    """The placement `hss-ee serve --device DEVICE` makes now (on CPU: every stage on the CPU)."""
    config = AutoConfig.from_pretrained(ee)
    held = "float64" if kernel in ("float64", "native") and device.startswith("cuda") else kernel
    sizes = [(s.name, held_bytes(o, i, held, device)) for s, (o, i) in iter_stage_shapes(ee, config)]
    if device.startswith("cuda"):
        return plan_placement(sizes, device_capacities(device))
    return StagePlacement({name: "cpu" for name, _ in sizes}, dict(sizes))


def server_memory(device: str) -> list[dict]:
    """Memory of this process's child servers: GPU memory per process on CUDA, resident set on CPU."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            children.append(int(stat.parent.name))
    gpu = _gpu_mb() if device.startswith("cuda") else {}
    return [{"pid": pid, "rss_mb": _rss_mb(pid), **({"gpu_mb": gpu.get(pid)} if gpu else {})} for pid in children]


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _gpu_mb() -> dict[int, float]:
    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {int(p): float(m) for p, m in (line.split(",") for line in out.strip().splitlines() if "," in line)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="model shape (default tiny)")
    p.add_argument("--device", default="cpu", help="servers' and plaintext's device: cuda, cuda:N or cpu")
    p.add_argument("--kernel", choices=KERNEL_CHOICES, default="int8", help="servers' ring kernel (default int8)")
    p.add_argument("--tokens", type=int, help="tokens to decode (default 32 for 7b, 8 for tiny)")
    p.add_argument("--prefill", type=int, nargs="*", default=[128, 512], help="prompt lengths for prefill")
    p.add_argument("--workdir", help="folder for the converted model, reused across runs (default: a temp folder)")
    p.add_argument("--server-threads", type=int, help="torch threads per server (default 1 on CPU)")
    p.add_argument("--out", help="JSON-lines results (default bench/results/gpu_<shape>_<device>.jsonl)")
    args = p.parse_args(argv)
    quiet()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here; run with --device cpu")
    tokens = args.tokens or (32 if args.shape == "7b" else 8)
    out_path = Path(args.out) if args.out else RESULTS / f"gpu_{args.shape}_{args.device.split(':')[0]}.jsonl"
    records: list[dict] = []
    started = time.perf_counter()
    src, ee, key = prepare(args.shape, workdir(args.workdir))
    base = {"bench": "gpu", "shape": args.shape, "device": args.device, "kernel": args.kernel}

    on_gpu = args.device.startswith("cuda")
    dtype = torch.float16 if on_gpu else torch.float32
    plain = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).to(args.device).eval()
    vocab = plain.config.vocab_size
    plain_result = measure(plain, vocab, tokens, args.prefill, args.device)
    records.append({**base, "side": "plaintext", "dtype": str(dtype).removeprefix("torch."), **plain_result})
    del plain
    if on_gpu:
        torch.cuda.empty_cache()

    split = stage_split(ee, args.device, args.kernel)
    threads = args.server_threads or (None if on_gpu else 1)
    server_args = ["--device", args.device, "--kernel", args.kernel, *(["--threads", str(threads)] if threads else [])]
    with local_servers(ee, extra_args=server_args, timeout=1800.0) as endpoints:
        with HSSEEForCausalLM.from_pretrained(ee, key=key, endpoints=endpoints) as model:
            secure_result = measure(model, vocab, tokens, args.prefill, "cpu")
        memory = server_memory(args.device)
    records.append({**base, "side": "secure (client on CPU)", **secure_result})
    records.append({**base, "side": "servers", "memory": memory, "weight_bytes": sum(split.stage_bytes.values())})
    records.append({**base, "side": "stage split (one server)", "split": split.summary()})
    records.append(
        {
            **base,
            "side": "summary",
            "decode_ratio": secure_result["decode_ms_per_token"] / plain_result["decode_ms_per_token"],
            "tokens_match": secure_result["tokens"] == plain_result["tokens"],
            "seconds": time.perf_counter() - started,
        }
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", encoding="utf-8") as f:
        for record in records:
            emit(record)
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
