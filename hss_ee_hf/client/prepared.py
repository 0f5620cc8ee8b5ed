"""Party A's products for future stage calls, asked for in chunks ahead of time (DESIGN.md §4, offline/online).

Party A's share is a function of a fresh seed only, never of the data, so its product can be computed before
the data exists. [`PreparedProducts`] keeps, per stage and row count, a stock of such products: one request
under one seed covers the next `k` calls of that stage (`k * rows` mask rows), each call takes its own rows once,
and the stock is topped up while the client works. Decode is memory-bound, so a chunk of `k` rows costs party A
little more than one row (SmolLM2, one thread: 27.6 ms per token for one row, 16.8 ms per token in chunks of 16);
on a machine that also runs party B, A's weight traffic then no longer halves B's memory bandwidth. Chunks start
at one call and double up to `depth`, so the first tokens never wait for a large chunk.

What each server receives is unchanged: party A 32-byte seeds (fewer of them), party B `x - a` with every mask row
used exactly once. This needs a `pipelined` transport (the data plane), where asking is a write whose reply waits
on the wire until a call reads it.
"""

from __future__ import annotations

import logging
from collections import deque

import torch

from ..errors import TransportError
from ..ring.sharing import Shares, mask_for
from ..transport.base import PendingShare, Transport

logger = logging.getLogger(__name__)

DEFAULT_DEPTH = 16
"""The most future calls of one stage and shape that one request to party A prepares."""
DEFAULT_BUDGET_BYTES = 64 << 20
"""Client memory the prepared masks and products may take; chunks shrink (down to one call) to stay below it."""
_NO_SHARE = torch.empty(0, dtype=torch.int64)  # party B's share of a prepared call does not exist yet


class _Chunk:
    """Party A's product for the next `calls` calls of one stage: `calls * rows` mask rows under one seed."""

    __slots__ = ("seed", "a", "pending", "y", "calls", "used", "nbytes")

    def __init__(self, seed: bytes, a: torch.Tensor, pending: PendingShare, calls: int, nbytes: int):
        self.seed, self.a, self.pending, self.y = seed, a, pending, None
        self.calls, self.used, self.nbytes = calls, 0, nbytes


class _Stock:
    __slots__ = ("chunks", "next_calls", "left")

    def __init__(self):
        self.chunks: deque[_Chunk] = deque()
        self.next_calls = 1  # chunks double from one call up to the depth
        self.left = 0  # calls prepared (arrived or on the wire) and not yet taken


class PreparedProducts:
    """Party A's products for future calls, per `(stage, rows)`, on a pipelined transport.

    Args:
        transport (`Transport`): a `pipelined` transport.
        fingerprint (`str`): the checkpoint the servers hold.
        max_rows (`int`, *optional*): the most rows one request may carry (the servers' limit); chunks stay within it.
        depth (`int`, *optional*, defaults to 16): the most calls one chunk prepares.
        budget_bytes (`int`, *optional*, defaults to 64 MiB): client memory for prepared masks and products.

    Example:

    ```python
    >>> prepared = PreparedProducts(transport, info.fingerprint)
    >>> got = prepared.take("layers.0.qkv", rows=1)  # None until a chunk was asked for
    >>> prepared.top_up("layers.0.qkv", rows=1, in_features=576, out_features=960)
    ```
    """

    def __init__(
        self,
        transport: Transport,
        fingerprint: str,
        max_rows: int = 4096,
        depth: int = DEFAULT_DEPTH,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
    ):
        self.transport, self.fingerprint, self.max_rows = transport, fingerprint, max_rows
        self.depth, self.budget_bytes = depth, budget_bytes
        self.held_bytes = 0
        self._stocks: dict[tuple[str, int], _Stock] = {}

    def take(self, stage: str, rows: int) -> tuple[bytes, torch.Tensor, _Chunk, int] | None:
        """The next prepared call of `stage` with `rows` rows: `(seed, party A's share, chunk, index)`, or `None`.

        Pass the chunk and index to [`collect`] for party A's output share (after sending party B its share).
        """
        stock = self._stocks.get((stage, rows))
        if stock is None or not stock.chunks:
            return None
        chunk = stock.chunks[0]
        index = chunk.used
        chunk.used += 1
        stock.left -= 1
        if chunk.used == chunk.calls:
            stock.chunks.popleft()
        return chunk.seed, chunk.a[index * rows : (index + 1) * rows], chunk, index

    def collect(self, chunk: _Chunk, index: int, rows: int) -> torch.Tensor:
        """Party A's output share of a call [`take`] returned (reads the chunk's reply on its first call).

        Raises:
            `TransportError`: party A failed for good (naming it).
        """
        if chunk.y is None:
            chunk.y = chunk.pending.result()
        if chunk.used == chunk.calls and index == chunk.calls - 1:
            self.held_bytes -= chunk.nbytes  # its last call: the tensors go with the caller's references
        return chunk.y[index * rows : (index + 1) * rows]

    def top_up(self, stage: str, rows: int, in_features: int, out_features: int) -> None:
        """Asks party A for another chunk when fewer than half a chunk's calls are left (a write, nothing more)."""
        stock = self._stocks.get((stage, rows))
        if stock is None:
            stock = self._stocks[(stage, rows)] = _Stock()
        if stock.left >= max(self.depth // 2, 1):
            return
        per_call = rows * (in_features + out_features) * 8
        calls = min(stock.next_calls, max(self.max_rows // rows, 1))
        while calls > 1 and self.held_bytes + calls * per_call > self.budget_bytes:
            calls //= 2
        if stock.left and self.held_bytes + calls * per_call > self.budget_bytes:
            return  # over budget with calls still in stock: they last until the next top-up
        seed, a = mask_for((calls * rows, in_features))
        try:
            pending = self.transport.send_party(
                0, self.fingerprint, stage, Shares(seed=seed, a=a, b=_NO_SHARE), out_features
            )
        except TransportError as err:  # the next call asks both servers, and reports what is wrong
            logger.debug("could not ask party A ahead for %s (%s)", stage, type(err).__name__)
            return
        stock.chunks.append(_Chunk(seed, a, pending, calls, calls * per_call))
        stock.left += calls
        stock.next_calls = min(2 * calls, self.depth)
        self.held_bytes += calls * per_call

    def wait(self) -> None:
        """Reads every reply asked for (tests and benchmarks: party A's work then no longer overlaps theirs)."""
        for key, stock in list(self._stocks.items()):
            for chunk in stock.chunks:
                if chunk.y is None:
                    try:
                        chunk.y = chunk.pending.result()
                    except TransportError:
                        del self._stocks[key]  # the next call of that stage asks both servers
                        break

    def clear(self) -> None:
        """Drops every prepared product (the replies still on the wire are read and discarded)."""
        for stock in self._stocks.values():
            for chunk in stock.chunks:
                if chunk.y is None:
                    chunk.pending.cancel()
        self._stocks.clear()
        self.held_bytes = 0
