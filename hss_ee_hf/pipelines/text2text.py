"""`pipeline("hss-ee-text2text-generation", ...)`: T5-style text-to-text generation over two share servers.

transformers 5 removed its `text2text-generation` pipeline (it now points users to chat models). T5 checkpoints are
still text-to-text models, so [`HSSEEText2TextGenerationPipeline`] keeps that pipeline's contract: a string gives
`[{"generated_text": ...}]`, a list of strings gives one such dict per string (a list of lists when
`num_return_sequences > 1`), `return_tensors=True` gives `generated_token_ids` instead, and the text is decoded with
`skip_special_tokens=True`. The model's `config.prefix` (T5's task prefix, if set) is prepended to every input, as
transformers 4 did. Preprocessing and `generate()` are transformers' own; only the weight products leave the machine.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoTokenizer
from transformers.pipelines import PIPELINE_REGISTRY, Pipeline

from ..client.modeling import HSSEEForConditionalGeneration
from .base import HSSEEClientReference, HSSEEPipelineMixin

TASK = "hss-ee-text2text-generation"


class HSSEEText2TextGenerationPipeline(HSSEEPipelineMixin, Pipeline):
    """Text-to-text generation (T5) with an HSS-EE client model.

    Built by `pipeline("hss-ee-text2text-generation", model=..., key=..., endpoints=...)` or directly.

    Args:
        model (`str`, `os.PathLike` or [`HSSEEForConditionalGeneration`]): an EE checkpoint (local folder or Hub id)
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
        tokenizer (`PreTrainedTokenizerBase`, *optional*): defaults to the EE checkpoint's tokenizer.
        kwargs: the other arguments of transformers' `Pipeline` (generation defaults such as `max_new_tokens`).

    Raises:
        `KeyFileError`, `KeyMismatchError`: a missing or wrong key.
        `ValueError`: neither endpoints nor a transport were given.
        `TypeError`: `model` is a plaintext model.

    Example:

    ```python
    >>> import hss_ee_hf  # registers the task
    >>> from transformers import pipeline
    >>> t2t = pipeline(
    ...     "hss-ee-text2text-generation", model="t5-small-ee", key="t5-small.hss-ee-key",
    ...     endpoints=("10.0.0.1:50051", "10.0.0.2:50051"),
    ... )
    >>> t2t("translate English to German: The house is wonderful.", max_new_tokens=16)
    [{'generated_text': '...'}]
    ```
    """

    _client_class = HSSEEForConditionalGeneration
    _task = TASK
    _load_tokenizer = None
    _load_image_processor = False
    _load_feature_extractor = False
    _load_processor = False
    _pipeline_calls_generate = True

    def _with_preprocessor(self, model, kwargs):
        if kwargs.get("tokenizer") is None:
            kwargs["tokenizer"] = AutoTokenizer.from_pretrained(model.config.name_or_path)
        return kwargs

    def _sanitize_parameters(
        self,
        return_tensors: bool | None = None,
        return_text: bool | None = None,
        clean_up_tokenization_spaces: bool | None = None,
        truncation: bool | None = None,
        **generate_kwargs: Any,
    ):
        preprocess = {} if truncation is None else {"truncation": truncation}
        postprocess = {"return_tensors": bool(return_tensors) and not return_text}
        if clean_up_tokenization_spaces is not None:
            postprocess["clean_up_tokenization_spaces"] = clean_up_tokenization_spaces
        return preprocess, dict(generate_kwargs), postprocess

    def __call__(self, inputs: str | list[str], **kwargs: Any):
        """Generates text for one input string or a list of them.

        Args:
            inputs (`str` or `list[str]`): the input text(s).
            return_tensors (`bool`, *optional*): return `generated_token_ids` instead of text.
            clean_up_tokenization_spaces (`bool`, *optional*): passed to `tokenizer.decode`.
            truncation (`bool`, *optional*): truncate inputs longer than the tokenizer's maximum.
            generate_kwargs: passed to `generate()` (e.g. `max_new_tokens`, `num_beams`, `do_sample`).

        Returns:
            `list[dict]` for a string (one dict per returned sequence); for a list of strings, one dict per string
            (or a list of dicts each when several sequences are returned).
        """
        result = super().__call__(inputs, **kwargs)
        if isinstance(inputs, list) and all(isinstance(r, list) and len(r) == 1 for r in result):
            return [r[0] for r in result]
        return result

    def preprocess(self, inputs: str, truncation: bool = False) -> dict[str, torch.Tensor]:
        if not isinstance(inputs, str):
            raise TypeError(f"{TASK} takes a string or a list of strings, got {type(inputs).__name__}")
        prefix = getattr(self.model.config, "prefix", None) or ""
        return self.tokenizer(prefix + inputs, return_tensors="pt", truncation=truncation)

    def _forward(self, model_inputs: dict[str, torch.Tensor], **generate_kwargs: Any) -> dict[str, torch.Tensor]:
        output_ids = self.model.generate(**model_inputs, **self._prepare_generate_kwargs(generate_kwargs))
        batch = model_inputs["input_ids"].shape[0]
        return {"output_ids": output_ids.reshape(batch, -1, output_ids.shape[-1])}

    def postprocess(
        self, model_outputs: dict[str, torch.Tensor], return_tensors: bool = False, **decode_kwargs: Any
    ) -> list[dict[str, Any]]:
        records = []
        for ids in model_outputs["output_ids"][0]:
            if return_tensors:
                records.append({"generated_token_ids": ids})
            else:
                text = self.tokenizer.decode(ids, skip_special_tokens=True, **decode_kwargs)
                records.append({"generated_text": text})
        return records


def register_text2text_pipeline() -> None:
    """Registers the `"hss-ee-text2text-generation"` task with transformers' `PIPELINE_REGISTRY`.

    Called when `hss_ee_hf` is imported.
    """
    if PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl") is HSSEEText2TextGenerationPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=HSSEEText2TextGenerationPipeline, pt_model=HSSEEClientReference, type="text"
    )
