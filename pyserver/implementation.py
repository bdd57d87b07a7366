"""The one place that chooses the native or the pure-Python twin of each core part.

`PYSERVER_PURE=1` forces the pure twins. Without it, a missing native module
falls back to them with one warning, never an ImportError. The facades
(`pyserver.ring`, `logcodec`, `snapcache`, `wire.frame`, `wire.replies`) read
their choice here; `pyserver.doctor.report()` tells which one each part uses.

May import: nothing of pyserver (the extension modules only).
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

PURE_FORCED: bool = os.environ.get("PYSERVER_PURE", "") not in ("", "0")


def _load(module_name: str) -> tuple[ModuleType | None, str | None]:
    """Import an extension module: (module, None), or (None, why) if it is missing or forced off."""
    if PURE_FORCED:
        return None, None
    try:
        return importlib.import_module(module_name), None
    except ImportError as exc:
        return None, f"{module_name} ({exc})"


# The Rust extension: hash ring, log-record codec, LRU snapshot cache.
native, _native_missing = _load("pyserver._native")
# The Cython extension: the wire-frame codec.
framecodec, _framecodec_missing = _load("pyserver_framecodec")

_missing = [why for why in (_native_missing, _framecodec_missing) if why]
if _missing:
    warnings.warn(
        f"pyserver: native module not built: {'; '.join(_missing)}. Using the pure-Python "
        "twins, which are much slower. Run scripts/setup to build it, or set PYSERVER_PURE=1 "
        "to choose the twins deliberately.",
        RuntimeWarning,
        stacklevel=2,
    )
