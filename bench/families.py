"""Secure vs plaintext for the other model families: T5-small generation, ResNet-50 and ViT-B/16 classification.

Usage:

    python bench/families.py --models t5-small resnet-50
    python bench/families.py --models vit-base --image-size 224 --repeats 2
    python bench/families.py --models t5-small --tokens 4 --prompt 16   # a quick smoke run

Every model is random-init with the real architecture's shape (no download, no data), saved, converted with
`hss_ee_hf.convert`, and served by two `hss-ee serve` processes on loopback (gRPC); plaintext is the original
transformers model in the same process, on the same inputs, in the same run.

* `t5-small` (`T5ForConditionalGeneration`, T5-small shape): greedy `generate()` of `--tokens` new tokens for a
  random prompt of `--prompt` tokens, with `min_new_tokens == max_new_tokens` and `eos_token_id=None` so both
  produce exactly that many. Decode ms/token is `(t(N tokens) - t(1 token)) / (N - 1)`, which removes the encoder
  and the first step; time to first token is `t(1 token)` (encoder plus the first decoder step, which also computes
  the cross-attention keys and values). Wire figures are per decode step and for the first token (encoder round
  trips counted from `hss_ee_stats.per_stage`).
* `resnet-50` (`ResNetForImageClassification(ResNetConfig(num_labels=1000))`) and `vit-base`
  (`ViTForImageClassification(ViTConfig(num_labels=1000))`): one forward pass over `--batch` random images of
  `--image-size` pixels, one warm-up and then the mean of `--repeats` passes, as ms/image; logits' max error
  relative to the largest plaintext |logit| and top-1 agreement. ViT at a size other than its 224 runs with
  `interpolate_pos_encoding=True` on both sides.

Breakdowns split the secure time with `hss_ee_stats`: client sharing (`share_seconds`), waiting for the two servers
(`wait_seconds`: network, (de)serialisation, server compute), reconstruction and decoding (`decode_seconds`), and the
rest of the client's work (total minus those: HF's own nonlinear layers, im2col, attention, sampling). Peak RSS is
read from `/proc` (`VmHWM`, reset before each phase): the client for each phase, each server process at the end.

One JSON object per line on stdout, also appended to `--results` (default `bench/results/families.jsonl`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_server_args, emit, quiet, server_flags, timed, workdir  # noqa: E402
from transformers import (  # noqa: E402
    ResNetConfig,
    ResNetForImageClassification,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)

from hss_ee_hf import HSSEEForConditionalGeneration, HSSEEForImageClassification, convert  # noqa: E402
from hss_ee_hf.cli.demo import local_servers  # noqa: E402

# Random-init models with the real shapes (weights are random: no download, no data).
FAMILY_MODELS = {
    "t5-small": (
        T5ForConditionalGeneration,
        lambda: T5Config(
            vocab_size=32128,
            d_model=512,
            d_kv=64,
            d_ff=2048,
            num_layers=6,
            num_heads=8,
            feed_forward_proj="relu",
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        ),
    ),
    "resnet-50": (ResNetForImageClassification, lambda: ResNetConfig(num_labels=1000)),
    "vit-base": (ViTForImageClassification, lambda: ViTConfig(num_labels=1000)),
}
RESULTS = Path(__file__).resolve().parent / "results" / "families.jsonl"
STAT_KEYS = (
    "round_trips",
    "bytes_sent",
    "bytes_received",
    "seconds",
    "share_seconds",
    "wait_seconds",
    "decode_seconds",
)


def record(results: Path | None, rec: dict) -> None:
    """Prints one measurement as a JSON line (`common.emit`) and appends it to the results file."""
    emit(rec)
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        with results.open("a") as f:
            f.write(json.dumps(rec) + "\n")


def prepare_family(name: str, wd: Path):
    """Returns `(plain_model, ee_folder, key_path, conversion_result)` for a random-init family model."""
    klass, make_config = FAMILY_MODELS[name]
    torch.manual_seed(0)  # benchmark weights, nothing secret
    plain = klass(make_config()).float().eval()
    src, ee, key = wd / f"{name}-src", wd / f"{name}-ee", wd / f"{name}.hss-ee-key"
    plain.save_pretrained(src)
    result = convert(src, ee, key, force=True)
    return plain, ee, key, result


def reset_peak_rss() -> None:
    """Resets this process's peak RSS (`VmHWM`), so the next reading covers one phase only (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb(pid: int | str = "self") -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return None


def server_peak_rss_mb() -> list[float | None]:
    """Peak RSS of this process's children (the two share servers while `local_servers` runs)."""
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids += (task / "children").read_text().split()
        except OSError:
            pass
    return [peak_rss_mb(pid) for pid in sorted(set(pids), key=int)]


def snapshot(stats) -> dict:
    snap = {k: float(getattr(stats, k)) for k in STAT_KEYS}
    snap["per_stage"] = dict(stats.per_stage)
    return snap


def breakdown_ms(stats: dict, total_s: float, per: float) -> dict:
    """Secure time split with `hss_ee_stats`, in ms per `per` (tokens or images); client = total minus the rest."""
    parts = {
        "client_sharing_ms": 1000.0 * stats["share_seconds"] / per,
        "server_wait_ms": 1000.0 * stats["wait_seconds"] / per,
        "client_reconstruct_decode_ms": 1000.0 * stats["decode_seconds"] / per,
    }
    parts["client_other_ms"] = 1000.0 * total_s / per - sum(parts.values())
    return parts


@torch.no_grad()
def t5_runs(model, ids: torch.Tensor, tokens: int, stats=None) -> dict:
    """Warm-up, then `generate()` of 1 and of `tokens` new tokens: times, outputs and (secure) counters."""
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids))
    model.generate(input_ids=ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
    runs = {}
    for n in (1, tokens):
        if stats is not None:
            stats.reset()
        out, seconds = timed(model.generate, input_ids=ids, max_new_tokens=n, min_new_tokens=n, **kw)
        runs[n] = {"out": out, "seconds": seconds, "stats": snapshot(stats) if stats is not None else None}
    return runs


def bench_t5(name: str, args, wd: Path) -> list[dict]:
    if args.tokens < 2:
        raise SystemExit("--tokens must be at least 2 (decode ms/token excludes the first token)")
    plain, ee, key, conv = prepare_family(name, wd)
    gen = torch.Generator().manual_seed(1)  # benchmark input, nothing secret
    ids = torch.randint(2, plain.config.vocab_size, (1, args.prompt), generator=gen)
    reset_peak_rss()
    plain_runs = t5_runs(plain, ids, args.tokens)
    plain_rss = peak_rss_mb()
    layers = plain.config.num_layers, plain.config.num_decoder_layers
    del plain
    with local_servers(ee, extra_args=server_args(args)) as endpoints:
        with HSSEEForConditionalGeneration.from_pretrained(ee, key=key, endpoints=endpoints) as model:
            reset_peak_rss()
            secure_runs = t5_runs(model, ids, args.tokens, model.hss_ee_stats)
            secure_rss = peak_rss_mb()
        servers_rss = server_peak_rss_mb()
    n = args.tokens
    new_plain = plain_runs[n]["out"].shape[1] - 1  # minus decoder_start_token_id
    steps = n - 1
    plain_ms = 1000.0 * (plain_runs[n]["seconds"] - plain_runs[1]["seconds"]) / steps
    secure_ms = 1000.0 * (secure_runs[n]["seconds"] - secure_runs[1]["seconds"]) / steps
    first, many = secure_runs[1]["stats"], secure_runs[n]["stats"]
    per_step = {k: (many[k] - first[k]) / steps for k in STAT_KEYS}
    ttft_plain, ttft_secure = 1000.0 * plain_runs[1]["seconds"], 1000.0 * secure_runs[1]["seconds"]
    encoder = {k: v for k, v in first["per_stage"].items() if k.startswith("encoder.")}
    tag = {"model": name}
    return [
        {
            "bench": "convert",
            **tag,
            "seconds": conv.seconds,
            "max_rel_logit_diff": conv.max_rel_logit_diff,
        },
        {
            "bench": "decode",
            **tag,
            "prompt_tokens": args.prompt,
            "new_tokens": new_plain,
            "plaintext_ms_per_token": plain_ms,
            "secure_ms_per_token": secure_ms,
            "ratio": secure_ms / plain_ms,
            "plaintext_total_ms_per_token": 1000.0 * plain_runs[n]["seconds"] / n,
            "secure_total_ms_per_token": 1000.0 * secure_runs[n]["seconds"] / n,
            "tokens_match": torch.equal(plain_runs[n]["out"], secure_runs[n]["out"]),
        },
        {
            "bench": "first_token",
            **tag,
            "prompt_tokens": args.prompt,
            "plaintext_ms": ttft_plain,
            "secure_ms": ttft_secure,
            "ratio": ttft_secure / ttft_plain,
            "first_token_match": torch.equal(plain_runs[1]["out"], secure_runs[1]["out"]),
        },
        {
            "bench": "wire",
            **tag,
            "round_trips_per_token": per_step["round_trips"],
            "round_trips_per_token_expected": 6 * layers[1] + 1,
            "bytes_sent_per_token": per_step["bytes_sent"],
            "bytes_received_per_token": per_step["bytes_received"],
            "mb_per_token_total": (per_step["bytes_sent"] + per_step["bytes_received"]) / 1e6,
            "encoder_round_trips": sum(encoder.values()),
            "first_token_round_trips": first["round_trips"],
            "first_token_mb_total": (first["bytes_sent"] + first["bytes_received"]) / 1e6,
        },
        {
            "bench": "breakdown",
            **tag,
            "phase": "decode step",
            "unit": "ms/token",
            **breakdown_ms(per_step, secure_ms / 1000.0, 1.0),
        },
        {
            "bench": "breakdown",
            **tag,
            "phase": "first token",
            "unit": "ms",
            **breakdown_ms(first, secure_runs[1]["seconds"], 1.0),
        },
        {
            "bench": "memory",
            **tag,
            "plaintext_client_peak_rss_mb": plain_rss,
            "secure_client_peak_rss_mb": secure_rss,
            "server_peak_rss_mb": servers_rss,
        },
    ]


@torch.no_grad()
def vision_runs(model, pixels: torch.Tensor, repeats: int, stats=None, **kw) -> tuple[torch.Tensor, float, dict]:
    """One warm-up pass, then `repeats` timed passes: last logits, mean seconds per pass, counters of all passes."""
    model(pixel_values=pixels, **kw)  # warm-up
    if stats is not None:
        stats.reset()
    total = 0.0
    for _ in range(repeats):
        out, seconds = timed(model, pixel_values=pixels, **kw)
        total += seconds
    return out.logits, total / repeats, snapshot(stats) if stats is not None else {}


def bench_vision(name: str, args, wd: Path) -> list[dict]:
    plain, ee, key, conv = prepare_family(name, wd)
    gen = torch.Generator().manual_seed(4)  # benchmark input, nothing secret
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen)
    kw = {}
    if plain.config.model_type == "vit" and args.image_size != plain.config.image_size:
        kw["interpolate_pos_encoding"] = True
    reset_peak_rss()
    plain_logits, plain_s, _ = vision_runs(plain, pixels, args.repeats, **kw)
    plain_rss = peak_rss_mb()
    del plain
    with local_servers(ee, extra_args=server_args(args)) as endpoints:
        with HSSEEForImageClassification.from_pretrained(ee, key=key, endpoints=endpoints) as model:
            reset_peak_rss()
            secure_logits, secure_s, stats = vision_runs(model, pixels, args.repeats, model.hss_ee_stats, **kw)
            secure_rss = peak_rss_mb()
        servers_rss = server_peak_rss_mb()
    images = args.batch * args.repeats
    per_image = {k: stats[k] / images for k in STAT_KEYS}
    rel = ((secure_logits - plain_logits).abs().max() / plain_logits.abs().max()).item()
    top1 = (secure_logits.argmax(-1) == plain_logits.argmax(-1)).float().mean().item()
    plain_ms, secure_ms = 1000.0 * plain_s / args.batch, 1000.0 * secure_s / args.batch
    tag = {"model": name, "image_size": args.image_size, "batch": args.batch}
    return [
        {
            "bench": "convert",
            "model": name,
            "seconds": conv.seconds,
            "max_rel_logit_diff": conv.max_rel_logit_diff,
        },
        {
            "bench": "classify",
            **tag,
            "repeats": args.repeats,
            "plaintext_ms_per_image": plain_ms,
            "secure_ms_per_image": secure_ms,
            "ratio": secure_ms / plain_ms,
            "logits_max_rel_error": rel,
            "top1_agreement": top1,
        },
        {
            "bench": "wire",
            **tag,
            "round_trips_per_pass": stats["round_trips"] / args.repeats,
            "round_trips_per_image": per_image["round_trips"],
            "bytes_sent_per_image": per_image["bytes_sent"],
            "bytes_received_per_image": per_image["bytes_received"],
            "mb_per_image_total": (per_image["bytes_sent"] + per_image["bytes_received"]) / 1e6,
        },
        {
            "bench": "breakdown",
            **tag,
            "unit": "ms/image",
            **breakdown_ms(stats, secure_s * args.repeats, images),
        },
        {
            "bench": "memory",
            **tag,
            "plaintext_client_peak_rss_mb": plain_rss,
            "secure_client_peak_rss_mb": secure_rss,
            "server_peak_rss_mb": servers_rss,
        },
    ]


def server_args(args) -> list[str]:
    return ["--device", args.device, *server_flags(args)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models",
        nargs="+",
        default=["t5-small", "resnet-50"],
        choices=list(FAMILY_MODELS),
        help="benchmark models (default t5-small resnet-50)",
    )
    p.add_argument("--tokens", type=int, default=32, help="T5: new tokens to generate, at least 2 (default 32)")
    p.add_argument("--prompt", type=int, default=64, help="T5: prompt tokens, random ids (default 64)")
    p.add_argument("--image-size", type=int, default=224, help="vision: image height and width (default 224)")
    p.add_argument("--batch", type=int, default=1, help="vision: images per forward pass (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="vision: timed passes after one warm-up (default 3)")
    p.add_argument("--workdir", help="folder for converted models (default: a temporary folder)")
    p.add_argument(
        "--results",
        default=str(RESULTS),
        help="JSONL file the records are appended to; '' for stdout only (default bench/results/families.jsonl)",
    )
    p.add_argument("--device", default="cpu", help="server device (cpu, cuda, auto)")
    add_server_args(p)
    args = p.parse_args(argv)
    quiet()
    wd = workdir(args.workdir)
    results = Path(args.results) if args.results else None
    for name in args.models:
        bench = bench_t5 if name.startswith("t5") else bench_vision
        for rec in bench(name, args, wd):
            record(results, rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
