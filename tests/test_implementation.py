"""The native parts are the ones loaded unless PYSERVER_PURE=1; the fallback warns, never fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pyserver import doctor, implementation

PARTS = ("ring", "log_codec", "lru", "frame_codec", "reply_table")


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "PYSERVER_PURE"} | env
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, check=True
    )


def test_loaded_implementations_match_the_environment() -> None:
    report = doctor.report()
    if implementation.PURE_FORCED:
        assert all(report[part] == "pure" for part in PARTS), report
        assert report["native_release_build"] is False
    else:
        # CI must never pass silently on the fallback.
        assert all(report[part] == "native" for part in PARTS), report
        assert report["native_release_build"] is True, "the Rust extension is a debug build"


def test_doctor_json_has_the_documented_keys() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pyserver.cli", "doctor", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out) == doctor.report()
    assert set(json.loads(out)) == {*PARTS, "native_release_build"}


def test_pure_is_forced_by_the_environment_variable() -> None:
    out = _python(
        "import json; from pyserver import doctor\nprint(json.dumps(doctor.report()))",
        PYSERVER_PURE="1",
    ).stdout
    report = json.loads(out)
    assert [report[p] for p in PARTS] == ["pure"] * len(PARTS)
    assert report["native_release_build"] is False


def test_missing_native_modules_fall_back_with_one_warning() -> None:
    # `None` in sys.modules makes an import raise ImportError, as if the module were not built.
    code = """
import sys, warnings, json
sys.modules["pyserver._native"] = None
sys.modules["pyserver_framecodec"] = None
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from pyserver import doctor
    from pyserver.ring import HashRing
    from pyserver.logcodec import encode
    from pyserver.snapcache import SnapshotCache
    from pyserver.wire.frame import FrameDecoder
ring = HashRing(tokens_per_node=4)
ring.add_node("a")
print(json.dumps({"report": doctor.report(), "owner": ring.owner(7),
                  "warnings": [str(w.message) for w in caught]}))
"""
    result = json.loads(_python(code).stdout)
    assert [result["report"][p] for p in PARTS] == ["pure"] * len(PARTS)
    assert result["owner"] == "a"
    assert len(result["warnings"]) == 1
    assert "pyserver._native" in result["warnings"][0]
    assert "pyserver_framecodec" in result["warnings"][0]
