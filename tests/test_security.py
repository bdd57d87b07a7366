"""Security between the tiers, tried through real sockets on a real `pyserver run`:
TLS on every listener (plain text, a wrong CA, no or a foreign client certificate
all refused, the server serving others meanwhile), service keys rotated while the
cell runs with no failed request, and user tokens revoked before they expire (on
the binary protocol and in the web tier). Certificates are made here with trustme.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import smtplib
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from pyserver.client import Client
from pyserver.cluster import layout
from pyserver.cluster.freeze import freeze_user, user_path
from pyserver.cluster.membership import Membership
from pyserver.cluster.ringwatch import RingWatch
from pyserver.cluster.zk import ZooKeeper, ZooKeeperForbidden, digest_id
from pyserver.errors import PyserverError, Unauthenticated, Unavailable
from pyserver.servicekey import ServiceKeys, key_id, read_service_key
from pyserver.tls import TierTls
from tests.support import cli, run, serve_cell

MAIL = b"From: a@example.org\r\nTo: u2@pyserver.localhost\r\nSubject: hi\r\n\r\nhello\r\n"


def _write_pki(folder: Path, ca: trustme.CA, name: str) -> TierTls:
    issued = ca.issue_cert("127.0.0.1", "localhost")
    files = TierTls(
        str(folder / f"{name}-cert.pem"), str(folder / f"{name}-key.pem"),
        str(folder / f"{name}-ca.pem"), mutual=True,
    )  # fmt: skip
    issued.cert_chain_pems[0].write_to_path(files.cert_file)
    issued.private_key_pem.write_to_path(files.key_file)
    ca.cert_pem.write_to_path(files.ca_file)
    return files


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TierTls]:
    """The cell's CA and a certificate from it; another CA with a certificate of its own."""
    folder = tmp_path_factory.mktemp("pki")
    return {
        "cell": _write_pki(folder, trustme.CA(), "cell"),
        "other": _write_pki(folder, trustme.CA(), "other"),
    }


def _serve(data: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[Any], dict]:
    """A cell with its web tier too (its sessions are checked here)."""
    return serve_cell(data, env, "--web-port", "0")


def _stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def tls_cell(
    tmp_path_factory: pytest.TempPathFactory, pki: dict[str, TierTls]
) -> Iterator[dict[str, Any]]:
    """A cell with TLS on every listener and mutual TLS on the binary protocol."""
    data = tmp_path_factory.mktemp("tls-cell")
    cell = pki["cell"]
    env = {
        "PYSERVER_TLS": "1",
        "PYSERVER_TLS_CERT_FILE": cell.cert_file,
        "PYSERVER_TLS_KEY_FILE": cell.key_file,
        "PYSERVER_TLS_CA_FILE": cell.ca_file,
        "PYSERVER_TLS_MUTUAL": "1",
        "PYSERVER_SMTPS_PORT": "0",
    }
    proc, ready = _serve(data, env)
    try:
        yield {"ready": ready, "key": read_service_key(data), "data": data}
    finally:
        _stop(proc)


def _address(ready: dict[str, Any], name: str) -> tuple[str, int]:
    return ready[name]["host"], ready[name]["port"]


def test_a_tls_cell_serves_verified_clients_and_refuses_the_rest(
    tls_cell: dict[str, Any], pki: dict[str, TierTls]
) -> None:
    host, port = _address(tls_cell["ready"], "server")
    key = tls_cell["key"]
    good = pki["cell"].client_context()
    # a client of the other CA: it does not trust the cell, and the cell does not trust it
    wrong_ca = pki["other"].client_context()
    # trusts the cell, presents the other CA's certificate
    foreign = ssl.create_default_context(cafile=pki["cell"].ca_file)
    foreign.load_cert_chain(pki["other"].cert_file, pki["other"].key_file)
    # trusts the cell, presents no certificate
    anonymous = ssl.create_default_context(cafile=pki["cell"].ca_file)

    async def scenario() -> None:
        async with await Client.connect(host, port, service_key=key, tls=good) as client:
            sent = await client.send(1, [2], "over TLS")
            refusals: dict[str, BaseException] = {}
            for name, context in (("plain", None), ("wrong CA", wrong_ca),
                                  ("foreign cert", foreign), ("no cert", anonymous)):  # fmt: skip
                try:
                    other = await Client.connect(
                        host, port, service_key=key, tls=context, reconnect=False,
                        connect_timeout=3.0,
                    )  # fmt: skip
                except PyserverError as error:
                    refusals[name] = error
                else:
                    await other.close()
            assert set(refusals) == {"plain", "wrong CA", "foreign cert", "no cert"}, refusals
            assert all(isinstance(e, Unavailable) for e in refusals.values()), refusals
            assert "CERTIFICATE_VERIFY_FAILED" in str(refusals["wrong CA"])
            # and the verified client was served all along
            thread = await client.get_thread(2, sent["thread_id"])
            assert [m["text"] for m in thread["messages"]] == ["over TLS"]

    run(scenario)


def test_http_smtp_and_the_web_tier_speak_tls(
    tls_cell: dict[str, Any], pki: dict[str, TierTls]
) -> None:
    ready = tls_cell["ready"]
    context = ssl.create_default_context(cafile=pki["cell"].ca_file)
    http_host, http_port = _address(ready, "http")
    with urllib.request.urlopen(
        f"https://{http_host}:{http_port}/health", context=context, timeout=10
    ) as response:
        assert response.status == 200
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://{http_host}:{http_port}/health", timeout=10)
    # SMTP: STARTTLS on the plain port (offered, then used), implicit TLS on its own
    smtp_host, smtp_port = _address(ready, "smtp")
    with smtplib.SMTP(smtp_host, smtp_port, timeout=10) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls")
        smtp.starttls(context=context)
        smtp.ehlo()
        assert smtp.sendmail("a@example.org", ["u2@pyserver.localhost"], MAIL) == {}
    smtps_host, smtps_port = _address(ready, "smtps")
    with smtplib.SMTP_SSL(smtps_host, smtps_port, context=context, timeout=10) as smtps:
        assert smtps.sendmail("a@example.org", ["u2@pyserver.localhost"], MAIL) == {}
    # the web tier over HTTPS, its session cookie marked Secure
    web_host, web_port = _address(ready, "web")
    token = cli("admin", "token", "--data", str(tls_cell["data"]), "--user", "2").strip()
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=context), _NoRedirects()
    )
    with pytest.raises(urllib.error.HTTPError) as redirect:
        opener.open(f"https://{web_host}:{web_port}/login?token={token}", timeout=10)
    assert redirect.value.code == 303
    assert "Secure" in redirect.value.headers["Set-Cookie"]


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@pytest.fixture
def plain_cell(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A cell of its own (the tests change its keys and revoke its tokens)."""
    settings = {"PYSERVER_REVOCATION_REFRESH_S": "0.2", "PYSERVER_FRAME_TIMEOUT_S": "1.5"}
    proc, ready = _serve(tmp_path, settings)
    try:
        yield {"ready": ready, "data": tmp_path}
    finally:
        _stop(proc)


async def _eventually(check: Callable[[], Awaitable[Any]], within_s: float = 5.0) -> Any:
    """`check()`'s result once it stops raising (the cell re-reads keys and revocations)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await check()
        except (PyserverError, AssertionError, pytest.fail.Exception):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def acli(*args: str) -> str:
    """`cli` off the event loop (the cell's clients keep running meanwhile)."""
    return await asyncio.to_thread(cli, *args)


async def _hello(host: str, port: int, **credential: str) -> Client:
    return await Client.connect(host, port, reconnect=False, **credential)


def test_service_keys_rotate_while_the_cell_runs_without_a_failed_request(
    plain_cell: dict[str, Any],
) -> None:
    host, port = _address(plain_cell["ready"], "server")
    data = str(plain_cell["data"])
    old = read_service_key(plain_cell["data"])
    old_token = cli("admin", "token", "--data", data, "--user", "2").strip()
    assert old_token.split(".")[3] == key_id(old)

    async def scenario() -> None:
        # a tier connected before the rotation, sending all through it
        async with await Client.connect(host, port, service_key=old) as early:
            sending = asyncio.create_task(_keep_sending(early))
            added = await acli("admin", "keys", "add", "--data", data)
            keys = ServiceKeys.from_file(plain_cell["data"] / "service.key").all()
            assert keys[0] == old and len(keys) == 2 and key_id(keys[1]) in added
            new = keys[1]
            await (await _eventually(lambda: _hello(host, port, service_key=new))).close()
            await acli("admin", "keys", "promote", key_id(new), "--data", data)
            new_token = (await acli("admin", "token", "--data", data, "--user", "2")).strip()
            assert new_token.split(".")[3] == key_id(new)
            for credential in ({"user_token": new_token}, {"user_token": old_token}):
                await (await _hello(host, port, **credential)).close()
            retired = await acli("admin", "keys", "retire", key_id(old), "--data", data)
            assert f"{key_id(new)}  current" in retired and key_id(old) + " " not in retired

            async def old_refused() -> None:
                with pytest.raises(Unauthenticated, match="unknown service key"):
                    await _hello(host, port, service_key=old)
                with pytest.raises(Unauthenticated, match="no longer"):
                    await _hello(host, port, user_token=old_token)

            await _eventually(old_refused)
            await (await _hello(host, port, user_token=new_token)).close()
            sent = await sending
            assert sent > 10  # every send through the early connection was answered

    run(scenario, timeout=60)


async def _keep_sending(client: Client, seconds: float = 2.0) -> int:
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await client.send(1, [2], f"during the rotation {sent}")
        sent += 1
        await asyncio.sleep(0.05)
    return sent


def test_a_revoked_token_is_refused_everywhere_within_seconds(plain_cell: dict[str, Any]) -> None:
    host, port = _address(plain_cell["ready"], "server")
    web_host, web_port = _address(plain_cell["ready"], "web")
    data = str(plain_cell["data"])
    revoked, kept = (
        cli("admin", "token", "--data", data, "--user", "2", "--ttl", str(ttl)).strip()
        for ttl in (3600, 7200)
    )
    browser = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
    )
    browser.open(f"http://{web_host}:{web_port}/login?token={revoked}", timeout=10).read()
    counts_page = f"http://{web_host}:{web_port}/api/counts"
    assert browser.open(counts_page, timeout=10).status == 200

    async def scenario() -> None:
        first = await _hello(host, port, user_token=revoked)
        second = await _hello(host, port, user_token=kept)
        await first.counts(2)
        await acli("admin", "revoke", "--data", data, "--user", "2", "--token", revoked)

        async def refused() -> None:
            with pytest.raises(Unauthenticated, match="revoked"):
                await _hello(host, port, user_token=revoked)
            with pytest.raises(Unauthenticated):  # the open connection is signed out too
                await first.counts(2)

        await _eventually(refused)
        assert (await second.counts(2))["folders"]  # another token of the user still works
        with pytest.raises(urllib.error.HTTPError) as signed_out:
            browser.open(counts_page, timeout=10)
        assert signed_out.value.code == 401
        # every token of the user, then one issued afterwards
        await acli("admin", "revoke", "--data", data, "--user", "2")

        async def all_refused() -> None:
            with pytest.raises(Unauthenticated, match="revoked"):
                await _hello(host, port, user_token=kept)

        await _eventually(all_refused)
        await asyncio.sleep(1.1)  # tokens carry whole seconds
        later = (await acli("admin", "token", "--data", data, "--user", "2")).strip()
        async with await _hello(host, port, user_token=later) as client:
            assert (await client.counts(2))["folders"]
        await first.close()
        await second.close()

    run(scenario, timeout=60)


def test_slow_clients_are_dropped_on_every_listener_and_others_served(
    plain_cell: dict[str, Any],
) -> None:
    ready = plain_cell["ready"]
    trickles = {
        "binary": (_address(ready, "server"), b"\x00\x00\x00"),  # a frame's length, cut short
        "http": (_address(ready, "http"), b"GET /health HTTP/1.1\r\nHost: x\r\n"),
        "web": (_address(ready, "web"), b"GET /login HTTP/1.1\r\nHost: x\r\nX-Slow: "),
    }
    opened = {}
    for name, ((host, port), start) in trickles.items():
        sock = socket.create_connection((host, port), timeout=10)
        sock.sendall(start)
        opened[name] = sock
    # others are served meanwhile
    http_host, http_port = _address(ready, "http")
    with urllib.request.urlopen(f"http://{http_host}:{http_port}/health", timeout=10) as ok:
        assert ok.status == 200
    started = time.monotonic()
    for name, sock in opened.items():
        with sock:
            try:
                while sock.recv(65536):  # the binary listener says TOO_MANY first
                    pass
            except ConnectionResetError:
                pass
            waited = time.monotonic() - started
            assert waited < 8, f"{name}: a slow client held its connection {waited:.1f} s"


def test_without_the_cells_credentials_nobody_joins_the_ring_or_freezes_a_user(
    zookeeper: str,
) -> None:
    chroot = f"/pyserver-acl-{uuid.uuid4().hex[:12]}"
    cell_identity, reader = "pyserver:cell-secret", "reader:reader-secret"
    read_ids = [digest_id(reader)]

    def session(**identity: Any) -> ZooKeeper:
        return ZooKeeper(zookeeper, chroot=chroot, session_timeout_s=4.0, **identity)

    async def scenario() -> None:
        owner = session(auth=cell_identity, read_ids=read_ids)
        await owner.start(10.0)
        member = Membership(owner, "c1", "n1", 16)
        await member.join("127.0.0.1:7001", 5.0)
        stranger, wrong, observer = (
            session(),
            session(auth="pyserver:guessed"),
            session(auth=reader),
        )
        try:
            for zk in (stranger, wrong, observer):
                await zk.start(10.0)
            # the reader sees the ring; the others see nothing
            ring = RingWatch(observer, "c1", tokens_per_node=16)
            await ring.start(5.0)
            assert ring.view.active == ["n1"]
            await ring.close()
            for outsider in (stranger, wrong):
                with pytest.raises(ZooKeeperForbidden):
                    await outsider.get_children(layout.nodes_path("c1"))
            # nobody but the cell's identity may take a share of the ring or freeze a user
            for outsider in (stranger, wrong, observer):
                with pytest.raises(ZooKeeperForbidden):
                    await Membership(outsider, "c1", "n2", 16).join("127.0.0.1:7002", 5.0)
                with pytest.raises(ZooKeeperForbidden):
                    await freeze_user(outsider, "c1", 42, "c2")
            assert await owner.get_children(layout.nodes_path("c1")) == ["n1"]
            assert not await owner.exists(user_path("c1", 42))
            # and the cell's own processes still can
            await freeze_user(owner, "c1", 42, "c2")
            assert await owner.exists(user_path("c1", 42))
        finally:
            for zk in (stranger, wrong, observer):
                await zk.close()
            await member.leave()
            await _remove(owner, chroot)
            await owner.close()

    run(scenario, timeout=60)


async def _remove(zk: ZooKeeper, chroot: str) -> None:
    async def remove(path: str) -> None:
        for child in await zk.get_children(path):
            await remove(f"{path}/{child}")
        await zk.delete(path)

    await remove("/")
