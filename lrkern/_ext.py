"""Loads the optional C++ extension ``lrkern._C``.

A missing or broken build leaves the package importable on the reference path; ``load_error()`` says why, and
``LRKERN_REQUIRE_CPP=1`` (set by ``make test``) turns the absence into an import-time error.
"""
from __future__ import annotations

import os

_C = None
_error: str | None = None

try:
    from lrkern import _C  # type: ignore[attr-defined,no-redef]
except ImportError as exc:  # not built, or built against another torch
    _error = f"{type(exc).__name__}: {exc}"

if _C is None and os.environ.get("LRKERN_REQUIRE_CPP") == "1":
    raise ImportError(
        "LRKERN_REQUIRE_CPP=1 but the C++ extension lrkern._C did not load "
        f"({_error}). Build it with `pip install -e . --no-build-isolation` (or `make build`)."
    )


def cpp():
    """The extension module, or None when it is not built."""
    return _C


def load_error() -> str | None:
    return _error
