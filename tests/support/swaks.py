"""swaks, a real SMTP client the mail tests drive: one run against a loopback port, or a
skip when it is not installed (a failure under PYSERVER_REQUIRE_ENGINES)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import REQUIRE_ENGINES

__all__ = ["swaks"]

SWAKS = shutil.which("swaks")


def swaks(port: int, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """`swaks --server 127.0.0.1:PORT --helo client.test ARGS`, run to its end."""
    if SWAKS is None:
        message = "swaks is not installed (apt-get install swaks)"
        if REQUIRE_ENGINES:
            pytest.fail(message)
        pytest.skip(message)
    return subprocess.run(
        [SWAKS, "--server", f"127.0.0.1:{port}", "--helo", "client.test", *args],
        capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip
