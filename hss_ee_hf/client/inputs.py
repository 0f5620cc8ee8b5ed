"""What the client checks before a generation starts: empty prompts, zero-size batches and over-long prompts.

transformers itself fails on these late and obscurely (an empty prompt ends in a `reshape` error inside attention,
a prompt past GPT-2's learned positions in an embedding `IndexError`), and on this client every such failure costs
round trips first. So `generate()` checks the prompt's shape once, before any share is sent:

* an empty prompt or a zero-size batch raises [`InvalidInputError`] saying what to pass;
* a generation past the positions of a model with learned position embeddings (GPT-2) raises, as it cannot run;
* a generation past the trained context of a rotary model (Llama, Mistral, Qwen2) runs, as in plaintext, after a
  warning that says what will happen: degraded output past the trained context, and how many round trips and
  rows the prefill sends (`max_rows` splitting reports its progress, see `StageClient`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ..errors import InvalidInputError

logger = logging.getLogger(__name__)


def prompt_shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int] | None:
    """`(batch, tokens)` of the prompt given to `generate()`, or `None` when it starts from `bos_token_id`."""
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if ids is None and kwargs.get("inputs_embeds") is not None:
        ids = kwargs["inputs_embeds"][..., 0]
    if not isinstance(ids, torch.Tensor):
        return None  # not a tensor: transformers reports it
    if ids.dim() == 1:
        return 1, ids.shape[0]
    return ids.shape[0], ids.shape[-1]


def context_limit(config: Any) -> tuple[int | None, bool]:
    """The positions a decoder was built for, and whether they are learned (a hard limit) or rotary (a soft one).

    Encoder-decoder models (T5: relative position buckets) have no limit.
    """
    if getattr(config, "is_encoder_decoder", False):
        return None, False
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    rotary = any(getattr(config, name, None) is not None for name in ("rope_parameters", "rope_theta", "rope_scaling"))
    return limit, not rotary


def check_generate_inputs(
    model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], stages: int, max_rows: int
) -> None:
    """Refuses prompts `generate()` cannot run and warns about those it runs past the model's context.

    Args:
        model: the client model (its `config` and `generation_config` are read).
        args, kwargs: what `generate()` was called with.
        stages (`int`): stages of one forward pass (for the round-trip estimate).
        max_rows (`int`): the most rows one request carries.

    Raises:
        `InvalidInputError`: an empty prompt, a zero-size batch, or a generation past learned position embeddings.
    """
    shape = prompt_shape(args, kwargs)
    if shape is None:
        return
    batch, tokens = shape
    if batch == 0:
        raise InvalidInputError(
            "generate() got a zero-size batch (no sequences); pass at least one prompt, e.g. "
            "tokenizer(['...'], return_tensors='pt')"
        )
    if tokens == 0:
        start = "bos_token_id" if model.generation_config.bos_token_id is not None else "the BOS token"
        raise InvalidInputError(
            "generate() got an empty prompt (0 tokens per sequence); pass at least one token, or call "
            f"generate(input_ids=None) to start from {start} (what pipeline('hss-ee-text-generation')('') does)"
        )
    limit, learned = context_limit(model.config)
    if limit is None:
        return
    gen = model.generation_config
    new = kwargs.get("max_new_tokens", gen.max_new_tokens)
    total = tokens + new if new is not None else max(tokens, kwargs.get("max_length", gen.max_length) or tokens)
    if total <= limit:
        return
    what = f"a prompt of {tokens} tokens" + (f" plus max_new_tokens={new}" if new is not None else "")
    if learned:
        raise InvalidInputError(
            f"{what} needs {total} positions, past the {limit} learned position embeddings of this "
            f"{model.config.model_type} model (it has no embedding for a later position, so it cannot run); "
            f"shorten the prompt (tokenizer(..., truncation=True, max_length={limit - (new or 0)})) or lower "
            "max_new_tokens"
        )
    requests = math.ceil(tokens / max_rows)
    logger.warning(
        "%s needs %d positions, past the %d this %s model was trained for (max_position_embeddings): it runs, as in "
        "plaintext transformers, but tokens past position %d are likely to be degraded. The prefill alone sends "
        "%d rows to every one of the %d stages (%d requests per stage, %d round trips in all) before the first "
        "token; truncate the prompt (tokenizer(..., truncation=True, max_length=%d)) to stay within the context",
        what,
        total,
        limit,
        model.config.model_type,
        limit,
        tokens,
        stages,
        requests,
        stages * requests,
        max(limit - (new or 0), 1),
    )
