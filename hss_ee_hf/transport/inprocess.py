"""Two share servers' compute cores in this process: tests and single-machine trials, no network."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import StageRequestError, TransportError
from ..ring.sharing import Shares
from .base import PROTOCOL_VERSION, StageHandler, Transport, bytes_to_share


class InProcessTransport(Transport):
    """Two stage handlers (`hss_ee_hf.server.StageEngine`) in this process, called through the same byte interface.

    Args:
        engine_a (`StageHandler`): party A.
        engine_b (`StageHandler`, *optional*): party B (defaults to the same engine, which is exact and
            saves memory; the two parties still receive independent messages).
    """

    feature_maps = True

    def __init__(self, engine_a: StageHandler, engine_b: StageHandler | None = None):
        self.engines = (engine_a, engine_b or engine_a)
        self.endpoints = ("in-process:A", "in-process:B")
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hss-ee-inproc")

    def _call(
        self, party: int, fingerprint: str, stage: str, shares: Shares, out_features: int, geometry=None
    ) -> torch.Tensor:
        rows = shares.a.shape[0]
        # party A (0) is sent the 32-byte seed of its share, party B (1) its share
        payload = {"seed": shares.seed} if party == 0 else {"share": shares.b.numpy().tobytes()}
        if geometry is not None:  # feature maps: the engine unfolds them
            payload["geometry"] = geometry
        try:
            raw = self.engines[party].compute(fingerprint, stage, rows, version=PROTOCOL_VERSION, **payload)
        except StageRequestError as err:
            raise TransportError(self.endpoints[party], f"{err.code}: {err}") from err
        result_rows = rows if geometry is None else rows * geometry.patches
        return bytes_to_share(raw, result_rows, out_features, self.endpoints[party])

    def run_party(self, party, fingerprint, stage, shares, out_features):
        return self._call(party, fingerprint, stage, shares, out_features)

    def run_stage(self, fingerprint, stage, shares, out_features, geometry=None):
        fut_a = self._pool.submit(self._call, 0, fingerprint, stage, shares, out_features, geometry)
        fut_b = self._pool.submit(self._call, 1, fingerprint, stage, shares, out_features, geometry)
        return fut_a.result(), fut_b.result()

    def describe(self) -> tuple[dict, dict]:
        """What the two handlers serve, in the shape of `GrpcTransport.describe` (handlers without `describe` are
        reported with no stages and schedule 4 only)."""
        infos = []
        for engine, endpoint in zip(self.engines, self.endpoints, strict=True):
            stages = engine.describe() if hasattr(engine, "describe") else {}
            scales = {}
            for name in stages:
                s = engine.stage_scales(name) if hasattr(engine, "stage_scales") else None
                if s is not None:
                    scales[name] = s.to(torch.float64)
            infos.append(
                {
                    "endpoint": endpoint,
                    "fingerprint": getattr(engine, "fingerprint", ""),
                    "protocol_version": PROTOCOL_VERSION,
                    "max_rows": getattr(engine, "max_rows", 1 << 30),
                    "stages": stages,
                    "schedules": tuple(getattr(engine, "schedules", (4,))),
                    "scales": scales,
                }
            )
        return tuple(infos)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
