"""The one place that chooses the native or the pure-Python twin of each core part.

`PYSERVER_PURE=1` forces the pure twins. Without it, a missing native module
falls back to them with one warning, never an ImportError. `report()` tells
which implementation each part uses (`pyserver doctor` prints it).
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

PURE_FORCED: bool = os.environ.get("PYSERVER_PURE", "") not in ("", "0")

_warned = False


def _load(module_name: str, what: str) -> ModuleType | None:
    """Import an extension module, or return None (with one warning) if it is missing."""
    global _warned
    if PURE_FORCED:
        return None
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        if not _warned:
            _warned = True
            warnings.warn(
                f"pyserver: the {what} ({module_name}) is not built ({exc}); "
                "using the pure-Python twins, which are much slower. "
                "Run scripts/setup to build it, or set PYSERVER_PURE=1 to silence this.",
                RuntimeWarning,
                stacklevel=3,
            )
        return None


# The Rust extension: hash ring, log-record codec, LRU snapshot cache.
native: ModuleType | None = _load("pyserver._native", "Rust extension")
# The Cython extension: the wire-frame codec.
framecodec: ModuleType | None = _load("pyserver_framecodec", "Cython frame codec")


def report() -> dict[str, str | bool]:
    """Which implementation each part uses, and whether the native build is optimised."""
    rust = "native" if native is not None else "pure"
    return {
        "ring": rust,
        "log_codec": rust,
        "lru": rust,
        "frame_codec": "native" if framecodec is not None else "pure",
        "native_release_build": bool(native is not None and native.RELEASE_BUILD),
    }
