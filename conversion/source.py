"""Where a conversion reads from: a local HF folder, a Hub id in the local cache, or a GGUF file.

A [`ModelSource`] exposes the config, the tensor names grouped by shard, lazy access to one tensor at
a time, and the tokenizer files, so the converter never holds more than a tensor of a
safetensors-backed model in memory. GGUF files are small quantised models: they are dequantised
in memory by transformers and rebuilt as a plain model of the same architecture.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from huggingface_hub import ModelCard, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from hss_ee_hf.errors import ConversionError
from hss_ee_hf.hub.download import TOKENIZER_FILES

logger = logging.getLogger(__name__)


def _plain_config(config):
    """A copy of `config` without quantisation markers (a GGUF-loaded model is marked quantised)."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


VERIFY_MEMORY_BYTES = 256 * 1024**2


def load_bounded(
    folder: Path, offload_dir: Path, memory_bytes: int = VERIFY_MEMORY_BYTES, auto_class: str = "AutoModelForCausalLM"
):
    """`from_pretrained` in float32 holding at most about `memory_bytes` of weights in memory (rest offloaded)."""
    return (
        getattr(transformers, auto_class)
        .from_pretrained(
            folder,
            dtype=torch.float32,
            device_map="auto",
            max_memory={"cpu": memory_bytes},
            offload_folder=str(offload_dir),
        )
        .eval()
    )


class ModelSource:
    """Read access to the model being converted.

    Attributes:
        config (`PretrainedConfig`): the original config (no quantisation markers).
        base_model (`str` or `None`): the Hub id when converting from the Hub (for model cards).
    """

    config = None
    base_model: str | None = None

    def shards(self) -> list[list[str]]:
        """Tensor names grouped by the file that holds them (read one group at a time)."""
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        """Loads one tensor."""
        raise NotImplementedError

    def iter_tensors(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            yield name, self.get(name)

    def save_tokenizer(self, out: Path) -> list[str]:
        """Copies the tokenizer files into `out`; returns their names."""
        raise NotImplementedError

    def generation_config(self) -> GenerationConfig | None:
        raise NotImplementedError

    def license(self) -> str | None:
        """The `license` of the source's model card metadata, when it has one."""
        return None

    def load_model(self, auto_class: str = "AutoModelForCausalLM") -> torch.nn.Module:
        """The original model in float32 (for verification), loaded through the named transformers Auto class."""
        raise NotImplementedError


@contextlib.contextmanager
def _open_weights(file: Path) -> Iterator:
    """`safe_open(file)`, with a missing or damaged file reported as a `ConversionError` that names it."""
    try:
        handle = safe_open(str(file), "pt")
    except FileNotFoundError as err:
        raise ConversionError(f"the source weights file {file} is missing; download or save the model again") from err
    except (SafetensorError, OSError) as err:
        raise ConversionError(
            f"the source weights file {file} cannot be read ({err}); it is truncated or not safetensors. Download "
            "or save the model again"
        ) from err
    with handle as f:
        yield f


class FolderSource(ModelSource):
    """A local HF checkpoint folder with safetensors weights."""

    def __init__(self, folder: Path, base_model: str | None = None):
        self.folder = folder
        self.base_model = base_model
        if not (folder / "config.json").exists():
            raise ConversionError(f"{folder} has no config.json: it is not a Hugging Face checkpoint folder")
        try:
            self.config = _plain_config(AutoConfig.from_pretrained(folder))
        except (OSError, ValueError) as err:  # an empty or truncated config.json: say which file, not a JSON trace
            raise ConversionError(
                f"{folder / 'config.json'} cannot be read as a model config ({err}); is it empty or truncated? "
                "Copy or download the checkpoint again"
            ) from err
        index = folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError) as err:
                raise ConversionError(f"{index} is not a valid safetensors index ({err}); fix or restore it") from err
        elif (folder / "model.safetensors").exists():
            with _open_weights(folder / "model.safetensors") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        elif any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise ConversionError(
                f"{folder} holds pickle weights (*.bin); hss-ee reads safetensors only. Re-save the model with "
                "`model.save_pretrained(folder, safe_serialization=True)` first"
            )
        else:
            raise ConversionError(f"{folder} has no safetensors weights")
        self._files = {name: folder / file for name, file in weight_map.items()}

    def shards(self):
        groups: dict[Path, list[str]] = {}
        for name, file in self._files.items():
            groups.setdefault(file, []).append(name)
        return [sorted(names) for _, names in sorted(groups.items())]

    def get(self, name):
        # One open per tensor: safetensors memory-maps the file, and pages read through a mapping that stays
        # open count as resident memory; closing it after each tensor keeps the footprint at one tensor.
        with _open_weights(self._files[name]) as f:
            try:
                return f.get_tensor(name)
            except SafetensorError as err:
                raise ConversionError(
                    f"cannot read tensor {name} from {self._files[name]} ({err}); the source model is truncated or "
                    "damaged. Download or save it again"
                ) from err

    def save_tokenizer(self, out):
        copied = []
        for name in TOKENIZER_FILES:
            if (self.folder / name).exists():
                shutil.copy2(self.folder / name, out / name)
                copied.append(name)
        return copied

    def generation_config(self):
        try:
            return GenerationConfig.from_pretrained(self.folder)
        except OSError:
            return None

    def license(self):
        card = self.folder / "README.md"
        if not card.exists():
            return None
        try:
            value = ModelCard.load(card).data.license
        except (ValueError, OSError) as err:
            logger.info("could not read the license from %s: %s", card, err)
            return None
        return value if isinstance(value, str) else None

    def load_model(self, auto_class="AutoModelForCausalLM"):
        self._offload = tempfile.TemporaryDirectory(prefix=".hss-ee-offload-")
        return load_bounded(self.folder, Path(self._offload.name), auto_class=auto_class)


class GGUFSource(ModelSource):
    """A GGUF file, dequantised by transformers and rebuilt as a plain model of its architecture."""

    def __init__(self, folder: Path, gguf_file: str):
        self.folder, self.gguf_file = folder, gguf_file
        if not (folder / gguf_file).exists():
            raise ConversionError(f"GGUF file {folder / gguf_file} does not exist")
        if (folder / gguf_file).stat().st_size == 0:
            raise ConversionError(
                f"GGUF file {folder / gguf_file} is empty (0 bytes): an interrupted download or copy; fetch it again"
            )
        logger.info("dequantising %s", folder / gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        self.config = _plain_config(loaded.config)
        self._gen = loaded.generation_config
        self._state = {k: v.detach().clone() for k, v in loaded.state_dict().items()}
        del loaded

    def shards(self):
        return [sorted(self._state)]

    def get(self, name):
        return self._state[name]

    def save_tokenizer(self, out):
        tok = AutoTokenizer.from_pretrained(self.folder, gguf_file=self.gguf_file)
        return [os.path.basename(p) for p in tok.save_pretrained(out)]

    def generation_config(self):
        return self._gen

    def load_model(self, auto_class="AutoModelForCausalLM"):
        model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        model.load_state_dict(self._state, strict=False)
        model.tie_weights()
        return model.eval()


def open_source(
    src: str | os.PathLike,
    gguf_file: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> ModelSource:
    """Opens what `hss-ee convert SRC` names.

    Args:
        src (`str` or `os.PathLike`): a local folder, a `.gguf` file, or a Hub id already in the local cache.
        gguf_file (`str`, *optional*): the GGUF file name inside the folder `src`.
        revision (`str`, *optional*): Hub revision.
        cache_dir (`str`, *optional*): Hub cache folder.

    Raises:
        `ConversionError`: the source does not exist or is not a checkpoint.
    """
    if not os.fspath(src).strip():  # Path("") is ".", which would convert whatever the current folder holds
        raise ConversionError(
            "the source is an empty string; pass a checkpoint folder, a .gguf file or a Hub id in the local cache"
        )
    path = Path(src).expanduser()
    if gguf_file is not None:
        return GGUFSource(path, gguf_file)
    if path.is_file() and path.suffix == ".gguf":
        return GGUFSource(path.parent, path.name)
    if path.is_dir():
        return FolderSource(path)
    if path.exists():
        raise ConversionError(
            f"{src} is a file but not a .gguf file; pass a checkpoint folder, a GGUF file or a Hub id"
        )
    try:
        folder = snapshot_download(str(src), revision=revision, cache_dir=cache_dir, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError) as err:
        raise ConversionError(
            f"{src} is neither a local folder nor a Hub id in the local cache; download it first with "
            f"`hf download {src}` (conversion never downloads)"
        ) from err
    return FolderSource(Path(folder), base_model=str(src))
