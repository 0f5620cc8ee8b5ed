"""Shared pieces of the benchmarks: model preparation, JSON lines, plots.

Every benchmark measures plaintext and secure execution in the same run, on the same inputs,
and prints one JSON object per line.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig
from transformers.utils import logging as hf_logging

from hss_ee_hf import convert
from hss_ee_hf.cli.demo import bundled_gguf, ensure_converted
from hss_ee_hf.ring.native import KERNEL_CHOICES

# Random-init architectures given by config (weights are random: no download, no data).
RANDOM_CONFIGS = {
    "gpt2-small": lambda: GPT2Config(),
    "llama-1b": lambda: LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "llama2-7b": lambda: LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
}
MODELS = ("smollm2", *RANDOM_CONFIGS)


def emit(record: dict) -> None:
    """Prints one measurement as a JSON line."""
    print(json.dumps(record), flush=True)


def quiet() -> None:
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def prepare(model_name: str, workdir: Path):
    """Returns `(plain_model, ee_folder, key_path, tokenizer_or_None)` for a benchmark model."""
    if model_name == "smollm2":
        ee, key = ensure_converted(workdir / "smollm2")
        gguf = bundled_gguf()
        plain = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
        return plain, ee, key, AutoTokenizer.from_pretrained(ee)
    if model_name not in RANDOM_CONFIGS:
        raise SystemExit(f"unknown model {model_name!r}; choose from {', '.join(MODELS)}")
    torch.manual_seed(0)  # benchmark weights, nothing secret
    plain = AutoModelForCausalLM.from_config(RANDOM_CONFIGS[model_name]()).float().eval()
    src = workdir / f"{model_name}-src"
    plain.save_pretrained(src)
    ee, key = workdir / f"{model_name}-ee", workdir / f"{model_name}.hss-ee-key"
    convert(src, ee, key, force=True)
    return plain, ee, key, None


def workdir(path: str | None) -> Path:
    return Path(path) if path else Path(tempfile.mkdtemp(prefix="hss-ee-bench-"))


def add_server_args(parser) -> None:
    """`--server-threads` and `--kernel`: how the benchmark's `hss-ee serve` processes compute."""
    parser.add_argument("--server-threads", type=int, help="torch threads per server (`hss-ee serve --threads`)")
    parser.add_argument(
        "--kernel",
        choices=KERNEL_CHOICES,
        default="auto",
        help="servers' CPU ring kernel (`hss-ee serve --kernel`, default auto)",
    )


def server_flags(args) -> list[str]:
    """The `hss-ee serve` flags for what [`add_server_args`] parsed."""
    flags = ["--kernel", args.kernel]
    if args.server_threads:
        flags += ["--threads", str(args.server_threads)]
    return flags


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def save_plot(path: Path, title: str, parts: dict[str, float], reference: float | None = None) -> None:
    """A horizontal stacked bar of where the time goes (ms/token), with plaintext as a second bar."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'); no plot written", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(9, 2.8))
    left = 0.0
    for label, value in parts.items():
        ax.barh("secure", value, left=left, label=f"{label} ({value:.1f})")
        left += value
    if reference is not None:
        ax.barh("plaintext", reference, color="grey", label=f"plaintext ({reference:.1f})")
    ax.set_xlabel("ms per generated token")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
