"""A plain install (no dev extras) can import every part of the package.

The dev extras (msgpack, uhashring, lru-dict, lmdb, rocksdict: the benchmarks' peers;
playwright: the browser's driver) are blocked in a child interpreter, and every module
of `pyserver` is imported there.
"""

from __future__ import annotations

import subprocess
import sys

DEV_ONLY = ("lru", "msgpack", "uhashring", "hypothesis", "pytest", "lmdb", "rocksdict")
DEV_ONLY += ("playwright", "smpp34", "smpplib")

_CHILD = f"""
import importlib, pkgutil, sys
for name in {DEV_ONLY!r}:
    sys.modules[name] = None  # an import of it now raises ImportError
import pyserver
failed = []
for module in pkgutil.walk_packages(pyserver.__path__, "pyserver."):
    try:
        importlib.import_module(module.name)
    except ImportError as exc:
        failed.append(f"{{module.name}}: {{exc}}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_without_the_dev_extras() -> None:
    child = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, (
        f"modules that need a dev-only package:\n{child.stdout}{child.stderr}"
    )
