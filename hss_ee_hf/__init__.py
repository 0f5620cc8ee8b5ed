"""hss-ee-hf: private inference for Hugging Face transformers on two untrusted share servers.

Public API (everything else is private by name):

* [`HSSEEForCausalLM`]: the client model of decoder LLMs; `generate()` is transformers' own.
* [`HSSEEForConditionalGeneration`] (T5) and [`HSSEEForImageClassification`] (ResNet, ViT): the other clients.
* [`HSSEETextGenerationPipeline`]: `pipeline("hss-ee-text-generation", model=..., key=..., endpoints=...)`;
  [`HSSEEText2TextGenerationPipeline`] (`"hss-ee-text2text-generation"`) and [`HSSEEImageClassificationPipeline`]
  (`"hss-ee-image-classification"`) likewise.
* [`HSSEEConfig`]: a client configuration (`model_type="hss_ee"`) that `AutoConfig` and `AutoModelForCausalLM` know.
* [`convert`]: turn a checkpoint into an EE checkpoint and a secret key; [`push_to_hub`]: publish it.
* [`HSSEEClientConfig`]: TLS, token, deadlines and retries of the client's gRPC connections.
* [`EEKey`], [`RingConfig`], [`HSSEECheckpointInfo`]: the artifacts' data types.
* the typed errors in `hss_ee_hf.errors`.

Importing the package registers `HSSEEConfig` with `AutoConfig`, its client factory with `AutoModelForCausalLM`,
and the three `"hss-ee-*"` tasks with transformers' `PIPELINE_REGISTRY` (see
`hss_ee_hf.client.auto` and `hss_ee_hf.pipelines`).
"""

from __future__ import annotations

from .artifacts.checkpoint import HSSEECheckpointInfo
from .artifacts.key import EEKey
from .client.auto import register_auto_classes
from .client.config import HSSEEConfig
from .client.modeling import HSSEEForCausalLM, HSSEEForConditionalGeneration, HSSEEForImageClassification
from .client.verifier import CheatingServerError
from .errors import (
    CheckpointError,
    ConversionError,
    HSSEEError,
    KeyFileError,
    KeyMismatchError,
    PushRefusedError,
    RingOverflowError,
    ScheduleUnavailableError,
    StageError,
    TransportError,
    UnsupportedArchitectureError,
)
from .hub.upload import push_to_hub
from .pipelines.image_classification import HSSEEImageClassificationPipeline, register_image_pipeline
from .pipelines.text2text import HSSEEText2TextGenerationPipeline, register_text2text_pipeline
from .pipelines.text_generation import HSSEETextGenerationPipeline, register_pipeline
from .ring.fixed_point import RingConfig
from .transport.config import HSSEEClientConfig

__version__ = "0.1.0"

register_auto_classes()
register_pipeline()
register_text2text_pipeline()
register_image_pipeline()


def convert(*args, **kwargs):
    """Converts a model into an EE checkpoint; see `hss_ee_conversion.convert` for the arguments."""
    from hss_ee_conversion import convert as _convert

    return _convert(*args, **kwargs)


__all__ = [
    "CheatingServerError",
    "CheckpointError",
    "ConversionError",
    "EEKey",
    "HSSEECheckpointInfo",
    "HSSEEClientConfig",
    "HSSEEConfig",
    "HSSEEError",
    "HSSEEForCausalLM",
    "HSSEEForConditionalGeneration",
    "HSSEEForImageClassification",
    "HSSEEImageClassificationPipeline",
    "HSSEEText2TextGenerationPipeline",
    "HSSEETextGenerationPipeline",
    "KeyFileError",
    "KeyMismatchError",
    "PushRefusedError",
    "RingConfig",
    "RingOverflowError",
    "ScheduleUnavailableError",
    "StageError",
    "TransportError",
    "UnsupportedArchitectureError",
    "__version__",
    "convert",
    "push_to_hub",
]
