"""Where `hss-ee convert` may write, and what `--force` may replace.

`--force` replaces only what the converter wrote itself: an output folder that is an EE checkpoint (its
`config.json` has an `hss_ee` block) and holds neither the source model nor the key. Anything else (a folder of
other files, the folder the source model lives in, a parent of the key) is refused with the reason, so a slip
such as `hss-ee convert work/src work --force` can never delete the source model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hss_ee_hf.artifacts.checkpoint import CONFIG_KEY
from hss_ee_hf.errors import ConversionError


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _is_ee_checkpoint(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get(CONFIG_KEY), dict)


def check_output_paths(out: Path, key_path: Path, src: str | os.PathLike, force: bool) -> None:
    """Refuses output paths that would overwrite something the converter did not write.

    Args:
        out (`Path`): the resolved output folder.
        key_path (`Path`): the resolved key file.
        src (`str` or `os.PathLike`): the source as given (a local path, or a Hub id that names no local path).
        force (`bool`): whether existing outputs may be replaced.

    Raises:
        `ConversionError`: the key would land inside OUT, OUT holds SRC or the key, an existing OUT is not an EE
            checkpoint, an existing key path is not a file, or an output exists without `force`.
    """
    if _inside(key_path, out):
        raise ConversionError(
            f"the key file {key_path} must not be inside the output folder {out}: the checkpoint is public, "
            "the key is secret. Pass --key with a path outside it"
        )
    src_path = Path(src).expanduser()
    if src_path.exists():
        src_path = src_path.resolve()
        if _inside(src_path, out) or _inside(out, src_path):
            raise ConversionError(
                f"the output folder {out} and the source {src_path} overlap; writing OUT would replace the source "
                "model. Choose an output folder outside the source (and the source outside it)"
            )
    if key_path.exists() and not key_path.is_file():
        raise ConversionError(f"the key path {key_path} exists and is not a file; pass --key with a file path")
    for path, what in ((out, "output folder"), (key_path, "key file")):
        if path.exists() and not force:
            raise ConversionError(f"{what} {path} already exists; pass --force (force=True) to overwrite it")
    if out.exists():
        if not out.is_dir():
            raise ConversionError(f"the output path {out} exists and is not a folder; choose another OUT")
        if not _is_ee_checkpoint(out):
            raise ConversionError(
                f"--force replaces only an EE checkpoint written by `hss-ee convert`, and {out} is not one (its "
                "config.json has no `hss_ee` block); nothing was deleted. Choose a new or empty output folder"
            )


def check_writable(folder: Path) -> None:
    """Refuses an output parent folder that cannot be created or written, naming it.

    Raises:
        `ConversionError`: the folder cannot be created or is not writable by this user.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConversionError(
            f"cannot create the folder {folder} for the output ({err.strerror}); choose an OUT whose parent you can "
            "write"
        ) from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConversionError(
            f"cannot write in {folder}, the parent of the output folder (permission denied); choose an OUT whose "
            "parent you can write, or fix its permissions"
        )
