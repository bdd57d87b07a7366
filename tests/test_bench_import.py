"""`python -m bench corpus` writes the same mailboxes for the same seed, of every kind the
import takes; `python -m bench import --quick --json` prints its figures (a smoke run)."""

from __future__ import annotations

import json
import mailbox
import subprocess
import sys
from pathlib import Path

import pytest

from bench.corpus import generate
from pyserver.implementation import PURE_FORCED


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_the_corpus_is_reproducible_and_realistic(tmp_path: Path) -> None:
    first = generate(tmp_path / "a", 30, 30, seed=3)
    second = generate(tmp_path / "b", 30, 30, seed=3)
    other = generate(tmp_path / "c", 30, 30, seed=4)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _files(tmp_path / "a") != _files(tmp_path / "c")
    assert first.copies == second.copies and other.copies > 0
    # about 30 messages in every mailbox
    assert 30 * 30 <= first.copies <= 30 * 30 * 1.5
    lines = [json.loads(line) for line in Path(first.paths["jsonl"]).read_text().splitlines()]
    assert {line["channel"] for line in lines} == {"chat", "email", "sms"}
    assert any(line.get("in_reply_to") for line in lines)
    assert any(line.get("attachments") for line in lines)
    assert any(line.get("read") is False for line in lines)
    assert any("> " in line["text"] for line in lines if line["channel"] == "email")
    raw = b"".join(
        b"".join(box.get_bytes(key) for key in box.iterkeys())
        for box in (mailbox.mbox(str(p)) for p in Path(first.paths["mbox"]).iterdir())
    )
    for charset in (b"koi8-r", b"shift_jis", b"iso-8859-1", b"utf-8"):
        assert charset in raw
    for encoding in (b"base64", b"quoted-printable", b"8bit"):
        assert b"Content-Transfer-Encoding: " + encoding in raw
    assert b"In-Reply-To: " in raw and b"Status: O" in raw and b"Status: RO" in raw
    maildirs = list(Path(first.paths["maildir"]).iterdir())
    assert any((m / ".Sent" / "cur").iterdir() for m in maildirs)
    assert any((m / "new").iterdir() for m in maildirs)


@pytest.mark.slow
@pytest.mark.skipif(PURE_FORCED, reason="the benchmarks refuse to run on the pure twins")
def test_import_bench_json_shape() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "import", "--quick", "--json"],
        capture_output=True, text=True, check=True, timeout=600,
    ).stdout  # fmt: skip
    results = json.loads(out)
    assert results["import_msgs_per_s"] > 0 and results["import_mail_msgs_per_s"] > 0
    assert results["live_p99_ratio"] > 0
    assert results["jsonl_alone"]["messages"] > 4000
    assert results["beside_live"]["counts_during_import"]["errors"] == 0
