"""The share server's compute core: integer stage weights and validated ring products.

[`StageEngine`] is what a share server is, minus the network: it loads an EE checkpoint once into
the integer form the kernel reads, validates every request before computing, and returns the output
share. The gRPC server and the in-process transport both call it, so tests of one cover the other.
It is stateless between requests and never logs payloads.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from ..artifacts.checkpoint import HSSEECheckpointInfo, short
from ..artifacts.fused import SCHEDULES, iter_fused_stage_weights
from ..artifacts.integrity import verify_checkpoint
from ..errors import StageRequestError
from ..ring.csprng import SEED_BYTES
from ..ring.matmul import RingBlocks, RingWeight
from ..ring.sharing import expand_share
from ..transport.base import PROTOCOL_VERSION
from ..transport.geometry import ConvGeometry
from .batching import StageBatcher
from .memory import TRIM_ROWS, keep_freed_memory, release_after_large_request, release_freed_memory
from .options import DEFAULT_MAX_ROWS, check_engine_options, load_server_config, resolve_device
from .placement import load_stage_weights
from .unfold import unfold_share

logger = logging.getLogger(__name__)


class StageEngine:
    """Holds an EE checkpoint's stage weights and computes output shares.

    Args:
        checkpoint (`str` or `os.PathLike`): a local EE checkpoint folder.
        device (`str`, *optional*, defaults to `"cpu"`): `"cpu"`, `"cuda"` (stages spread over every visible GPU by
            size, see [`hss_ee_hf.server.placement`]), `"cuda:N"` or `"auto"`.
        max_rows (`int`, *optional*): the most rows one request may carry.
        progress (`bool`, *optional*): show a progress bar while loading.
        batch_window_ms (`float`, *optional*, defaults to 0): when positive, concurrent requests for the same
            stage arriving within this many milliseconds are computed as one batch ([`StageBatcher`]).
        kernel (`str`, *optional*): the ring kernel, `"auto"` (int8 on CUDA; on CPU native when a C compiler can
            build it), `"native"`, `"float64"` or `"int8"`; defaults to `$HSS_EE_KERNEL` or `"auto"`.
        schedules (`tuple[int, ...]`, *optional*, defaults to `(4,)`): stages per decoder layer offered to clients.
            With 2, the fused stages (`artifacts.fused`) are built here at load time from the public EE weights:
            the checkpoint stays ordinary, and the server holds and multiplies ≈ 1.9× as much.

        trust_checkpoint (`bool`, *optional*, defaults to `False`): skip recomputing the fingerprint from the
            weights and checking the shards against the config's stage layout (saves about a second per GB of
            weights; only for a checkpoint verified before).

    Raises:
        `UnsupportedArchitectureError`: schedule 2 was asked for a family that has none.

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
        schedules: tuple[int, ...] = (4,),
        trust_checkpoint: bool = False,
    ):
        check_engine_options(max_rows, batch_window_ms)
        bad = [s for s in schedules if s not in SCHEDULES]
        if bad or 4 not in schedules:
            raise ValueError(f"schedules must include 4 and be among {SCHEDULES}, got {tuple(schedules)}")
        keep_freed_memory()  # for the next large request; given back once large requests stop
        folder = Path(checkpoint)
        self.info = HSSEECheckpointInfo.from_folder(folder)
        self.config = load_server_config(folder)
        self.device = resolve_device(device)
        self.verify_seconds = 0.0
        if not trust_checkpoint:
            # Serve only weights whose fingerprint is the one announced: an edited shard would give wrong text.
            start = time.perf_counter()
            checked = verify_checkpoint(folder, self.config, self.info)
            self.verify_seconds = time.perf_counter() - start
            if checked:
                logger.info("recomputed the fingerprint of %s in %.2f s", folder, self.verify_seconds)
        self.max_rows = max_rows
        self.weights, self.placement = load_stage_weights(
            folder, self.config, self.info.ring, self.device, kernel=kernel, progress=progress
        )
        self.schedules = tuple(sorted(set(schedules), reverse=True))
        self.fused_scales: dict[str, torch.Tensor] = {}
        if 2 in self.schedules:
            for fused, blocks, scale in iter_fused_stage_weights(folder, self.config, self.info.ring):
                held = [(cols, RingWeight(w, device=self.device, kernel=kernel)) for cols, w in blocks]
                self.weights[fused.name] = RingBlocks(held)
                self.fused_scales[fused.name] = scale
        # the widest side of any stage: with max_rows (which the gRPC server may lower), the payload limit
        self.widest = max((max(w.in_features, w.out_features) for w in self.weights.values()), default=0)
        self.batcher = StageBatcher(batch_window_ms / 1000.0, max_rows) if batch_window_ms > 0 else None
        # Loading (and hashing) copied every tensor once; hand those freed pages back before serving.
        release_freed_memory()
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
        """`"int8"`, `"native"` or `"float64"`: the ring kernel the stage weights are held for."""
        return next(iter(self.weights.values())).kernel if self.weights else "float64"

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    @property
    def max_message_bytes(self) -> int:
        """Largest request or reply payload this engine can produce or accept."""
        return self.max_rows * self.widest * 8

    def describe(self) -> dict[str, tuple[int, int]]:
        """Stage name -> `(in_features, out_features)`."""
        return {name: (w.in_features, w.out_features) for name, w in self.weights.items()}

    def stage_scales(self, stage: str) -> torch.Tensor | None:
        """Public output scales of a stage built here (a fused stage), or `None` for a checkpoint stage (whose scales
        the client reads from the checkpoint's scales file)."""
        return self.fused_scales.get(stage)

    def validate(
        self,
        fingerprint: str,
        stage: str,
        rows: int,
        share: bytes | None,
        seed: bytes | None,
        version: int,
        geometry: ConvGeometry | None = None,
    ) -> RingWeight | RingBlocks:
        """Checks a request before any compute; raises `StageRequestError` with the matching status code.

        With `geometry` the request carries `rows` images' feature maps, which the server unfolds into patches.
        """
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
        if geometry is not None:
            try:
                geometry.check(weight.in_features)
            except ValueError as err:
                raise StageRequestError(f"stage {stage}: {err}") from None
            # the patches must fit what an unfolded request of `max_rows` rows could have carried
            patch_rows = rows * geometry.patches
            if patch_rows * max(weight.in_features, weight.out_features) > self.max_rows * self.widest:
                raise StageRequestError(
                    f"{rows} images of {geometry.height}x{geometry.width} make {patch_rows} patches, more than this "
                    f"server computes in one request; send fewer images per request",
                    code="RESOURCE_EXHAUSTED",
                )
        elif rows > self.max_rows:
            raise StageRequestError(
                f"{rows} rows exceed this server's limit of {self.max_rows}; send fewer tokens per request",
                code="RESOURCE_EXHAUSTED",
            )
        if (share is None) == (seed is None):
            raise StageRequestError("a request carries exactly one of a share or a seed")
        if seed is not None and len(seed) != SEED_BYTES:
            raise StageRequestError(f"a seed is {SEED_BYTES} bytes, got {len(seed)}")
        width = weight.in_features if geometry is None else geometry.map_elements
        expected = rows * width * 8
        if share is not None and len(share) != expected:
            raise StageRequestError(
                f"stage {stage} expects {rows} x {width} int64 = {expected} bytes, got {len(share)}"
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
        geometry: ConvGeometry | None = None,
    ) -> memoryview:
        """Validates a request and returns this server's output share as little-endian int64 bytes: a byte view of
        the product's own memory, not a copy (the data plane sends it as it is; a long prompt's products are tens of
        megabytes; gRPC copies it into its reply).

        Args:
            fingerprint (`str`): the checkpoint the client expects.
            stage (`str`): stage name, e.g. `"layers.3.qkv"`.
            rows (`int`): number of input rows.
            share (`bytes`, *optional*): the input share, `rows x in_features` little-endian int64. A writable
                buffer (`bytearray`, or a `memoryview` of one, as the data plane passes) is read in place, not
                copied; it must stay unchanged until this call returns.
            seed (`bytes`, *optional*): instead of `share`, a 32-byte seed that expands to it.
            geometry (`ConvGeometry`, *optional*): the share is `rows` images' `(C, H, W)` feature maps of a
                convolution stage; the server unfolds them (the reply has `rows * H_out * W_out` rows).
            version (`int`, *optional*): the client's protocol version.

        Raises:
            `StageRequestError`: the request is invalid (nothing was computed).
        """
        weight = self.validate(fingerprint, stage, rows, share, seed, version, geometry)
        width = weight.in_features if geometry is None else geometry.map_elements
        if seed is not None:
            x = expand_share(seed, (rows, width))
        else:
            # gRPC hands over immutable bytes, which torch cannot view without a (warning and a) copy
            buf = share if isinstance(share, (bytearray, memoryview)) and not memoryview(share).readonly else None
            x = torch.frombuffer(buf if buf is not None else bytearray(share), dtype=torch.int64)
            x = x.view(rows, width)
        if geometry is not None:
            x = unfold_share(x.view(rows, geometry.channels, geometry.height, geometry.width), geometry)
        y = self.batcher.run(stage, weight, x) if self.batcher is not None else weight.matmul(x)
        out = memoryview(y.cpu().contiguous().numpy()).cast("B")
        if rows >= TRIM_ROWS or y.shape[0] >= TRIM_ROWS:
            # A long prompt's or an image's buffers would otherwise stay in glibc's arenas for the life of the process.
            del x, y
            release_after_large_request()
        return out
