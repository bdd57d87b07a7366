"""What the web tier's tests drive: a whole cell (`pyserver run`, web tier included) as its
own process on fixed loopback ports, so it can be restarted where the browser expects it,
and the system Chromium under Playwright (a skip when either is missing; a failure under
PYSERVER_REQUIRE_ENGINES)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

import pytest

from pyserver.app.auth import make_user_token
from tests.conftest import REQUIRE_ENGINES
from tests.support import cli, free_port, start_serving

__all__ = ["CHROMIUM_ARGS", "WebCell", "chromium"]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _missing(message: str) -> None:
    if REQUIRE_ENGINES:
        pytest.fail(message)
    pytest.skip(message)


def chromium(playwright: Any) -> Any:
    """The system Chromium, headless, under Playwright (it cannot download its own here)."""
    if not Path(CHROMIUM).exists():
        _missing("chromium is not installed (apt-get install chromium)")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


class WebCell:
    """`pyserver run` on `folder`, with its binary, SMTP and web ports fixed for its life."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ports = {name: free_port() for name in ("port", "smtp", "web")}
        self.proc: subprocess.Popen[Any] | None = None
        self.ready: dict[str, Any] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['web']}"

    @property
    def key(self) -> str:
        return (self.folder / "service.key").read_text().strip()

    def start(self) -> WebCell:
        self.proc, self.ready = start_serving(
            [
                "run",
                "--data", str(self.folder),
                "--port", str(self.ports["port"]),
                "--http-port", "0",
                "--smtp-port", str(self.ports["smtp"]),
                "--web-port", str(self.ports["web"]),
                "--imap-port", "-1",
            ],
            self.folder.parent / f"{self.folder.name}.ready.json",
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.communicate(timeout=30)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def token(self, user: int, valid_s: int = 3600) -> str:
        return make_user_token(user, int(time.time()) + valid_s, self.key)

    def sign_in_link(self, user: int) -> str:
        return f"{self.url}/login?token={self.token(user)}"

    def http(self, user: int | None = None) -> urllib.request.OpenerDirector:
        """An HTTP client that does not follow redirects, signed in as `user` (if given)."""
        jar = CookieJar()
        opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(jar), _NoRedirects()
        )
        if user is not None:
            try:
                opener.open(self.sign_in_link(user))
            except urllib.error.HTTPError as answer:  # the 303 to the inbox
                assert answer.code == 303, answer.read()
        return opener

    def cli(self, *args: str) -> str:
        """`pyserver ARGS --data FOLDER` against this cell; its output."""
        return cli(*args, "--data", str(self.folder))


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None
