"""Private image classification (ResNet, ViT) with an EE checkpoint on two share servers.

Convert and serve first:

    hss-ee convert microsoft/resnet-50 resnet-50-ee --key ~/keys/resnet-50.hss-ee-key
    hss-ee serve resnet-50-ee --host 0.0.0.0 --port 50051        # on each of the two hosts

then:

    python examples/classify_private.py --checkpoint resnet-50-ee --key ~/keys/resnet-50.hss-ee-key \
        --endpoints hostA:50051 hostB:50051 cat.png dog.jpg

`--in-process` instead of `--endpoints` computes both shares in this process (a single-machine trial).
"""

from __future__ import annotations

import argparse
import time

from PIL import Image
from transformers import pipeline

import hss_ee_hf  # noqa: F401  (registers the "hss-ee-*" pipelines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--checkpoint", required=True, help="EE checkpoint folder or Hub id")
    parser.add_argument("--key", required=True, help="the secret key file written by `hss-ee convert`")
    servers = parser.add_mutually_exclusive_group(required=True)
    servers.add_argument("--endpoints", nargs=2, metavar=("A", "B"), help="host:port of share servers A and B")
    servers.add_argument("--in-process", action="store_true", help="run both parties in this process (trial)")
    parser.add_argument("--top-k", type=int, default=3, help="labels per image")
    args = parser.parse_args()

    connect = {"endpoints": args.endpoints}
    if args.in_process:
        from hss_ee_hf.server import StageEngine
        from hss_ee_hf.transport import InProcessTransport

        connect = {"transport": InProcessTransport(StageEngine(args.checkpoint))}
    with pipeline("hss-ee-image-classification", model=args.checkpoint, key=args.key, **connect) as classify:
        start = time.perf_counter()
        results = classify([Image.open(path).convert("RGB") for path in args.images], top_k=args.top_k)
        seconds = time.perf_counter() - start
        for path, rows in zip(args.images, results, strict=True):
            print(path, ", ".join(f"{row['label']} ({row['score']:.3f})" for row in rows))
        stats = classify.model.hss_ee_stats
        print(
            f"{len(args.images)} image(s) in {seconds:.2f}s: {stats.round_trips} round trips, "
            f"{(stats.bytes_sent + stats.bytes_received) / 1e6:.1f} MB on the wire"
        )


if __name__ == "__main__":
    main()
