"""The package's version, as installed (pyproject.toml), or this copy's when run from a checkout not installed."""

from __future__ import annotations

import importlib.metadata

__version__ = "0.1.0"  # kept equal to pyproject.toml's version


def package_version() -> str:
    try:
        return importlib.metadata.version("dreamstream")
    except importlib.metadata.PackageNotFoundError:
        return __version__
