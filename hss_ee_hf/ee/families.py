"""The registry of supported architectures: which EE spec converts a config (DESIGN.md §5).

Decoder LLMs (Llama, Mistral, Qwen2, GPT-2), T5 text-to-text models and image classifiers (ResNet, ViT)
each have an [`EESpec`]; the stage layouts the servers compute are in [`hss_ee_hf.artifacts.layouts`].
"""

from __future__ import annotations

from ..errors import UnsupportedArchitectureError
from .resnet import ResNetSpec
from .specs import EESpec, GPT2Spec, LlamaFamilySpec
from .t5 import T5Spec
from .vit import ViTSpec

SPECS: tuple[type[EESpec], ...] = (LlamaFamilySpec, GPT2Spec, T5Spec, ResNetSpec, ViTSpec)
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(a for spec in SPECS for a in spec.architectures)


def spec_class_for(config) -> type[EESpec]:
    """The EE spec of a config's architecture.

    Raises:
        `UnsupportedArchitectureError`: listing the supported architectures.
    """
    for spec in SPECS:
        if config.model_type in spec.model_types:
            return spec
    archs = getattr(config, "architectures", None) or [config.model_type]
    raise UnsupportedArchitectureError(
        f"architecture {', '.join(archs)} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )
