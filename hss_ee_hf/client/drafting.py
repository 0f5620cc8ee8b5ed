"""Several tokens per pass: transformers' assisted generation and prompt lookup on the share servers (DESIGN.md §8).

`generate(prompt_lookup_num_tokens=k)` and `generate(assistant_model=draft)` draft up to `k` tokens on the client
(by matching n-grams of the prompt, or with a small plaintext draft model with the same tokenizer) and verify them
in one forward of `1 + drafted` rows: the same round trips for up to `k + 1` tokens, and under greedy decoding the
same tokens as plain `generate()`.

[`DraftingMixin.generate`] keeps that pass shape constant, which matters twice:

* every drafted pass is padded to `k + 1` rows (zero rows the servers multiply and the client drops: stages are
  row-wise, so the real rows' products are unchanged), so a server sees the same row count on every pass whatever
  the drafter found, and party A's products prepared ahead of time (keyed by stage and row count) keep matching;
* a draft model drafts exactly `k` tokens every pass (transformers' "heuristic" draft length and confidence cut-off
  are switched off for the call).

It also counts generated tokens in `hss_ee_stats`, so `hss_ee_stats.round_trips_per_token` is the figure to compare.
Drafting is transformers' own: batch size 1 only (transformers raises for larger batches).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any

import torch

from .stage_client import PRECOMPUTE_MAX_ROWS

logger = logging.getLogger(__name__)
DEFAULT_DRAFT_TOKENS = 4
"""Draft length used with `assistant_model=` when neither the call nor the draft's generation config sets one
(transformers' own default of 20 would pad every pass to 21 rows)."""


@contextmanager
def _constant_draft(assistant_model, k: int):
    """Makes a draft model draft exactly `k` tokens per pass for the duration of one `generate()` call."""
    config = assistant_model.generation_config
    saved = (config.num_assistant_tokens, config.num_assistant_tokens_schedule, config.assistant_confidence_threshold)
    config.num_assistant_tokens, config.num_assistant_tokens_schedule = k, "constant"
    config.assistant_confidence_threshold = 0.0  # no early stop: a short draft would change the pass shape
    try:
        yield
    finally:
        (
            config.num_assistant_tokens,
            config.num_assistant_tokens_schedule,
            config.assistant_confidence_threshold,
        ) = saved


class DraftingMixin:
    """Adds constant-shape drafting and token counting to a client model's `generate()`."""

    def generate(self, *args: Any, **kwargs: Any):
        """transformers' `generate()`, with drafted passes of a constant `k + 1` rows and generated tokens counted.

        Args:
            args, kwargs: as for transformers' `generate()`. With `prompt_lookup_num_tokens=k` or
                `assistant_model=draft` (draft length `num_assistant_tokens=k`, default
                `DEFAULT_DRAFT_TOKENS` unless the draft's generation config sets one), every pass after the prompt
                carries exactly `k + 1` rows.

        Returns:
            What transformers' `generate()` returns.

        Example:

        ```python
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False, prompt_lookup_num_tokens=4)
        >>> model.hss_ee_stats.round_trips_per_token
        ```
        """
        client = self.hss_ee_client
        k, draft = self._hss_ee_draft_length(kwargs)
        if k is not None and k + 1 > PRECOMPUTE_MAX_ROWS:
            logger.warning(
                "a draft of %d tokens makes passes of %d rows: party A's products are prepared ahead of time only "
                "for at most %d rows, so every pass waits for both servers; a shorter draft is usually faster",
                k,
                k + 1,
                PRECOMPUTE_MAX_ROWS,
            )
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        prompt_len = ids.shape[-1] if ids is not None else 0
        previous = client.pad_rows
        client.pad_rows = k + 1 if k is not None else 0
        try:
            if draft is not None:
                with _constant_draft(draft, k):
                    out = super().generate(*args, **kwargs)
            else:
                out = super().generate(*args, **kwargs)
        finally:
            client.pad_rows = previous
        sequences = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
        if sequences is not None and ids is not None:
            client.stats.tokens += (sequences.shape[-1] - prompt_len) * sequences.shape[0]
        return out

    def _hss_ee_draft_length(self, kwargs: dict) -> tuple[int | None, Any]:
        """`(k, draft model)` of a drafting call (`(None, None)` without drafting); sets the draft length kwarg."""
        config = kwargs.get("generation_config")
        lookup = kwargs.get("prompt_lookup_num_tokens", getattr(config, "prompt_lookup_num_tokens", None))
        if lookup is not None:
            return int(lookup), None
        draft = kwargs.get("assistant_model")
        if draft is None:
            return None, None
        k = kwargs.pop("num_assistant_tokens", None)
        if k is None:
            own = draft.generation_config.num_assistant_tokens
            k = own if own is not None and own != 20 else DEFAULT_DRAFT_TOKENS  # 20: transformers' default
        return int(k), draft
