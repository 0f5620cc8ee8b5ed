"""Equivariance check run by every conversion before anything is moved into place.

It loads the original and the freshly written EE checkpoint (through the architecture's plain transformers
Auto class, e.g. `AutoModelForCausalLM.from_pretrained`, which also proves the files load) and compares
`logits_EE(ee_inputs(x))[..., pi]` with `logits(x)` on random inputs the spec draws (token ids, or
pixel values for image classifiers). Models larger than
`memory_bytes` are run with accelerate's disk offload (layers are loaded one at a time), so
verification does not need the model in memory twice.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from hss_ee_hf.ee.specs import EESpec
from hss_ee_hf.errors import ConversionError

from .source import ModelSource, load_bounded

logger = logging.getLogger(__name__)


@torch.no_grad()
def verify_equivariance(source: ModelSource, ee_folder: Path, spec: EESpec, tolerance: float) -> tuple[float, float]:
    """Compares original and EE logits on random inputs.

    Returns:
        `(max_abs_diff, max_rel_diff)` where the relative figure divides by the largest |logit|.

    Raises:
        `ConversionError`: the relative difference exceeds `tolerance`.
    """
    original = source.load_model(spec.auto_class)
    inputs = spec.verification_inputs()
    reference = original(**inputs).logits.to(torch.float64)
    del original
    with tempfile.TemporaryDirectory(prefix=".hss-ee-offload-", dir=ee_folder.parent) as offload:
        ee_model = load_bounded(ee_folder, Path(offload), auto_class=spec.auto_class)
        ee_logits = ee_model(**spec.ee_inputs(inputs)).logits[..., spec.vocab_perm].to(torch.float64)
        del ee_model
    max_abs = (ee_logits - reference).abs().max().item()
    max_rel = max_abs / max(reference.abs().max().item(), 1e-12)
    logger.info("equivariance check: max |dlogit| = %.3g (relative %.3g)", max_abs, max_rel)
    if not max_rel <= tolerance:
        raise ConversionError(
            f"equivariance check failed: relative logit error {max_rel:.3g} exceeds {tolerance:g}; "
            "nothing was written. This is a bug in the EE recipe for this architecture, please report it"
        )
    return max_abs, max_rel
