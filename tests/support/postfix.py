"""A real Postfix on loopback, an instance of its own, standing for "the outside world".

It listens on a free port, is the final destination of `outside.example` (each
listed user's mail into a Maildir), accepts mail for unknown users there and then
bounces it (as a provider's MX does when it checks late), and sends what is for
the cell's domain (the bounces) to the cell's MTA proxy. Its configuration,
queue and mail live in one folder under the system's temporary folder (Postfix's
own user must be able to reach it), removed on stop. Postfix needs root to
start; without it the test is skipped, or fails under PYSERVER_REQUIRE_ENGINES.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_ENGINES

__all__ = ["OUTSIDE", "Postfix"]

OUTSIDE = "outside.example"
_MASTER_LISTENER = "smtp      inet  n       -       y       -       -       smtpd"


def _unavailable(why: str) -> None:
    if REQUIRE_ENGINES:
        pytest.fail(why)
    pytest.skip(why)


class Postfix:
    """`Postfix(port, mailboxes, cell_domain, cell_smtp_port)`; `start()`, `stop()`."""

    def __init__(
        self, port: int, mailboxes: list[str], cell_domain: str, cell_smtp_port: int
    ) -> None:
        if shutil.which("postfix") is None and not os.path.exists("/usr/sbin/postfix"):
            _unavailable("Postfix is not installed (apt-get install postfix)")
        if os.geteuid() != 0:
            _unavailable("Postfix needs root to start an instance of its own")
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix="pyserver-postfix-"))
        self.root.chmod(0o755)
        self.etc = self.root / "etc"
        self.mail = self.root / "mail"
        for folder in (self.etc, self.mail, self.root / "queue", self.root / "data"):
            folder.mkdir()
        shutil.chown(self.root / "data", "postfix")
        shutil.chown(self.mail, "nobody")
        shutil.copy("/etc/postfix/dynamicmaps.cf", self.etc)
        master = Path("/etc/postfix/master.cf").read_text()
        assert _MASTER_LISTENER in master, "Debian's master.cf changed: update the harness"
        master = master.replace(_MASTER_LISTENER, f"127.0.0.1:{port} inet n - n - - smtpd")
        # no chroot anywhere: the instance's files are not copied into a jail
        lines = []
        for line in master.splitlines():
            fields = line.split()
            if len(fields) >= 8 and not line.startswith((" ", "\t", "#")) and fields[4] == "y":
                fields[4] = "n"
                line = " ".join(fields)
            lines.append(line)
        (self.etc / "master.cf").write_text("\n".join(lines) + "\n")
        (self.etc / "vmailbox").write_text(
            "".join(f"{name}@{OUTSIDE} {name}/\n" for name in mailboxes)
        )
        (self.etc / "transport").write_text(f"{cell_domain} smtp:[127.0.0.1]:{cell_smtp_port}\n")
        (self.etc / "main.cf").write_text(f"""compatibility_level = 3.6
queue_directory = {self.root}/queue
data_directory = {self.root}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mx.{OUTSIDE}
mydomain = {OUTSIDE}
mydestination =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
virtual_mailbox_domains = {OUTSIDE}
virtual_mailbox_base = {self.mail}
virtual_mailbox_maps = texthash:{self.etc}/vmailbox
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
smtpd_reject_unlisted_recipient = no
transport_maps = texthash:{self.etc}/transport
smtp_dns_support_level = disabled
maillog_file = {self.root}/maillog
maillog_file_prefixes = {self.root}
alias_maps =
alias_database =
biff = no
""")

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postfix", "-c", str(self.etc), *args], capture_output=True, text=True, timeout=60
        )

    def start(self) -> None:
        self._postfix("post-install", "create-missing")
        done = self._postfix("start")
        if done.returncode != 0:
            raise AssertionError(f"Postfix did not start: {done.stderr}\n{self.log()}")

    def stop(self) -> None:
        self._postfix("stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        try:
            return (self.root / "maillog").read_text(errors="replace")
        except OSError:
            return ""

    def mailbox(self, name: str) -> list[EmailMessage]:
        """The mails delivered to name@outside.example, oldest first."""
        folder = self.mail / name / "new"
        files = sorted(folder.glob("*"), key=lambda path: path.stat().st_mtime_ns)
        return [message_from_bytes(p.read_bytes(), policy=policy.default) for p in files]  # type: ignore[misc]

    def wait_for(self, name: str, count: int, timeout_s: float = 30.0) -> list[EmailMessage]:
        deadline = time.monotonic() + timeout_s
        while len(found := self.mailbox(name)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{count} mail(s) for {name} not delivered\n{self.log()}")
            time.sleep(0.1)
        return found
