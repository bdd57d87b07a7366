"""`pyserver run` and the commands a person uses at a terminal, as real processes.

One cell runs for the module; each test drives it through the `pyserver`
command line exactly as the README shows, and checks what it prints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import start_serving


def pyserver(*args: str, data: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyserver.cli", *args, "--data", str(data)],
        capture_output=True,
        text=True,
        check=check,
        timeout=60,
    )


@pytest.fixture(scope="module")
def cell(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    data = tmp_path_factory.mktemp("cli") / "cell"
    proc, _ = start_serving(
        ["run", "--data", str(data), "--port", "0", "--http-port", "0", "--smtp-port", "0",
         "--web-port", "-1", "--imap-port", "-1"],
        data.parent / "ready.json", stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert (data / "endpoints.json").exists()
    yield data
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "binary protocol  127.0.0.1:" in out
    assert not (data / "endpoints.json").exists(), "a clean stop withdraws the endpoints"


def test_run_writes_a_private_service_key(cell: Path) -> None:
    key = cell / "service.key"
    assert len(key.read_text().strip()) == 64
    assert key.stat().st_mode & 0o777 == 0o600


def test_send_then_read_it_back_as_the_recipient(cell: Path) -> None:
    pyserver("friend", "--user", "11", "12", data=cell)
    sent = pyserver("send", "--user", "11", "--to", "12", "lunch on friday?", data=cell).stdout
    assert sent.startswith("sent m")
    thread_id = sent.split()[-1]

    threads = pyserver("threads", "--user", "12", data=cell).stdout
    assert thread_id in threads
    assert "lunch on friday?" in threads
    assert "unread 1" in threads

    thread = pyserver("thread", "--user", "12", thread_id, data=cell).stdout
    assert "lunch on friday?" in thread
    assert "11 via chat" in thread

    counts = pyserver("counts", "--user", "12", "--json", data=cell).stdout
    assert json.loads(counts)["folders"]["inbox"] == {"unread": 1, "unseen": 1}

    found = pyserver("search", "--user", "12", "friday", data=cell).stdout
    assert "lunch on friday?" in found
    assert "(no match)" in pyserver("search", "--user", "12", "saturday", data=cell).stdout

    pyserver("mark-read", "--user", "12", thread_id, data=cell)
    counts = json.loads(pyserver("counts", "--user", "12", "--json", data=cell).stdout)
    assert counts["folders"]["inbox"]["unread"] == 0


def test_a_stranger_lands_in_other(cell: Path) -> None:
    pyserver("send", "--user", "21", "--to", "22", "hello from a stranger", data=cell)
    assert "(no threads)" in pyserver("threads", "--user", "22", data=cell).stdout
    other = pyserver("threads", "--user", "22", "--folder", "other", data=cell).stdout
    assert "hello from a stranger" in other


def test_tail_prints_new_messages_as_they_arrive(cell: Path) -> None:
    tail = subprocess.Popen(
        [sys.executable, "-m", "pyserver.cli", "tail", "--user", "32", "--json", "--data",
         str(cell)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(1.0)  # let it subscribe
        pyserver("send", "--user", "31", "--to", "32", "are you there?", data=cell)
        event = json.loads(tail.stdout.readline())
        assert event["event"] == "message_added"
        assert event["message"]["text"] == "are you there?"
    finally:
        tail.send_signal(signal.SIGINT)
        tail.wait(timeout=10)


def test_admin_token_export_import_rebuild(cell: Path, tmp_path: Path) -> None:
    pyserver("send", "--user", "41", "--to", "42", "first", data=cell)
    pyserver("send", "--user", "41", "--to", "42", "second", data=cell)

    token = pyserver("admin", "token", "--user", "42", data=cell).stdout.strip()
    user_id, issued, expiry, _key_id, signature = token.split(".")
    assert user_id == "42" and int(issued) <= time.time() < int(expiry)
    assert len(signature) == 64

    exported = tmp_path / "42.jsonl"
    pyserver("admin", "export", "--user", "42", "--out", str(exported), data=cell)
    entries = [json.loads(line) for line in exported.read_text().splitlines()]
    assert [e["action"] for e in entries] == ["message_added", "message_added"]
    assert [e["seq"] for e in entries] == [1, 2]

    report = json.loads(pyserver("admin", "rebuild", "--user", "42", data=cell).stdout)
    assert report["differences"] == [], report

    # The log imported into a fresh user reads the same.
    pyserver("admin", "import", "--user", "43", "--in", str(exported), data=cell)
    threads = json.loads(pyserver("threads", "--user", "43", "--folder", "other", "--json",
                                  data=cell).stdout)  # fmt: skip
    assert threads["threads"][0]["snippet"] == "second"
    assert threads["threads"][0]["messages"] == 2


def test_errors_are_one_clear_line(cell: Path) -> None:
    result = pyserver("thread", "--user", "51", "no-such-thread", data=cell, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("pyserver: NOT_FOUND: ")
    assert "Traceback" not in result.stderr


def test_commands_without_a_running_cell_say_so(tmp_path: Path) -> None:
    result = pyserver("counts", "--user", "1", data=tmp_path / "nothing", check=False)
    assert result.returncode == 1
    assert "no cell is running" in result.stderr


def test_metrics_and_health_over_http(cell: Path) -> None:
    pyserver("send", "--user", "61", "--to", "62", "a write, for the store figures", data=cell)
    pyserver("counts", "--user", "61", data=cell)
    http = json.loads((cell / "endpoints.json").read_text())["http"]
    base = f"http://{http['host']}:{http['port']}"
    with urllib.request.urlopen(f"{base}/health", timeout=10) as response:
        assert json.load(response) == {"status": "ok", "node": "node-1", "store": "ok"}
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'pyserver_requests_total{code="OK",op="COUNTS"}' in metrics
    assert 'pyserver_request_seconds_bucket{le="+Inf",op="COUNTS"}' in metrics
    assert "pyserver_cache_hits_total" in metrics
    assert "pyserver_cache_hit_rate" in metrics
    assert "pyserver_table_replies_total" in metrics
    assert 'pyserver_store_seconds_count{method="append"}' in metrics
    assert "pyserver_connections" in metrics


def test_doctor_names_each_part(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pyserver.cli", "doctor"],
        capture_output=True, text=True, check=True,
        env={**os.environ, "PYSERVER_PURE": "1"},
    ).stdout  # fmt: skip
    for part in ("ring", "log_codec", "lru", "frame_codec", "native_release_build"):
        assert part in out
    assert "PYSERVER_PURE=1" in out
