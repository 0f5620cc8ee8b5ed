"""Server-side batching of concurrent sessions: exact, and really batched."""

from __future__ import annotations

import threading
import time

import torch

from hss_ee_hf.ring.csprng import ChaChaStream
from hss_ee_hf.ring.matmul import RingWeight, ring_matmul_reference
from hss_ee_hf.server.batching import StageBatcher


class CountingWeight(RingWeight):
    def __init__(self, w_int):
        super().__init__(w_int)
        self.calls: list[int] = []

    def matmul(self, x):
        self.calls.append(x.shape[0])
        time.sleep(0.02)  # a product that takes time, so concurrent requests overlap even on a loaded machine
        return super().matmul(x)


def test_concurrent_requests_are_batched_and_exact():
    rng = ChaChaStream(b"\x07" * 32)
    w_int = torch.remainder(rng.int64((24, 40)), 2**16) - 2**15 + 1
    weight = CountingWeight(w_int)
    batcher = StageBatcher(window=0.2, max_rows=64)
    inputs = [rng.int64((1 + i % 3, 40)) for i in range(8)]
    results: dict[int, torch.Tensor] = {}
    start = threading.Barrier(8)

    def worker(i: int) -> None:
        start.wait()
        results[i] = batcher.run("layers.0.qkv", weight, inputs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, x in enumerate(inputs):
        assert torch.equal(results[i], ring_matmul_reference(x, w_int)), f"request {i} got another request's rows"
    assert len(weight.calls) < len(inputs), f"no batching happened: {weight.calls}"
    assert sum(weight.calls) == sum(x.shape[0] for x in inputs)


def test_batch_respects_max_rows_and_propagates_errors():
    rng = ChaChaStream(b"\x08" * 32)
    w_int = torch.remainder(rng.int64((8, 16)), 2**10)
    weight = CountingWeight(w_int)
    batcher = StageBatcher(window=0.1, max_rows=4)
    out = {}
    xs = [rng.int64((3, 16)) for _ in range(3)]
    threads = [
        threading.Thread(target=lambda i=i: out.__setitem__(i, batcher.run("s", weight, xs[i]))) for i in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(n <= 4 for n in weight.calls), weight.calls
    assert len(out) == 3

    class Broken(RingWeight):
        def matmul(self, x):
            raise RuntimeError("kernel failed")

    errors = []
    one_row = rng.int64((1, 16))

    def failing():
        try:
            batcher.run("t", Broken(w_int), one_row)
        except RuntimeError as err:
            errors.append(err)

    threads = [threading.Thread(target=failing) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(errors) == 3, "a waiter hung or missed the failure"


def test_a_lone_request_does_not_wait_for_company():
    rng = ChaChaStream(b"\x09" * 32)
    w_int = torch.remainder(rng.int64((8, 16)), 2**10)
    weight = CountingWeight(w_int)
    batcher = StageBatcher(window=0.5, max_rows=64)
    x = rng.int64((2, 16))
    start = time.monotonic()
    for _ in range(3):  # one session alone: each request finds the server idle
        assert torch.equal(batcher.run("layers.0.o", weight, x), ring_matmul_reference(x, w_int))
    assert time.monotonic() - start < 0.5, "a lone request waited for the batching window"
    assert batcher.lone == 3 and weight.calls == [2, 2, 2]
