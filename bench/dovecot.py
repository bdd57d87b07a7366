"""A private Dovecot IMAP server, the IMAP gateway's reference (Debian `dovecot-imapd`):
the ceiling of `python -m bench imap` and the reference of tests/test_imap_dovecot.py.

Dovecot's `imap` binary runs one preauthenticated session over stdin/stdout
with a configuration of our own (a Maildir under `folder`, no daemon, no
passwords); mail access is refused to root, so it runs as `nobody`.
The mailbox lives in a folder of its own under /tmp (nobody may not enter
pytest's). `serve()` bridges TCP connections to such sessions, so the same client code
(imaplib, imapclient, raw bytes) talks to Dovecot and to the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

__all__ = ["Dovecot"]

IMAP_BINARY = Path("/usr/lib/dovecot/imap")


class Dovecot:
    """One user's Dovecot mailbox in a folder of its own (module docstring); `close()`
    removes it. The folder is made under /tmp: `nobody` cannot enter pytest's."""

    def __init__(self, user: str = "alice") -> None:
        if not IMAP_BINARY.exists() or shutil.which("setpriv") is None:
            raise RuntimeError("dovecot-imapd is missing (scripts/debian-packages installs it)")
        folder = Path(tempfile.mkdtemp(prefix="pyserver-dovecot-"))
        self.folder = folder
        self.user = user
        nobody = pwd.getpwnam("nobody")
        self._uid, self._gid = nobody.pw_uid, nobody.pw_gid
        self.mail = folder / "mail" / user
        self.mail.mkdir(parents=True, exist_ok=True)
        (folder / "run").mkdir(exist_ok=True)
        self.config = folder / "dovecot.conf"
        self.config.write_text(
            f"base_dir = {folder}/run\nlog_path = {folder}/dovecot.log\nssl = no\n"
            f"protocols = imap\nmail_location = maildir:{self.mail}\n"
            f"mail_uid = {self._uid}\nmail_gid = {self._gid}\n"
            "passdb {\n  driver = static\n  args = password=unused\n}\n"
            f"userdb {{\n  driver = static\n  args = uid={self._uid} gid={self._gid}\n}}\n"
        )
        for path in (folder, folder / "mail", self.mail, folder / "run"):
            os.chown(path, self._uid, self._gid)
        folder.chmod(0o755)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def argv(self) -> list[str]:
        """The command line of one preauthenticated IMAP session over stdio."""
        return [
            "setpriv", f"--reuid={self._uid}", f"--regid={self._gid}", "--clear-groups",
            "env", f"USER={self.user}", f"HOME={self.mail}", f"MAIL=maildir:{self.mail}",
            str(IMAP_BINARY), "-c", str(self.config),
        ]  # fmt: skip

    async def load(self, messages: Iterable[bytes], folder: str = "INBOX") -> None:
        """APPEND the messages, in order (UIDs 1, 2, ...), in one session."""
        script = b"".join(
            b"a%d APPEND %s {%d+}\r\n%s\r\n" % (n, folder.encode(), len(m), m)
            for n, m in enumerate(messages)
        )
        process = await asyncio.create_subprocess_exec(
            *self.argv(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await process.communicate(script + b"z LOGOUT\r\n")
        assert process.returncode == 0, err.decode()
        assert out.count(b" OK [APPENDUID") == script.count(b" APPEND "), out[-500:]

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[int]:
        """A loopback port whose every connection is a Dovecot session (the port)."""

        async def bridge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            process = await asyncio.create_subprocess_exec(
                *self.argv(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            assert process.stdin is not None and process.stdout is not None

            async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
                with contextlib.suppress(ConnectionError):
                    while data := await source.read(1 << 16):
                        sink.write(data)
                        await sink.drain()
                with contextlib.suppress(Exception):
                    sink.close()

            await asyncio.gather(pump(reader, process.stdin), pump(process.stdout, writer))
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

        server = await asyncio.start_server(bridge, "127.0.0.1", 0)
        try:
            yield server.sockets[0].getsockname()[1]
        finally:
            server.close()
            await server.wait_closed()
