"""The floor of server-side unfolding for convolutions: a minimal prototype, measured against plaintext ResNet-50.

Usage:

    python bench/unfold_floor.py --repeats 3 --source WORKDIR/resnet-50-src --client-other-ms 69

Today the client unfolds each convolution's input into im2col patches and shares those (9x a 3x3 convolution's
input on the wire). The alternative is to share the feature map itself and let each server unfold its share (unfolding
is linear, so each server can unfold its own share exactly). This prototype measures that design's ring part on
ResNet-50 at 224x224 with nothing else in the way: two server processes on plain loopback TCP sockets (length-prefixed
frames, no validation, no TLS), each holding every convolution's weight as a [`RingWeight`] (native kernel, random
16-bit weights of the right shapes). Per convolution the client draws party A's seed and mask, sends party B
`x - a` as the `(C, H, W)` feature map and party A its seed; each server expands or reads its share, zero-pads,
unfolds (`Tensor.unfold`, int64), multiplies and replies `(H_out * W_out, C_out)` int64; the client adds the two
replies. Party A's product is not prepared ahead of time. It runs with the placement the data plane uses on one
machine (client and party B on one core, party A on the other).

It prints plaintext ms per image (the transformers model, torch's default threads), the prototype's ring part, and
`floor_ratio = (ring part + client_other_ms) / plaintext`, where `client_other_ms` is the client's own work of the
real secure pass (batch norm, activations, pooling, residuals), which this design does not change; pass the figure
`bench/families.py` printed (`breakdown`), 99 ms by default.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import struct
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

HEADER = struct.Struct("<IIIII")  # stage, C, H, W, payload bytes (0 = party A: the body is a 32-byte seed)


def _recv(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    while view:
        got = sock.recv_into(view)
        if not got:
            raise ConnectionError("closed")
        view = view[got:]
    return buf


def _geometry(model: nn.Module, pixels: torch.Tensor) -> list[tuple[int, int, int, int, int, int, int]]:
    """`(C_in, C_out, k, stride, padding, H, W)` of every convolution, in call order."""
    convs: list[tuple[int, ...]] = []

    def hook(module, inputs, _output):
        _, c, h, w = inputs[0].shape
        convs.append((c, module.out_channels, module.kernel_size[0], module.stride[0], module.padding[0], h, w))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(pixels)
    for h in handles:
        h.remove()
    return convs


def _server(port_queue, convs, core: int | None) -> None:
    from hss_ee_hf.ring.matmul import RingWeight
    from hss_ee_hf.ring.native import limit_threads
    from hss_ee_hf.ring.sharing import expand_share

    torch.set_num_threads(1)
    limit_threads(1)
    if core is not None:
        os.sched_setaffinity(0, {core})
    g = torch.Generator().manual_seed(0)
    weights = [
        RingWeight(torch.randint(-(1 << 15) + 1, 1 << 15, (c_out, c_in * k * k), generator=g))
        for c_in, c_out, k, *_ in convs
    ]
    listener = socket.create_server(("127.0.0.1", 0))
    port_queue.put(listener.getsockname()[1])
    sock, _ = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        try:
            stage, c, h, w, nbytes = HEADER.unpack(_recv(sock, HEADER.size))
        except ConnectionError:
            return
        if nbytes == 0:
            x = expand_share(bytes(_recv(sock, 32)), (c, h, w))
        else:
            x = torch.frombuffer(_recv(sock, nbytes), dtype=torch.int64).view(c, h, w)
        _, _, k, s, p, _, _ = convs[stage]
        if p:
            x = F.pad(x.unsqueeze(0), (p, p, p, p)).squeeze(0)  # zero padding: zero is a share of zero
        patches = x.unfold(1, k, s).unfold(2, k, s)  # (C, H_out, W_out, k, k)
        h_out, w_out = patches.shape[1], patches.shape[2]
        rows = patches.permute(1, 2, 0, 3, 4).reshape(h_out * w_out, c * k * k)
        y = weights[stage].matmul(rows)
        out = memoryview(y.numpy()).cast("B")
        sock.sendall(struct.pack("<I", len(out)))
        sock.sendall(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--client-other-ms", type=float, default=99.0, help="the real secure pass's client work")
    p.add_argument("--source", help="a saved ResNet-50 to time as plaintext (bench/families.py's `resnet-50-src`)")
    args = p.parse_args(argv)

    from transformers import ResNetConfig, ResNetForImageClassification

    from hss_ee_hf.ring.sharing import mask_for

    if args.source:
        model = ResNetForImageClassification.from_pretrained(args.source).eval()
    else:
        model = ResNetForImageClassification(ResNetConfig(num_labels=1000)).eval()
    pixels = torch.randn(1, 3, 224, 224)
    convs = _geometry(model, pixels)
    with torch.no_grad():
        for _ in range(3):
            model(pixels)
        start = time.perf_counter()
        for _ in range(args.repeats):
            model(pixels)
        plaintext_ms = 1000 * (time.perf_counter() - start) / args.repeats

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    home, other = (cores[0], cores[1]) if len(cores) >= 2 else (None, None)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_server, args=(queue, convs, core), daemon=True) for core in (other, home)]  # A, B
    for proc in procs:
        proc.start()
    socks = []
    for _ in procs:
        s = socket.create_connection(("127.0.0.1", queue.get(timeout=120)))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
    if home is not None:
        os.sched_setaffinity(0, {home})
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randint(-(2**62), 2**62, (c, h, w), generator=gen) for c, _, _, _, _, h, w in convs]

    def ring_pass() -> int:
        sent = 0
        for stage, (c, _, _, _, _, h, w) in enumerate(convs):
            seed, a = mask_for((c, h, w))
            b = inputs[stage] - a
            body = memoryview(b.numpy()).cast("B")
            socks[0].sendall(HEADER.pack(stage, c, h, w, 0) + seed)
            socks[1].sendall(HEADER.pack(stage, c, h, w, len(body)))
            socks[1].sendall(body)
            sent += len(body) + 32
            replies = []
            for sock in socks:
                (n,) = struct.unpack("<I", _recv(sock, 4))
                replies.append(torch.frombuffer(_recv(sock, n), dtype=torch.int64))
            y = replies[0] + replies[1]  # reconstruction (the ring wraps)
            assert y.numel() > 0
        return sent

    ring_pass()  # warm up
    start = time.perf_counter()
    for _ in range(args.repeats):
        sent = ring_pass()
    ring_ms = 1000 * (time.perf_counter() - start) / args.repeats
    for sock in socks:
        sock.close()
    floor_ms = ring_ms + args.client_other_ms
    print(
        json.dumps(
            {
                "bench": "unfold_floor",
                "model": "resnet-50",
                "image_size": 224,
                "convolutions": len(convs),
                "plaintext_ms_per_image": plaintext_ms,
                "ring_part_ms_per_image": ring_ms,
                "client_other_ms": args.client_other_ms,
                "floor_ms_per_image": floor_ms,
                "floor_ratio": floor_ms / plaintext_ms,
                "bytes_sent_per_image": sent,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
