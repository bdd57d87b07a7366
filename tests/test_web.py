"""The web tier in a real browser: headless Chromium (Debian's) under Playwright, against a
whole cell run as `pyserver run`, with mail sent by swaks. Two people chat live, mail with
an attachment shows up live and downloads byte for byte, a restart of the server in the
middle of a chat loses and doubles nothing, and hostile content runs nothing. The page
hooks are the `data-testid`s of docs/web.md."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

playwright_sync = pytest.importorskip("playwright.sync_api")

from pyserver.app.auth import make_user_token  # noqa: E402
from pyserver.discovery.client import connect_to_cluster  # noqa: E402
from tests.support import run_cli  # noqa: E402
from tests.support.swaks import swaks  # noqa: E402
from tests.support.web import WebCell, chromium  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
LIVE = "#live-state[data-state=live]"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_sync.sync_playwright() as playwright:
        launched = chromium(playwright)
        yield launched
        launched.close()


@pytest.fixture
def cell(tmp_path: Path) -> Iterator[WebCell]:
    running = WebCell(tmp_path / "cell").start()
    yield running
    running.stop()


class Person:
    """One signed-in browser context, failing the test on any script error of its pages."""

    def __init__(self, browser: Any, cell: WebCell, user: int) -> None:
        self.context = browser.new_context(accept_downloads=True)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("dialog", self._dialog)
        self.page.goto(cell.sign_in_link(user))
        assert self.page.url.endswith("/folder/inbox"), self.page.url
        self.cell = cell

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def go(self, path: str) -> None:
        self.page.goto(self.cell.url + path)
        self.page.wait_for_selector(LIVE)

    def messages(self) -> list[str]:
        return [m.inner_text() for m in self.page.query_selector_all("[data-testid=message] .text")]

    def wait_messages(self, count: int, timeout_ms: float = 5_000) -> list[str]:
        self.page.wait_for_function(
            f"() => document.querySelectorAll('[data-testid=message]').length >= {count}",
            timeout=timeout_ms,
        )
        return self.messages()

    def count(self, folder: str) -> str:
        return self.page.inner_text(f"[data-testid=count-{folder}]")

    def wait_count(self, folder: str, value: int, timeout_ms: float = 5_000) -> None:
        shown = f"document.querySelector('[data-testid=count-{folder}]').textContent"
        self.page.wait_for_function(f"() => {shown} === '{value}'", timeout=timeout_ms)

    def type_and_enter(self, text: str) -> None:
        self.page.fill("[data-testid=compose-text]", text)
        self.page.press("[data-testid=compose-text]", "Enter")

    def close(self) -> None:
        self.context.close()
        assert not self.errors, self.errors


def _thread_id(sent: str) -> str:
    found = re.search(r"in thread (\S+)", sent)
    assert found, sent
    return found.group(1)


def test_two_people_chat_live_and_counts_move(browser: Any, cell: WebCell) -> None:
    alice, bob = Person(browser, cell, 1), Person(browser, cell, 2)
    # Alice befriends Bob on her friends page: her messages go to his Inbox.
    alice.go("/friends")
    alice.page.fill("[data-testid=friend-id]", "2")
    alice.page.click("[data-testid=friend-add]")
    assert alice.page.inner_text("[data-testid=friend]").startswith("user 2")

    bob.go("/folder/inbox")
    assert bob.count("inbox") == "0"
    alice.go("/compose")
    alice.page.fill("[data-testid=compose-to]", "2")
    alice.page.fill("[data-testid=compose-subject]", "Friday")
    alice.page.fill("[data-testid=compose-text]", "lunch on friday?")
    alice.page.click("[data-testid=compose-send]")
    alice.page.wait_for_selector(LIVE)  # her thread page

    # Bob's inbox shows the new conversation and its count without a reload.
    bob.page.wait_for_selector("[data-testid=thread]", timeout=5_000)
    bob.wait_count("inbox", 1)
    assert "lunch on friday?" in bob.page.inner_text("[data-testid=thread]")
    bob.page.click("[data-testid=thread]")
    bob.page.wait_for_selector(LIVE)
    assert bob.messages() == ["lunch on friday?"]
    assert bob.count("inbox") == "0"  # opening it read it

    # Each line typed in one browser appears in the other within a second.
    for sender, receiver, text in [
        (bob, alice, "yes! noon?"),
        (alice, bob, "noon it is"),
        (bob, alice, "see you <3"),
    ]:
        before = len(receiver.messages())
        started = time.monotonic()
        sender.type_and_enter(text)
        shown = receiver.wait_messages(before + 1, timeout_ms=1_000)
        assert time.monotonic() - started < 1.0
        assert shown[-1] == text
        assert sender.wait_messages(before + 1)[-1] == text
    assert alice.messages() == bob.messages()
    alice.page.screenshot(path=str(DOCS / "web-chat.png"))

    # A message that arrives while Bob looks at his inbox moves its count.
    bob.go("/folder/inbox")
    alice.type_and_enter("bring the umbrella")
    bob.wait_count("inbox", 1)
    bob.page.wait_for_function(
        "() => document.querySelector('[data-testid=thread]').textContent.includes('umbrella')"
    )
    bob.page.screenshot(path=str(DOCS / "web-inbox.png"))
    alice.close()
    bob.close()


def test_mail_with_attachment_arrives_live_and_downloads_byte_for_byte(
    browser: Any, cell: WebCell, tmp_path: Path
) -> None:
    cell.cli("admin", "add-address", "--user", "2", "bob@example.org")
    bob = Person(browser, cell, 2)
    bob.go("/folder/other")  # a stranger's mail goes to Other
    attachment = tmp_path / "figures.bin"
    attachment.write_bytes(bytes(range(256)) * 1200 + b"\x00end")
    sent = swaks(
        cell.ports["smtp"],
        "--to", "bob@example.org",
        "--from", "carol@example.net",
        "--h-Subject", "the figures",
        "--body", "attached, as promised",
        "--attach-type", "application/octet-stream",
        "--attach", f"@{attachment}",
    )  # fmt: skip
    assert sent.returncode == 0, sent.stdout + sent.stderr
    bob.page.wait_for_selector("[data-testid=thread]", timeout=5_000)
    bob.wait_count("other", 1)
    bob.page.click("[data-testid=thread]")
    bob.page.wait_for_selector("[data-testid=attachment]")
    assert "attached, as promised" in bob.messages()[0]
    assert bob.page.inner_text("[data-testid=attachment]") == "figures.bin"
    with bob.page.expect_download() as download:
        bob.page.click("[data-testid=attachment]")
    assert download.value.suggested_filename == "figures.bin"
    assert Path(download.value.path()).read_bytes() == attachment.read_bytes()
    bob.close()


def test_compose_with_files_archive_move_delete_search_and_paging(
    browser: Any, cell: WebCell, tmp_path: Path
) -> None:
    alice, bob = Person(browser, cell, 1), Person(browser, cell, 2)
    upload = tmp_path / "plan.pdf"
    upload.write_bytes(b"%PDF-1.4 " + bytes(range(256)) * 40)
    alice.go("/compose")
    alice.page.fill("[data-testid=compose-to]", "2, carol@example.net")
    alice.page.fill("[data-testid=compose-subject]", "the plan")
    alice.page.fill("[data-testid=compose-text]", "see the attached plan")
    alice.page.set_input_files("[data-testid=compose-files]", str(upload))
    alice.page.click("[data-testid=compose-send]")
    alice.page.wait_for_selector("[data-testid=attachment]")
    assert "carol@example.net" in alice.page.inner_text("h1")

    bob.go("/folder/other")
    bob.page.click("[data-testid=thread]")
    bob.page.wait_for_selector(LIVE)
    with bob.page.expect_download() as download:
        bob.page.click("[data-testid=attachment]")
    assert Path(download.value.path()).read_bytes() == upload.read_bytes()
    # search finds it; archive, move and delete file it away
    bob.page.fill("header input[name=q]", "attached plan")
    bob.page.press("header input[name=q]", "Enter")
    bob.page.wait_for_selector("[data-testid=search-result]")
    assert "see the attached plan" in bob.page.inner_text("[data-testid=search-result]")
    bob.page.click("[data-testid=search-result] a")
    bob.page.wait_for_selector(LIVE)
    bob.page.click("[data-testid=archive]")
    bob.go("/folder/archived")
    assert len(bob.page.query_selector_all("[data-testid=thread]")) == 1
    bob.page.click("[data-testid=thread]")
    bob.page.wait_for_selector(LIVE)
    bob.page.select_option("select[name=folder]", "inbox")
    bob.page.click("text=Move")
    bob.go("/folder/inbox")
    bob.page.click("[data-testid=thread]")
    bob.page.wait_for_selector(LIVE)
    bob.page.click("[data-testid=delete]")
    bob.go("/folder/inbox")
    assert bob.page.query_selector("[data-testid=thread]") is None

    # 30 conversations page by 25
    for user in range(10, 40):
        cell.cli("send", "--user", str(user), "--to", "1", f"note {user}")
    alice.go("/folder/other")
    assert len(alice.page.query_selector_all("[data-testid=thread]")) == 25
    alice.page.click("a.more")
    alice.page.wait_for_selector(LIVE)
    assert len(alice.page.query_selector_all("[data-testid=thread]")) == 5
    assert "note 10" in alice.page.inner_text("#threads")
    alice.close()
    bob.close()


def test_a_restart_during_a_chat_loses_and_doubles_nothing(browser: Any, cell: WebCell) -> None:
    cell.cli("friend", "--user", "1", "2")
    thread = _thread_id(cell.cli("send", "--user", "1", "--to", "2", "hello"))
    alice, bob = Person(browser, cell, 1), Person(browser, cell, 2)
    alice.go(f"/thread/{thread}")
    bob.go(f"/thread/{thread}")
    alice.type_and_enter("before the restart")
    assert bob.wait_messages(2)[-1] == "before the restart"

    cell.stop()
    for person in (alice, bob):
        person.page.wait_for_selector("#live-state[data-state=offline]", timeout=5_000)
    # Typed while the server is down: kept by the page and sent once it is back.
    alice.type_and_enter("while it was down")
    cell.start()
    # Sent by another client while the pages are still reconnecting.
    cell.cli("send", "--user", "1", "--to", "2", "from the command line")

    expected = ["hello", "before the restart", "while it was down", "from the command line"]
    for person in (alice, bob):
        person.page.wait_for_selector(LIVE, timeout=15_000)
        shown = person.wait_messages(4, timeout_ms=10_000)
        assert sorted(shown) == sorted(expected), shown
    time.sleep(0.5)  # a doubled copy would show up by now
    for person in (alice, bob):
        ids = person.page.eval_on_selector_all(
            "[data-testid=message]", "items => items.map(item => item.dataset.message)"
        )
        assert len(ids) == len(set(ids)) == 4
    stored = json.loads(cell.cli("thread", "--user", "2", thread, "--json"))
    assert sorted(m["text"] for m in stored["messages"]) == sorted(expected)
    alice.close()
    bob.close()


def test_hostile_content_runs_nothing(browser: Any, cell: WebCell, tmp_path: Path) -> None:
    cell.cli("admin", "add-address", "--user", "2", "bob@example.org")
    bob = Person(browser, cell, 2)
    bob.page.add_init_script("window.__xss = 0")
    mallory = Person(browser, cell, 3)
    mallory.go("/compose")
    mallory.page.fill("[data-testid=compose-to]", "2")
    mallory.page.fill("[data-testid=compose-subject]", "<img src=x onerror=window.__xss=1>")
    mallory.page.fill(
        "[data-testid=compose-text]",
        '<script>window.__xss=2</script><img src=x onerror="window.__xss=3">',
    )
    mallory.page.click("[data-testid=compose-send]")
    page_file = tmp_path / "page.html"
    page_file.write_text("<script>window.__xss=4</script>")
    sent = swaks(
        cell.ports["smtp"],
        "--to", "bob@example.org",
        "--from", "mallory@example.net",
        "--h-From", '"<script>window.__xss=5</script>" <mallory@example.net>',
        "--h-Subject", "<svg onload=window.__xss=6>",
        "--body", "<b onmouseover=window.__xss=7>hi</b>",
        "--attach-type", "text/html",
        "--attach-name", "<img src=x onerror=window.__xss=8>.html",
        "--attach", f"@{page_file}",
    )  # fmt: skip
    assert sent.returncode == 0, sent.stdout + sent.stderr

    bob.go("/folder/other")
    bob.page.wait_for_function("() => document.querySelectorAll('[data-testid=thread]').length > 1")
    listing = bob.page.inner_text("#threads")
    assert "<img src=x onerror=window.__xss=1>" in listing
    shown = ""
    for thread in range(2):
        bob.go("/folder/other")
        bob.page.click(f"[data-testid=thread] >> nth={thread}")
        bob.page.wait_for_selector(LIVE)
        assert bob.page.evaluate("window.__xss") == 0
        assert bob.page.query_selector("main img, main svg, main b, main script") is None
        shown += bob.page.inner_text("main")
        if bob.page.query_selector("[data-testid=attachment]"):
            mail_page = bob.page.url
    for literal in [
        '<script>window.__xss=2</script><img src=x onerror="window.__xss=3">',
        "<img src=x onerror=window.__xss=1>",
        "<script>window.__xss=5</script> <mallory@example.net>",
        "<svg onload=window.__xss=6>",
        "<b onmouseover=window.__xss=7>hi</b>",
    ]:
        assert literal in shown, literal
    bob.page.goto(mail_page)
    link = bob.page.query_selector("[data-testid=attachment]")
    assert link is not None and link.inner_text() == "<img src=x onerror=window.__xss=8>.html"
    # The HTML attachment is a download, never a page of this site.
    href = link.get_attribute("href")
    answer = bob.context.request.get(cell.url + href)
    assert answer.headers["content-type"] == "application/octet-stream"
    assert answer.headers["content-disposition"].startswith("attachment;")
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert "script-src 'self'" in answer.headers["content-security-policy"]
    assert bob.dialogs == [] and mallory.dialogs == []
    bob.close()
    mallory.close()


def test_a_kill_of_the_owner_during_a_chat_on_a_cluster_loses_and_doubles_nothing(
    browser: Any, tmp_path: Path, zookeeper: str
) -> None:
    """`pyserver web` in front of a cluster (`pyserver cluster up`: one cell of three app
    servers on SQLite): the app server owning Bob is killed with SIGKILL mid-chat; the
    pages stay on the web tier, which finds Bob's new owner through discovery."""
    folder = tmp_path / "cluster"
    up = run_cli("cluster", "up", "--dir", str(folder), "--engine", "sqlite", "--cells", "1",
                   "--nodes", "3", "--session-timeout", "3", timeout=180)  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        status = json.loads(run_cli("cluster", "status", "--dir", str(folder), "--json").stdout)
        processes = {p["name"]: p for p in status["processes"]}
        state = json.loads((folder / "cluster.json").read_text())
        key = Path(state["service_key_file"]).read_text().strip()
        cluster = _ClusterWeb(f"http://{processes['web']['address']}", key)
        sent = run_cli("send", "--cluster", str(folder), "--user", "1", "--to", "2", "hi")
        thread = _thread_id(sent.stdout)
        alice, bob = Person(browser, cluster, 1), Person(browser, cluster, 2)  # type: ignore[arg-type]
        alice.go(f"/thread/{thread}")
        bob.go(f"/thread/{thread}")
        alice.type_and_enter("before the kill")
        assert bob.wait_messages(2)[-1] == "before the kill"

        # (Playwright's loop runs in this thread: ask on another one)
        with ThreadPoolExecutor(1) as thread_of_its_own:
            owner = thread_of_its_own.submit(asyncio.run, _owner_address(folder, 2)).result()
        victim = next(p for p in status["processes"] if p["address"] == owner)
        os.kill(victim["pid"], signal.SIGKILL)
        bob.type_and_enter("during the failover")
        alice.type_and_enter("me too")
        expected = ["hi", "before the kill", "during the failover", "me too"]
        for person in (alice, bob):
            shown = person.wait_messages(4, timeout_ms=30_000)
            assert sorted(shown) == sorted(expected), shown
        time.sleep(0.5)
        for person in (alice, bob):
            assert sorted(person.messages()) == sorted(expected)
        # the new owner serves Bob's live page: a message after the failover arrives live
        started = time.monotonic()
        alice.type_and_enter("after it")
        assert bob.wait_messages(5, timeout_ms=5_000)[-1] == "after it"
        assert time.monotonic() - started < 5
        alice.close()
        bob.close()
    finally:
        run_cli("cluster", "down", "--dir", str(folder), "--grace", "10", timeout=120)


class _ClusterWeb:
    """What `Person` needs of a web tier in front of a cluster: its address, sign-in links."""

    def __init__(self, url: str, key: str) -> None:
        self.url = url
        self.key = key

    def sign_in_link(self, user: int) -> str:
        token = make_user_token(user, int(time.time()) + 3600, self.key)
        return f"{self.url}/login?token={token}"


async def _owner_address(folder: Path, user: int) -> str:
    client = await connect_to_cluster(folder)
    try:
        owner = await client.owner_client(user)
        return f"{owner.host}:{owner.port}"
    finally:
        await client.close()
