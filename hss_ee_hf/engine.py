"""The share server's compute core: integer stage weights and validated ring products.

[`StageEngine`] is what a share server is, minus the network: it loads an EE checkpoint once into
the integer form the kernel reads, validates every request before computing, and returns the output
share. The gRPC server and the in-process transport both call it, so tests of one cover the other.
It is stateless between requests and never logs payloads.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig

from .checkpoint import INDEX_FILE, HSSEECheckpointInfo, short
from .csprng import SEED_BYTES
from .errors import CheckpointError, StageRequestError
from .ring import RingConfig, RingWeight, quantize_weight
from .sharing import expand_share
from .stages import Stage, stage_layout, stage_matrix

logger = logging.getLogger(__name__)
DEFAULT_MAX_ROWS = 8192
PROTOCOL_VERSION = 1


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index (or the single `model.safetensors`)."""
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"{folder} has neither {INDEX_FILE} nor model.safetensors")
    with safe_open(str(single), "pt") as f:
        return {name: single for name in f.keys()}


def iter_stage_weights(
    folder: str | os.PathLike, config, ring: RingConfig, progress: bool = False
) -> Iterator[tuple[Stage, torch.Tensor, torch.Tensor]]:
    """Yields `(stage, w_int, scale)` for every stage of an EE checkpoint, one stage in memory at a time.

    Args:
        folder (`str` or `os.PathLike`): the EE checkpoint folder.
        config (`PretrainedConfig`): its config.
        ring (`RingConfig`): quantisation parameters.
        progress (`bool`, *optional*): show a progress bar.
    """
    folder = Path(folder)
    files = _weight_files(folder)
    layout = stage_layout(config)
    for stage in tqdm(layout, desc="Loading stage weights", disable=not progress, unit="stage"):
        parts = []
        for part in stage.parts:
            if part.weight not in files:
                raise CheckpointError(f"{folder} lacks tensor {part.weight} needed by stage {stage.name}")
            with safe_open(str(files[part.weight]), "pt") as f:
                t = f.get_tensor(part.weight)
            parts.append(stage_matrix(part, t))
        w_int, scale = quantize_weight(torch.cat(parts, dim=0), ring)
        yield stage, w_int, scale


class _Job:
    __slots__ = ("x", "done", "result", "error")

    def __init__(self, x: torch.Tensor):
        self.x, self.done, self.result, self.error = x, threading.Event(), None, None


class StageBatcher:
    """Batches concurrent requests for the same stage into one matrix product.

    The first request for a stage waits `window` seconds for others (from other sessions) to arrive,
    then computes all their rows in one product and hands each request its rows back. Rows are
    independent, so the result is exactly what separate products give; decode is memory-bound, so
    one product over many rows costs about as much as one over a single row.

    While the server has seen no two requests in flight at once for a while (`quiet` seconds), a
    request computes at once: one session alone never waits for company that cannot come (measured
    on SmolLM2, a 2 ms window otherwise cut a lone session from 2.3 to 1.45 tokens/s). The first
    overlap switches batching back on.

    Args:
        window (`float`): seconds the first request of a batch waits for company.
        max_rows (`int`): a batch never grows beyond this many rows.
        quiet (`float`, *optional*, defaults to 0.25): seconds without overlapping requests after which a request
            computes without waiting.
    """

    def __init__(self, window: float, max_rows: int, quiet: float = 0.25):
        self.window, self.max_rows, self.quiet = window, max_rows, quiet
        self._busy_until = 0.0
        self._lock = threading.Lock()
        self._open: dict[str, list[_Job]] = {}
        self._active = 0  # requests inside run(), for any stage
        self.lone = 0  # requests computed at once because nothing else was in flight (tests read it)

    def run(self, stage: str, weight: RingWeight, x: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self._active += 1
            now = time.monotonic()
            if self._active > 1:
                self._busy_until = now + self.quiet
            lone = self._active == 1 and now >= self._busy_until
            self.lone += lone
        try:
            if lone:
                return weight.matmul(x)
            return self._run(stage, weight, x)
        finally:
            with self._lock:
                self._active -= 1

    def _run(self, stage: str, weight: RingWeight, x: torch.Tensor) -> torch.Tensor:
        job = _Job(x)
        with self._lock:
            batch = self._open.get(stage)
            if batch is not None and sum(j.x.shape[0] for j in batch) + x.shape[0] <= self.max_rows:
                batch.append(job)
                leader = False
            else:
                self._open[stage] = batch = [job]
                leader = True
        if not leader:
            job.done.wait()
            if job.error is not None:
                raise job.error
            return job.result
        time.sleep(self.window)
        with self._lock:
            if self._open.get(stage) is batch:
                del self._open[stage]
        try:
            out = weight.matmul(torch.cat([j.x for j in batch]) if len(batch) > 1 else x)
            for j, part in zip(batch, out.split([j.x.shape[0] for j in batch]), strict=True):
                j.result = part
        except Exception as err:  # every waiter must learn of the failure, not hang
            for j in batch:
                j.error = err
        finally:
            for j in batch[1:]:
                j.done.set()
        if job.error is not None:
            raise job.error
        return job.result


class StageEngine:
    """Holds an EE checkpoint's stage weights and computes output shares.

    Args:
        checkpoint (`str` or `os.PathLike`): a local EE checkpoint folder.
        device (`str`, *optional*, defaults to `"cpu"`): `"cpu"`, `"cuda"`, `"cuda:N"` or `"auto"`.
        max_rows (`int`, *optional*): the most rows one request may carry.
        progress (`bool`, *optional*): show a progress bar while loading.
        batch_window_ms (`float`, *optional*, defaults to 0): when positive, concurrent requests for the same
            stage arriving within this many milliseconds are computed as one batch ([`StageBatcher`]).
        kernel (`str`, *optional*): the CPU ring kernel, `"auto"` (native when a C compiler can build it),
            `"native"` or `"float64"`; defaults to `$HSS_EE_KERNEL` or `"auto"`. CUDA always uses float64.

    Example:

    ```python
    >>> engine = StageEngine("smollm2-ee")
    >>> out_bytes = engine.compute(engine.fingerprint, "layers.0.qkv", rows=1, share=share_bytes)
    ```
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        device: str = "cpu",
        max_rows: int = DEFAULT_MAX_ROWS,
        progress: bool = False,
        batch_window_ms: float = 0.0,
        kernel: str | None = None,
    ):
        folder = Path(checkpoint)
        self.info = HSSEECheckpointInfo.from_folder(folder)
        self.config = AutoConfig.from_pretrained(folder)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.max_rows = max_rows
        self.weights: dict[str, RingWeight] = {}
        for stage, w_int, _ in iter_stage_weights(folder, self.config, self.info.ring, progress=progress):
            self.weights[stage.name] = RingWeight(w_int, device=self.device, kernel=kernel)
        self.batcher = StageBatcher(batch_window_ms / 1000.0, max_rows) if batch_window_ms > 0 else None
        held = sum(w.nbytes for w in self.weights.values())
        logger.info(
            "loaded %d stages of checkpoint %s on %s (%s kernel, %.1f MB of weights)",
            len(self.weights),
            short(self.fingerprint),
            self.device,
            self.kernel,
            held / 1e6,
        )

    @property
    def kernel(self) -> str:
        """`"native"` or `"float64"`: the ring kernel the stage weights are held for."""
        return next(iter(self.weights.values())).kernel if self.weights else "float64"

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    @property
    def max_message_bytes(self) -> int:
        """Largest request or reply payload this engine can produce or accept."""
        widest = max(max(w.in_features, w.out_features) for w in self.weights.values())
        return self.max_rows * widest * 8

    def describe(self) -> dict[str, tuple[int, int]]:
        """Stage name -> `(in_features, out_features)`."""
        return {name: (w.in_features, w.out_features) for name, w in self.weights.items()}

    def validate(
        self, fingerprint: str, stage: str, rows: int, share: bytes | None, seed: bytes | None, version: int
    ) -> RingWeight:
        """Checks a request before any compute; raises `StageRequestError` with the matching status code."""
        if version != PROTOCOL_VERSION:
            raise StageRequestError(
                f"protocol version {version} is not supported (server speaks {PROTOCOL_VERSION}); "
                "use the same hss-ee-hf version on client and servers",
                code="FAILED_PRECONDITION",
            )
        if fingerprint != self.fingerprint:
            raise StageRequestError(
                f"fingerprint {short(fingerprint) if fingerprint else '(empty)'} does not match the served "
                f"checkpoint {short(self.fingerprint)}; point the client at servers of the same checkpoint",
                code="FAILED_PRECONDITION",
            )
        weight = self.weights.get(stage)
        if weight is None:
            first = next(iter(self.weights), "?")
            raise StageRequestError(f"unknown stage {stage!r}; this checkpoint has stages like {first!r}")
        if not 0 < rows:
            raise StageRequestError(f"rows must be positive, got {rows}")
        if rows > self.max_rows:
            raise StageRequestError(
                f"{rows} rows exceed this server's limit of {self.max_rows}; send fewer tokens per request",
                code="RESOURCE_EXHAUSTED",
            )
        if (share is None) == (seed is None):
            raise StageRequestError("a request carries exactly one of a share or a seed")
        if seed is not None and len(seed) != SEED_BYTES:
            raise StageRequestError(f"a seed is {SEED_BYTES} bytes, got {len(seed)}")
        expected = rows * weight.in_features * 8
        if share is not None and len(share) != expected:
            raise StageRequestError(
                f"stage {stage} expects {rows} x {weight.in_features} int64 = {expected} bytes, got {len(share)}"
            )
        return weight

    def compute(
        self,
        fingerprint: str,
        stage: str,
        rows: int,
        share: bytes | None = None,
        seed: bytes | None = None,
        version: int = PROTOCOL_VERSION,
    ) -> bytes:
        """Validates a request and returns this server's output share as little-endian int64 bytes.

        Args:
            fingerprint (`str`): the checkpoint the client expects.
            stage (`str`): stage name, e.g. `"layers.3.qkv"`.
            rows (`int`): number of input rows.
            share (`bytes`, *optional*): the input share, `rows x in_features` little-endian int64. A writable
                buffer (`bytearray`, or a `memoryview` of one, as the data plane passes) is read in place, not
                copied; it must stay unchanged until this call returns.
            seed (`bytes`, *optional*): instead of `share`, a 32-byte seed that expands to it.
            version (`int`, *optional*): the client's protocol version.

        Raises:
            `StageRequestError`: the request is invalid (nothing was computed).
        """
        weight = self.validate(fingerprint, stage, rows, share, seed, version)
        if seed is not None:
            x = expand_share(seed, (rows, weight.in_features))
        else:
            # gRPC hands over immutable bytes, which torch cannot view without a (warning and a) copy
            buf = share if isinstance(share, (bytearray, memoryview)) and not memoryview(share).readonly else None
            x = torch.frombuffer(buf if buf is not None else bytearray(share), dtype=torch.int64)
            x = x.view(rows, weight.in_features)
        y = self.batcher.run(stage, weight, x) if self.batcher is not None else weight.matmul(x)
        return y.cpu().numpy().tobytes()
