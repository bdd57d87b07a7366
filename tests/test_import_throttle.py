"""The import's pace (pyserver.importer.throttle): the rate limit's arithmetic and the
back-off on the cell's p99, on a clock the test moves; and `--rate` on a real import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyserver.importer.throttle import Pace
from tests.support import run_cli


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_limit_lets_a_second_through_then_spaces_batches() -> None:
    clock = Clock()
    pace = Pace(100, clock=clock)
    assert pace.delay(100) == 0.0  # the bucket holds one second of the rate
    assert pace.delay(50) == pytest.approx(0.5)
    clock.now += 0.5
    assert pace.delay(50) == pytest.approx(0.5)  # the first 50 used the half second
    clock.now += 10
    assert pace.delay(100) == 0.0  # idle time fills the bucket up to one second only
    assert pace.delay(1) == pytest.approx(0.01)
    assert Pace(None, clock=clock).delay(10**9) == 0.0
    with pytest.raises(ValueError):
        Pace(0)


def _window(pace: Pace, clock: Clock, latency_s: float) -> None:
    for _ in range(10):
        clock.now += 0.11
        pace.observe(latency_s)


def test_the_rate_halves_while_the_cells_p99_is_up_and_climbs_back() -> None:
    clock = Clock()
    pace = Pace(1000, clock=clock, floor=100)
    for _ in range(4):
        _window(pace, clock, 0.001)
    assert pace.baseline == pytest.approx(0.001) and pace.rate == 1000
    _window(pace, clock, 0.0015)  # within twice the baseline: no change
    assert pace.rate == 1000 and pace.backoffs == 0
    _window(pace, clock, 0.005)
    assert pace.rate == 500 and pace.backoffs == 1
    _window(pace, clock, 0.005)
    _window(pace, clock, 0.005)
    _window(pace, clock, 0.005)
    assert pace.rate == 100  # never under the floor
    assert pace.baseline == pytest.approx(0.001)  # the spell of high p99 does not set it
    _window(pace, clock, 0.001)
    assert pace.rate == pytest.approx(125)
    for _ in range(20):
        _window(pace, clock, 0.001)
    assert pace.rate == 1000  # back to the limit asked for, not past it
    assert pace.to_json()["backoffs"] == 4


def test_one_quiet_window_does_not_set_the_baseline() -> None:
    clock = Clock()
    pace = Pace(1000, clock=clock)
    _window(pace, clock, 0.0001)  # a lucky moment
    for _ in range(6):
        _window(pace, clock, 0.001)
    assert pace.rate == 1000 and pace.baseline == pytest.approx(0.001)
    assert Pace(1000)._floor == 50 and Pace(100_000)._floor == 5000


def test_without_a_limit_the_first_backoff_halves_the_pace_so_far() -> None:
    clock = Clock()
    pace = Pace(None, clock=clock)
    for _ in range(4):
        _window(pace, clock, 0.001)
    pace.delay(17600)  # 17,600 messages in the 4.4 s since the start
    _window(pace, clock, 0.01)
    assert pace.rate == pytest.approx(17600 / 5.5 / 2)


def test_an_import_keeps_its_rate(tmp_path: Path) -> None:
    source = tmp_path / "chat.jsonl"
    with open(source, "w") as out:
        for user in range(1, 4):
            for n in range(50):
                out.write(json.dumps({"id": f"{user}-{n}", "from": user, "to": [user + 10],
                                      "ts": 1704000000 + n, "text": "hi"}) + "\n")  # fmt: skip
    done = run_cli("import", "jsonl", str(source), "--data", str(tmp_path / "data"), "--json",
                   "--rate", "100", "--jobs", "1")  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # 300 copies at 100 a second: the first second's worth at once, then 200 more
    assert report["messages"] == 300
    assert report["seconds"] >= 1.5
    assert report["pace"]["rate_limit"] == 100 and report["pace"]["backoffs"] == 0
