"""Decode speed at network latency: 4 stages, 2 stages, 2 stages + prompt lookup, and plaintext, in one run.

Usage:

    python bench/latency.py --tokens 8 --rtts 0 2 10 30

Two `hss-ee serve --schedules 4,2` processes run on loopback; the client reaches each through a small delay proxy
(this file, bench code only, never in the package) that holds every chunk for RTT/2 in each direction. For each
emulated RTT the same copy-heavy chat prompt is decoded greedily with `min_new_tokens == max_new_tokens`; decode
ms/token is `(t(N + 1 tokens) - t(1 token)) / N`, which removes prefill. Every secure run's tokens are checked
against plaintext greedy. Writes JSON lines to stdout and `bench/results/latency_smollm2.{jsonl,png}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_server_args, emit, prepare, quiet, server_flags, timed, workdir  # noqa: E402

from hss_ee_hf.cli.demo import local_servers  # noqa: E402
from hss_ee_hf.client.modeling import HSSEEForCausalLM  # noqa: E402

COPY_HEAVY = (
    "Repeat this list exactly, one item per line: apples, bananas, cherries, dates, elderberries, figs, grapes, "
    "honeydew, kiwis, lemons."
)
RESULTS = Path(__file__).resolve().parent / "results"


class DelayProxy:
    """A TCP proxy on loopback that delays every chunk by `one_way` seconds in each direction (order kept).

    Args:
        target (`str`): `host:port` to forward to.
    """

    def __init__(self, target: str):
        self.host, port = target.rsplit(":", 1)
        self.port, self.one_way = int(port), 0.0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait()

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        ready.set()
        self.loop.run_forever()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def send() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                if (wait := due - self.loop.time()) > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.ensure_future(send())
        try:
            while data := await reader.read(1 << 16):
                queue.put_nowait((self.loop.time() + self.one_way, data))
        except ConnectionError:
            pass
        queue.put_nowait(None)
        await sender

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True)


def decode_ms(model, inputs, tokens: int, **extra) -> tuple[float, torch.Tensor, object]:
    """`(decode ms/token, output of the long run, stats of the long run)`."""
    kwargs = dict(do_sample=False, pad_token_id=0, **extra)
    _, t1 = timed(model.generate, **inputs, max_new_tokens=1, min_new_tokens=1, **kwargs)
    stats = getattr(model, "hss_ee_stats", None)
    if stats is not None:
        stats.reset()
    out, tn = timed(model.generate, **inputs, max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, **kwargs)
    return (tn - t1) / tokens * 1e3, out, stats


def save_latency_plot(records: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'); no plot written", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for variant in dict.fromkeys(r["variant"] for r in records):
        points = sorted((r["rtt_ms"], r["ms_per_token"]) for r in records if r["variant"] == variant)
        ax.plot(*zip(*points, strict=True), marker="o", label=variant)
    ax.set_xlabel("emulated RTT (ms)")
    ax.set_ylabel("decode ms per token")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: decode time vs network round-trip time")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8, help="decode tokens timed per variant and RTT (default 8)")
    parser.add_argument("--rtts", type=float, nargs="+", default=[0, 2, 10, 30], help="emulated RTTs in ms")
    parser.add_argument("--lookup", type=int, default=4, help="prompt lookup draft length (default 4)")
    parser.add_argument("--client-threads", type=int, default=1, help="torch threads of the client (default 1)")
    parser.add_argument("--workdir", help="where the converted model is kept (default: a temporary folder)")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    add_server_args(parser)
    args = parser.parse_args()
    quiet()
    plain, ee, key, tok = prepare("smollm2", workdir(args.workdir))
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": COPY_HEAVY}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    records = []
    flags = ["--schedules", "4,2", *server_flags(args)]
    with local_servers(ee, timeout=900, extra_args=flags) as endpoints:  # fused weights are built at load
        proxies = [DelayProxy(e) for e in endpoints]
        via = tuple(p.endpoint for p in proxies)
        torch.set_num_threads(args.client_threads)
        models = {s: HSSEEForCausalLM.from_pretrained(ee, key=key, endpoints=via, stages_per_layer=s) for s in (4, 2)}
        variants = {
            "4 stages": (models[4], {}),
            "2 stages": (models[2], {}),
            f"2 stages + prompt lookup {args.lookup}": (models[2], {"prompt_lookup_num_tokens": args.lookup}),
        }
        plain_ms, expected, _ = decode_ms(plain, inputs, args.tokens)
        for rtt in args.rtts:
            for proxy in proxies:
                proxy.one_way = rtt / 2e3
            records.append({"variant": "plaintext", "rtt_ms": rtt, "ms_per_token": round(plain_ms, 2)})
            emit(records[-1])
            for name, (model, extra) in variants.items():
                ms, out, stats = decode_ms(model, inputs, args.tokens, **extra)
                record = {
                    "variant": name,
                    "rtt_ms": rtt,
                    "ms_per_token": round(ms, 2),
                    "x_plaintext": round(ms / plain_ms, 2),
                    "same_tokens_as_plaintext": bool(torch.equal(out, expected)),
                    "round_trips_per_token": round(stats.round_trips_per_token, 2),
                    "passes": stats.passes,
                    "precomputed": stats.precomputed,
                    "round_trips": stats.round_trips,
                }
                records.append(record)
                emit(record)
        for model in models.values():
            model.close()
    if not args.no_save:
        with open(RESULTS / "latency_smollm2.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        save_latency_plot(records, RESULTS / "latency_smollm2.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
