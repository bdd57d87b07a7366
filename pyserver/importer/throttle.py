"""The import's pace: a rate limit, lowered while the cell serving the same store slows down.

`Pace` is the rule, sans I/O: `delay(messages)` says how long to wait before
writing a batch of that many messages so that the import stays under its rate
(a token bucket holding one second of it), and `observe(latency)` takes the
round-trip times of a probe of the live cell. Every `window_s` the p99 of the
window's samples is compared with the baseline, the cell's latency as it
usually is: the lower quartile of the window p99s seen so far (one lucky quiet
window does not set it, nor does a spike; nothing changes before four
windows). Above `backoff_factor` times it, the rate is halved, never under the
floor (5% of the rate asked for, or of the pace at the first back-off, and at
least 50 a second: an import is slowed, not starved); otherwise it climbs back
by a quarter a window, up to the rate asked for (`--rate`). With no rate asked
for, the import runs unlimited until the first back-off, which halves the pace
measured so far.

`CellProbe` is the I/O: while a cell serves `--data` (its endpoints file), it
PINGs it over the binary protocol every `interval_s` and reports each round
trip, so the import yields to live traffic of the same cell.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from bisect import insort
from collections.abc import Callable
from pathlib import Path

from pyserver import endpoints
from pyserver.client import Client
from pyserver.servicekey import read_service_key

__all__ = ["CellProbe", "Pace"]

log = logging.getLogger(__name__)

# Windows measured before the first back-off may come.
_WARM_UP_WINDOWS = 4


class Pace:
    """A rate limit with back-off on the cell's p99 (see the module docstring)."""

    def __init__(
        self,
        rate: float | None,
        *,
        window_s: float = 1.0,
        backoff_factor: float = 2.0,
        floor: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive")
        self.ceiling = rate
        self.rate = rate
        self._window_s = window_s
        self._factor = backoff_factor
        self._floor = floor if floor is not None else (max(50.0, 0.05 * rate) if rate else None)
        self._window_p99s: list[float] = []
        self._clock = clock
        self._started = clock()
        self._tokens = rate or 0.0
        self._last = self._started
        self._written = 0
        self._samples: list[float] = []
        self._window_start = self._started
        self.baseline: float | None = None
        self.backoffs = 0

    def delay(self, messages: int) -> float:
        """Seconds to wait before writing `messages` more (0: now); counts them as written."""
        now = self._clock()
        self._written += messages
        if self.rate is None:
            return 0.0
        self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= messages
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def observe(self, latency_s: float) -> None:
        """A probe's round trip; every window, the rate follows the window's p99."""
        self._samples.append(latency_s)
        now = self._clock()
        if now - self._window_start < self._window_s or len(self._samples) < 5:
            return
        samples = sorted(self._samples)
        p99 = samples[min(len(samples) - 1, int(0.99 * len(samples)))]
        self._samples.clear()
        self._window_start = now
        insort(self._window_p99s, p99)
        self.baseline = self._window_p99s[len(self._window_p99s) // 4]
        if len(self._window_p99s) < _WARM_UP_WINDOWS:  # the baseline is not known yet
            return
        if p99 > self._factor * self.baseline:
            pace = self.rate or self._written / max(now - self._started, 1e-3)
            if self._floor is None:
                self._floor = max(50.0, 0.05 * pace)
            self.rate = max(self._floor, pace / 2)
            self.backoffs += 1
        elif self.rate is not None:
            raised = self.rate * 1.25
            self.rate = raised if self.ceiling is None else min(self.ceiling, raised)

    def to_json(self) -> dict[str, float | int | None]:
        return {
            "rate_limit": self.ceiling,
            "rate_now": round(self.rate, 1) if self.rate is not None else None,
            "backoffs": self.backoffs,
            "cell_baseline_p99_ms": round(self.baseline * 1e3, 3) if self.baseline else None,
        }


class CellProbe:
    """PINGs the cell serving `data_dir` (if one does) and tells `pace` each round trip."""

    def __init__(self, data_dir: Path, pace: Pace, interval_s: float = 0.05) -> None:
        self._data_dir = data_dir
        self._pace = pace
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> bool:
        """Start probing; False when no cell serves the data folder."""
        try:
            host, port = endpoints.server_address(self._data_dir)
            key = read_service_key(self._data_dir)
        except Exception:
            return False
        self._task = asyncio.get_running_loop().create_task(self._probe(host, port, key))
        return True

    async def _probe(self, host: str, port: int, key: str) -> None:
        try:
            async with await Client.connect(host, port, service_key=key) as client:
                while True:
                    started = time.perf_counter()
                    await client.ping()
                    self._pace.observe(time.perf_counter() - started)
                    await asyncio.sleep(self._interval_s)
        except Exception as exc:  # the cell went away: the import goes on at its rate
            log.info("cell probe stopped: %r", exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
