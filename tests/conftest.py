"""Shared fixtures: which implementations a parametrised test runs against."""

from __future__ import annotations

import os

import pytest

PURE_FORCED = os.environ.get("PYSERVER_PURE", "") not in ("", "0")


def implementation_params() -> list:
    """`native` and `pure`; under PYSERVER_PURE=1 the native param is skipped, never otherwise."""
    native_marks = (
        [pytest.mark.skip(reason="PYSERVER_PURE=1 forces the pure twins")] if PURE_FORCED else []
    )
    return [pytest.param("native", marks=native_marks), "pure"]
