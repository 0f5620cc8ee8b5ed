"""`pipeline("hss-ee-image-classification", ...)`: transformers' image-classification pipeline over two share servers.

[`HSSEEImageClassificationPipeline`] is transformers' `ImageClassificationPipeline` with an HSS-EE client model
(ResNet, ViT): image loading, the image processor, softmax/sigmoid and the top-k labels are transformers' own, so it
returns exactly what `pipeline("image-classification")` returns for the plaintext model. The image processor comes
from the EE checkpoint (the converter copies `preprocessor_config.json`).
"""

from __future__ import annotations

from transformers import AutoImageProcessor
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.image_classification import ImageClassificationPipeline

from ..client.modeling import HSSEEForImageClassification
from .base import HSSEEClientReference, HSSEEPipelineMixin

TASK = "hss-ee-image-classification"


class HSSEEImageClassificationPipeline(HSSEEPipelineMixin, ImageClassificationPipeline):
    """Image classification with an HSS-EE client model, exactly like `"image-classification"`.

    Built by `pipeline("hss-ee-image-classification", model=..., key=..., endpoints=...)` or directly.

    Args:
        model (`str`, `os.PathLike` or [`HSSEEForImageClassification`]): an EE checkpoint (local folder or Hub id)
            or an already connected client model (then pass no `key`, `endpoints` or `transport`).
        key (`EEKey` or path, *optional*): the secret key written by `hss-ee convert`.
        endpoints (`tuple[str, str]`, *optional*): `host:port` of share servers A and B.
        transport (`Transport`, *optional*): a ready transport instead of `endpoints`.
        timeout (`float`, *optional*): deadline per call in seconds (default: `client_config.timeout`).
        client_config (`HSSEEClientConfig`, *optional*): TLS / mutual TLS, bearer token, deadline and retries of the
            connections to the share servers.
        verify (`bool`, *optional*): Freivalds-check every returned share (`CheatingServerError` names a cheating
            server); `verify_rows` sets the secret check rows.
        precompute (`bool`, *optional*): prepare party A's products ahead of time (default `True`).
        max_rows (`int`, *optional*): the most rows sent in one request.
        image_processor (`BaseImageProcessor`, *optional*): defaults to the EE checkpoint's image processor.
        kwargs: the other arguments of transformers' `ImageClassificationPipeline` (`top_k`, `function_to_apply`).

    Raises:
        `KeyFileError`, `KeyMismatchError`: a missing or wrong key.
        `ValueError`: neither endpoints nor a transport were given.
        `TypeError`: `model` is a plaintext model (use `pipeline("image-classification")` for that).

    Example:

    ```python
    >>> import hss_ee_hf  # registers the task
    >>> from transformers import pipeline
    >>> classify = pipeline(
    ...     "hss-ee-image-classification", model="resnet-50-ee", key="resnet-50.hss-ee-key",
    ...     endpoints=("10.0.0.1:50051", "10.0.0.2:50051"),
    ... )
    >>> classify("cat.png", top_k=3)
    [{'label': ..., 'score': ...}, ...]
    ```
    """

    _client_class = HSSEEForImageClassification
    _task = TASK
    # Soft: a connected client passed in carries no processor; `__init__` then loads the checkpoint's own.
    _load_image_processor = None

    def _with_preprocessor(self, model, kwargs):
        if kwargs.get("image_processor") is None:
            kwargs["image_processor"] = AutoImageProcessor.from_pretrained(model.config.name_or_path)
        return kwargs


def register_image_pipeline() -> None:
    """Registers the `"hss-ee-image-classification"` task with transformers' `PIPELINE_REGISTRY`.

    Called when `hss_ee_hf` is imported.
    """
    if PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl") is HSSEEImageClassificationPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=HSSEEImageClassificationPipeline, pt_model=HSSEEClientReference, type="image"
    )
