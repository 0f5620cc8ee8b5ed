"""Model cards of EE checkpoints, rendered from `model_cards/ee_model_card.md` (peft-style: generated, never
hand-written).

The converter writes one into every checkpoint it makes ([`render_model_card`]); `hss-ee push` renders it again for
the repo it uploads to ([`render_card`], from what the push planner has already read and checked).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from ..artifacts.checkpoint import CONFIG_KEY, INDEX_FILE, HSSEECheckpointInfo
from ..errors import CheckpointError, PushRefusedError
from .download import CLIENT_PATTERNS

logger = logging.getLogger(__name__)

LIBRARY_NAME = "hss-ee-hf"
README = "README.md"
TEMPLATE_NAME = "ee_model_card.md"
CARD_TAGS = ("hss-ee", "private-inference", "secret-sharing", "equivariant-encryption")
CARD_TASKS = {"t5": "text2text-generation", "resnet": "image-classification", "vit": "image-classification"}
"""The Hub `pipeline_tag` (and the card's usage section) per model_type; decoder LLMs are `text-generation`."""


def _template_path(template: str | os.PathLike | None) -> Path:
    if template is not None:
        path = Path(template).expanduser()
        if not path.is_file():
            raise PushRefusedError(f"model card template {path} does not exist")
        return path
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "model_cards" / TEMPLATE_NAME, here.parent.parent / "model_cards" / TEMPLATE_NAME):
        if candidate.is_file():
            return candidate
    raise PushRefusedError(
        f"the model card template {TEMPLATE_NAME} is not installed with hss-ee-hf; pass template= (--template) "
        "with a path to model_cards/ee_model_card.md from the hss-ee-hf sources"
    )


def _base_card_license(base_model: str) -> dict[str, str]:
    """`license`, `license_name`, `license_link` from the base model's card if it is in the local Hub cache."""
    path = try_to_load_from_cache(base_model, README)
    if not isinstance(path, str):
        return {}
    try:
        data = ModelCard.load(path, ignore_metadata_errors=True).data
    except (OSError, ValueError) as err:
        logger.info("could not read the license from the cached card of %s: %s", base_model, err)
        return {}
    fields = ("license", "license_name", "license_link")
    return {k: getattr(data, k) for k in fields if isinstance(getattr(data, k, None), str)}


def library_version() -> str:
    try:
        return importlib.metadata.version(LIBRARY_NAME)
    except importlib.metadata.PackageNotFoundError:
        return "(development)"


def render_model_card(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    base_model: str | None = None,
    license: str | None = None,
    revision: str | None = None,
    template: str | os.PathLike | None = None,
) -> str:
    """Renders the `README.md` model card of an EE checkpoint from the template.

    The YAML metadata carries `library_name: hss-ee-hf`, the `hss-ee` tags, `pipeline_tag`, and `base_model` and
    `license` when known. `base_model` comes from the argument, else from the `hss_ee` block's optional
    `base_model` field. `license` comes from the argument, else from the block's optional `license` field, else
    from the base model's card when it is in the local Hub cache (no network call).

    Args:
        folder (`str` or `os.PathLike`): the EE checkpoint folder.
        repo_id (`str`): the repo the card is for (used in the usage examples).
        base_model (`str`, *optional*): Hub id of the original model.
        license (`str`, *optional*): license identifier (e.g. `"apache-2.0"`).
        revision (`str`, *optional*): the branch the checkpoint is pushed to (used in the usage examples).
        template (`str` or `os.PathLike`, *optional*): a Jinja template instead of `model_cards/ee_model_card.md`.

    Returns:
        `str`: the card, front matter included.

    Raises:
        `PushRefusedError`: a bad `base_model`, or a template that drops the metadata.
        `CheckpointError`: the folder is not a complete EE checkpoint.

    Example:

    ```python
    >>> card = render_model_card("smollm2-ee", "me/smollm2-ee", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    >>> ModelCard(card).data.library_name
    'hss-ee-hf'
    ```
    """
    folder = Path(folder).expanduser().resolve()
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        weight_map = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder} is not a complete EE checkpoint ({err}); convert the model again") from err
    info = HSSEECheckpointInfo.from_dict(config.get(CONFIG_KEY), source=str(folder / "config.json"))
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return render_card(folder, repo_id, config, info, weight_map, files, base_model, license, revision, template)


def render_card(
    folder: Path,
    repo_id: str,
    config: dict[str, Any],
    info: HSSEECheckpointInfo,
    weight_map: dict[str, str],
    files: Iterable[str],
    base_model: str | None = None,
    license: str | None = None,
    revision: str | None = None,
    template: str | os.PathLike | None = None,
) -> str:
    """Renders the card from what the caller already read of the checkpoint (`config.json`, its `hss_ee` block, the
    index's weight map and the folder's file names); see [`render_model_card`] for the rest."""
    block = config.get(CONFIG_KEY) or {}
    base_model = base_model or block.get("base_model")
    if base_model is not None:
        try:
            validate_repo_id(base_model)
        except HFValidationError as err:
            raise PushRefusedError(f"base_model {base_model!r} is not a Hub repo id: {err}") from err
    licensing: dict[str, str] = {}
    if license is not None:
        licensing["license"] = license
    elif isinstance(block.get("license"), str):
        licensing["license"] = block["license"]
    elif base_model is not None:
        licensing = _base_card_license(base_model)
    model_type = config.get("model_type", "unknown")
    task = CARD_TASKS.get(model_type, "text-generation")
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        tags=[*CARD_TAGS, model_type],
        base_model=base_model,
        pipeline_tag=task,
        **licensing,
    )
    server_files = ["config.json", INDEX_FILE, *sorted(set(weight_map.values()) - {info.client_shard})]
    client_files = sorted(filter_repo_objects(files, allow_patterns=CLIENT_PATTERNS))

    def pick(*names: str) -> Any:
        return next((config[n] for n in names if n in config), "?")

    card = ModelCard.from_template(
        card_data,
        template_path=str(_template_path(template)),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        revision=revision if revision and not revision.startswith("refs/") else None,
        base_model=base_model,
        architecture=(config.get("architectures") or ["?"])[0],
        model_type=model_type,
        task=task,
        num_layers=pick("num_hidden_layers", "n_layer", "num_layers", "depths"),
        hidden_size=pick("hidden_size", "n_embd", "d_model", "hidden_sizes"),
        vocab_size=len(config.get("id2label") or {}) or "?" if task == "image-classification" else pick("vocab_size"),
        fingerprint=info.fingerprint,
        format_version=info.format_version,
        frac_bits=info.ring.frac_bits,
        weight_bits=info.ring.weight_bits,
        client_files=client_files,
        server_files=server_files,
        hss_ee_version=library_version(),
    )
    text = str(card)
    try:
        parsed = ModelCard(text).data
    except ValueError as err:
        raise PushRefusedError(f"the rendered model card has invalid YAML metadata: {err}") from err
    if parsed.library_name != LIBRARY_NAME:
        raise PushRefusedError("the model card template must start with `---\\n{{ card_data }}\\n---`")
    return text
