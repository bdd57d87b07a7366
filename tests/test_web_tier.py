"""The web tier's rules without a browser: sessions and CSRF tokens (pure logic, with a
fake clock), and, against a whole cell run as `pyserver run`, that nothing is served
without a session, that a session reaches its own user's mailbox only, that forms need
their CSRF token, and that a live socket opens from the site's own pages only."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from pyserver.app.auth import make_user_token
from pyserver.errors import Unauthenticated
from pyserver.servicekey import ServiceKeys
from pyserver.web.sessions import SessionKeeper
from tests.support import run, run_cli
from tests.support.swaks import swaks
from tests.support.web import WebCell

KEY = "web-tier-test-key-0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


# ---- sessions (pure) ----


def test_a_session_is_read_back_until_it_expires() -> None:
    clock = Clock()
    keeper = SessionKeeper(KEY, lifetime_s=600, clock=clock)
    session, cookie = keeper.sign_in(make_user_token(7, int(clock.now) + 3600, KEY))
    assert session.user == 7 and session.expires_at == int(clock.now) + 600
    assert keeper.read(cookie) == session
    # another process with the same key reads it too
    assert SessionKeeper(KEY, clock=clock).read(cookie) == session
    clock.now += 600
    assert keeper.read(cookie) is None


def test_a_session_never_outlives_its_token() -> None:
    clock = Clock()
    keeper = SessionKeeper(KEY, lifetime_s=86_400, clock=clock)
    session, _ = keeper.sign_in(make_user_token(7, int(clock.now) + 60, KEY))
    assert session.expires_at == int(clock.now) + 60


@pytest.mark.parametrize(
    "token",
    [
        make_user_token(7, 999_999, KEY),  # expired
        make_user_token(7, 2_000_000, "another key"),  # signed by someone else
        "7.2000000.nothex",
        "",
    ],
)
def test_a_bad_token_signs_nobody_in(token: str) -> None:
    with pytest.raises(Unauthenticated):
        SessionKeeper(KEY, clock=Clock()).sign_in(token)


def test_a_forged_or_altered_cookie_is_nobody() -> None:
    keeper = SessionKeeper(KEY, clock=Clock())
    _, cookie = keeper.sign_in(make_user_token(7, 2_000_000, KEY))
    version, user, expiry, issued, token, nonce, signature = cookie.split(".")
    for forged in [
        f"{version}.8.{expiry}.{issued}.{token}.{nonce}.{signature}",  # another user
        f"{version}.{user}.9999999999.{issued}.{token}.{nonce}.{signature}",  # a later expiry
        f"{version}.{user}.{expiry}.{int(issued) + 1}.{token}.{nonce}.{signature}",  # reissued
        f"{version}.{user}.{expiry}.{issued}.{'0' * 16}.{nonce}.{signature}",  # another token
        f"{version}.{user}.{expiry}.{issued}.{token}.{nonce}.{'0' * 64}",
        cookie + "0",
        "v2.7",
        "x" * 1000,
    ]:
        assert keeper.read(forged) is None, forged
    assert SessionKeeper("another key", clock=Clock()).read(cookie) is None


def test_sessions_outlive_a_key_rotation_and_end_with_their_token() -> None:
    old, new = KEY, KEY + "-next"
    before = SessionKeeper(ServiceKeys([old, new]), clock=Clock())
    session, cookie = before.sign_in(make_user_token(7, 2_000_000, old))
    # the new key promoted: pages signed before still work; the old key retired: they end
    promoted = SessionKeeper(ServiceKeys([new, old]), clock=Clock())
    read = promoted.read(cookie)
    assert read is not None and (read.user, read.nonce) == (session.user, session.nonce)
    assert promoted.check_csrf(read, session.csrf)  # a form of a page loaded before
    assert SessionKeeper(ServiceKeys([new]), clock=Clock()).read(cookie) is None
    # a revoked sign-in token ends its sessions
    revoked: set[str] = set()
    keeper = SessionKeeper(KEY, clock=Clock(), revoked=lambda token: token.token_id in revoked)
    session, cookie = keeper.sign_in(make_user_token(7, 2_000_000, KEY))
    assert keeper.read(cookie) == session
    revoked.add(session.token.token_id)
    assert keeper.read(cookie) is None
    with pytest.raises(Unauthenticated, match="revoked"):
        keeper.sign_in(make_user_token(7, 2_000_000, KEY, issued_at=session.token.issued_at))


def test_signing_out_refuses_the_cookie_and_csrf_tokens_are_per_session() -> None:
    keeper = SessionKeeper(KEY, clock=Clock())
    first, cookie = keeper.sign_in(make_user_token(7, 2_000_000, KEY))
    second, _ = keeper.sign_in(make_user_token(7, 2_000_000, KEY))
    assert first.csrf != second.csrf
    assert keeper.check_csrf(first, first.csrf)
    assert not keeper.check_csrf(first, second.csrf)
    assert not keeper.check_csrf(first, None) and not keeper.check_csrf(first, "")
    keeper.sign_out(first)
    assert keeper.read(cookie) is None


def test_the_login_form_token_is_bound_to_its_cookie() -> None:
    keeper = SessionKeeper(KEY, clock=Clock())
    nonce, token = keeper.new_login_nonce()
    other_nonce, _ = keeper.new_login_nonce()
    assert keeper.check_login_csrf(nonce, token)
    assert not keeper.check_login_csrf(other_nonce, token)
    assert not keeper.check_login_csrf(None, token)


# ---- a running cell ----


@pytest.fixture(scope="module")
def cell(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebCell]:
    """One cell for the module: its tests only read, and each writes to users of its own."""
    running = WebCell(tmp_path_factory.mktemp("web") / "cell").start()
    yield running
    running.stop()


def _status(opener: urllib.request.OpenerDirector, url: str, data: bytes | None = None) -> tuple:
    try:
        with opener.open(url, data=data) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as answer:
        return answer.code, dict(answer.headers), answer.read()


def _csrf(page: bytes) -> str:
    found = re.search(rb'data-csrf="([0-9a-f]+)"', page)
    assert found, page[:500]
    return found.group(1).decode()


def test_nothing_is_served_without_a_session(cell: WebCell) -> None:
    anonymous = cell.http()
    for path in ["/", "/folder/inbox", "/compose", "/friends", "/search?q=x", "/thread/t1"]:
        status, headers, _ = _status(anonymous, cell.url + path)
        assert (status, headers.get("Location")) == (303, "/login"), path
    for path in ["/api/counts", "/api/threads", "/live", "/attachment/m/" + "0" * 64]:
        assert _status(anonymous, cell.url + path)[0] == 401, path
    assert _status(anonymous, cell.url + "/compose", b"to=2&text=hi")[0] == 303
    forged = cell.http()
    forged.addheaders = [("Cookie", "pyserver_session=v1.2.9999999999.abc." + "0" * 64)]
    assert _status(forged, cell.url + "/folder/inbox")[0] == 303


def test_a_bad_token_gets_the_sign_in_page_with_the_reason(cell: WebCell) -> None:
    status, headers, page = _status(cell.http(), cell.url + "/login?token=5.1.abc")
    assert status == 401 and b"malformed user token" in page
    assert "pyserver_session" not in headers.get("Set-Cookie", "")


def test_the_session_cookie_is_httponly_and_strict(cell: WebCell) -> None:
    status, headers, _ = _status(cell.http(), cell.sign_in_link(40))
    assert status == 303 and headers["Location"] == "/folder/inbox"
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie


def test_a_session_reaches_its_own_mailbox_only(cell: WebCell, tmp_path: Path) -> None:
    # Users 11 and 12 talk, with a mail with a file to 12; user 13 signs in and tries it all.
    sent = cell.cli("send", "--user", "11", "--to", "12", "private")
    thread = re.search(r"in thread (\S+)", sent).group(1)  # type: ignore[union-attr]
    cell.cli("admin", "add-address", "--user", "12", "twelve@example.org")
    secret = tmp_path / "secret.txt"
    secret.write_text("the secret file")
    mail = swaks(cell.ports["smtp"], "--to", "twelve@example.org", "--attach", f"@{secret}")
    assert mail.returncode == 0, mail.stdout
    threads = json.loads(cell.cli("threads", "--user", "12", "--folder", "other", "--json"))
    mail_thread = threads["threads"][0]["thread_id"]
    mail_view = json.loads(cell.cli("thread", "--user", "12", mail_thread, "--json"))
    message = mail_view["messages"][0]
    ref = message["attachments"][0]["ref"]

    owner, stranger = cell.http(12), cell.http(13)
    assert _status(owner, f"{cell.url}/thread/{thread}")[0] == 200
    attachment = f"{cell.url}/attachment/{message['message_id']}/{ref}"
    status, _, body = _status(owner, attachment)
    assert status == 200 and body == b"the secret file"
    for url in [
        f"{cell.url}/thread/{thread}",
        f"{cell.url}/api/thread/{thread}",
        f"{cell.url}/api/thread/{mail_thread}",
        attachment,
    ]:
        status, _, body = _status(stranger, url)
        assert status == 404, (url, body)
        assert b"private" not in body and b"secret" not in body
    page = _status(stranger, f"{cell.url}/folder/inbox")[2]
    token = _csrf(page)
    # A form naming another user's thread changes nothing of theirs.
    move = urllib.parse.urlencode({"csrf": token, "folder": "spam"}).encode()
    assert _status(stranger, f"{cell.url}/thread/{thread}/move", move)[0] == 404
    assert json.loads(cell.cli("thread", "--user", "12", thread, "--json"))["folder"] != "spam"


def test_forms_need_their_sessions_csrf_token(cell: WebCell) -> None:
    sent = cell.cli("send", "--user", "21", "--to", "22", "keep me")
    thread = re.search(r"in thread (\S+)", sent).group(1)  # type: ignore[union-attr]
    browser, other = cell.http(22), cell.http(22)
    token = _csrf(_status(browser, f"{cell.url}/folder/inbox")[2])
    other_token = _csrf(_status(other, f"{cell.url}/folder/inbox")[2])
    delete = f"{cell.url}/thread/{thread}/delete"
    for form in [{}, {"csrf": "0" * 64}, {"csrf": other_token}]:
        status, _, body = _status(browser, delete, urllib.parse.urlencode(form).encode())
        assert status == 403 and b"CSRF" in body, form
    assert "keep me" in cell.cli("thread", "--user", "22", thread)
    # with its own token the form works
    status = _status(browser, delete, urllib.parse.urlencode({"csrf": token}).encode())[0]
    assert status == 303
    failed = run_cli("thread", "--user", "22", thread, "--data", str(cell.folder))
    assert failed.returncode != 0 and "NOT_FOUND" in failed.stderr + failed.stdout


def test_signing_out_ends_the_session_for_every_copy_of_its_cookie(cell: WebCell) -> None:
    browser = cell.http(31)
    page = _status(browser, f"{cell.url}/folder/inbox")[2]
    token = _csrf(page)
    status, headers, _ = _status(
        browser, f"{cell.url}/logout", urllib.parse.urlencode({"csrf": token}).encode()
    )
    assert status == 303 and headers["Location"] == "/login"
    assert _status(browser, f"{cell.url}/folder/inbox")[0] == 303


def test_a_live_socket_opens_from_the_sites_own_pages_only(cell: WebCell) -> None:
    opener = cell.http(32)
    _status(opener, f"{cell.url}/folder/inbox")
    cookie = next(
        handler.cookiejar  # type: ignore[attr-defined]
        for handler in opener.handlers
        if isinstance(handler, urllib.request.HTTPCookieProcessor)
    )
    session = next(c.value for c in cookie if c.name == "pyserver_session")

    async def scenario() -> tuple[int, str]:
        headers = {"Cookie": f"pyserver_session={session}"}
        async with aiohttp.ClientSession() as client:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await client.ws_connect(
                    f"{cell.url}/live", headers={**headers, "Origin": "http://evil.example"}
                )
            origin = f"http://127.0.0.1:{cell.ports['web']}"
            async with client.ws_connect(
                f"{cell.url}/live", headers={**headers, "Origin": origin}
            ) as socket:
                first = json.loads((await socket.receive(timeout=5)).data)
                await socket.send_str(json.dumps({"type": "send", "to": [33], "text": "x"}))
                answer = json.loads((await socket.receive(timeout=5)).data)
            return refused.value.status, first["type"] + " " + answer["message"]

    status, said = run(scenario)
    assert status == 403
    # the socket works, and a send without the session's CSRF token is refused
    assert said == "resync missing or wrong CSRF token"


def test_a_request_over_the_upload_limit_is_refused(cell: WebCell) -> None:
    browser = cell.http(34)
    token = _csrf(_status(browser, f"{cell.url}/compose")[2])
    boundary = "pyserverbound"
    big = b"x" * (26 << 20)  # over the default 25 MiB
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="csrf"\r\n\r\n{token}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + big
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{cell.url}/compose",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    status = _status(browser, request)[0]  # type: ignore[arg-type]
    assert status == 413
    assert json.loads(cell.cli("threads", "--user", "34", "--folder", "sent", "--json")) == {
        "threads": [],
        "next": None,
    }
