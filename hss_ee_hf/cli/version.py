"""The installed version of hss-ee-hf, read from the package metadata (no heavy import)."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "hss-ee-hf"


def package_version() -> str:
    """The installed distribution's version, or `"unknown"` when running from a tree that is not installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"
