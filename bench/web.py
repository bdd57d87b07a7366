"""`python -m bench web`: live chat through the web tier, with a thousand pages connected.

A real cell (`pyserver run`: native core, uvloop, durable SQLite) and, in front of it,
the web tier as its own process (`pyserver web`), as a cluster deploys them. This
process plays the browsers: USERS users signed in over HTTP, each with one page's
WebSocket open (/live), speaking exactly what `static/app.js` speaks.

- `chat_p50_ms`, `chat_p99_ms`: from a page's `send` over its socket to the `message_added`
  event on the recipient's socket, with every page connected; messages paced, one at a
  time in flight (LATENCY_SAMPLES of them, random pairs).
- `delivered_per_s`: half of the pages each send MESSAGES_EACH messages to the other
  half as fast as their sockets take them; deliveries per second until the last one
  reached its recipient's page.
- `web_vs_direct_send`: the cost of one chat message through the web tier (a page's
  `send` until its `sent` answer) over the cost of the same SEND straight over the
  binary protocol from the client library, both with WIDTH messages in flight, rounds
  alternating and each keeping its best (bench.timing's rule). The direct SEND is the
  ceiling: the web tier can only add to it. Beside it, the CPU the web process spent
  per message (`web_cpu_us_per_message`) and the app server per direct SEND
  (`server_cpu_us_per_send`), read from /proc.

Targets (issue 10): `chat_p99_ms` under 50 with 1,000 pages connected, and
`web_vs_direct_send` at most 2.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.listeners import free_port, start_cell, start_pyserver, stop_process

USERS = 1_000
LATENCY_SAMPLES = 400
MESSAGES_EACH = 10
WIDTH = 32
ROUNDS = 3
ROUND_MESSAGES = 1_500


@contextmanager
def _cell_and_web() -> Iterator[tuple[int, int, str, dict[str, int]]]:
    """`pyserver run` (no web tier of its own) and `pyserver web` in front of it: the app
    server's port, the web tier's port, the service key and both processes' pids."""
    with tempfile.TemporaryDirectory(prefix="bench-web-") as folder:
        data = Path(folder)
        cell, addresses = start_cell(data)
        try:
            web_port = free_port()
            web, _ = start_pyserver(
                ["web", "--data", folder, "--port", str(web_port)], data / "web.ready"
            )
            try:
                key = (data / "service.key").read_text().strip()
                pids = {"cell": cell.pid, "web": web.pid}
                yield addresses["server"]["port"], web_port, key, pids
            finally:
                stop_process(web)
        finally:
            stop_process(cell)


class Page:
    """One user's page: its socket, what it was sent, and its CSRF token."""

    def __init__(self, user: int, socket: aiohttp.ClientWebSocketResponse, csrf: str) -> None:
        self.user = user
        self.socket = socket
        self.csrf = csrf
        self.live = asyncio.Event()
        # message text -> when its message_added reached this page (recipients' copies)
        self.received: dict[str, float] = {}
        self.arrived = asyncio.Event()
        # send key -> future of its "sent" answer
        self.answers: dict[str, asyncio.Future[float]] = {}

    async def read(self) -> None:
        async for frame in self.socket:
            now = time.perf_counter()
            message = orjson.loads(frame.data)
            kind = message["type"]
            if kind == "resync":
                self.live.set()
            elif kind == "event" and message["event"] == "message_added":
                if message["message"]["sender"] != self.user:
                    self.received[message["message"]["text"]] = now
                    self.arrived.set()
            elif kind in ("sent", "error"):
                answer = self.answers.pop(message.get("key", ""), None)
                if answer is not None and not answer.done():
                    if kind == "error":
                        answer.set_exception(RuntimeError(message["message"]))
                    else:
                        answer.set_result(now)

    async def send(self, to: int, text: str, key: str) -> asyncio.Future[float]:
        answer: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.answers[key] = answer
        request = {"type": "send", "to": [to], "text": text, "key": key, "csrf": self.csrf}
        await self.socket.send_str(orjson.dumps(request).decode())
        return answer


async def _open_pages(http: aiohttp.ClientSession, web: str, key: str, users: int) -> list[Page]:
    from pyserver.app.auth import make_user_token
    from pyserver.web.sessions import SESSION_COOKIE, SessionKeeper

    keeper = SessionKeeper(key)
    expiry = int(time.time()) + 3600
    gate = asyncio.Semaphore(50)

    async def open_page(user: int) -> Page:
        async with gate:
            token = make_user_token(user, expiry, key)
            async with http.get(f"{web}/login?token={token}", allow_redirects=False) as answer:
                assert answer.status == 303, await answer.text()
                cookie = answer.cookies[SESSION_COOKIE].value
            session = keeper.read(cookie)
            assert session is not None
            socket = await http.ws_connect(
                f"{web}/live", headers={"Cookie": f"{SESSION_COOKIE}={cookie}"}
            )
            return Page(user, socket, session.csrf)

    return list(await asyncio.gather(*(open_page(user) for user in range(1, users + 1))))


async def _latency(pages: list[Page], samples: int) -> list[float]:
    half = len(pages) // 2
    latencies = []
    for n in range(samples):
        i = random.randrange(half)
        sender, recipient = pages[i], pages[i + half]
        text = f"latency {n}"
        recipient.arrived.clear()
        started = time.perf_counter()
        await sender.send(recipient.user, text, f"lat{n}")
        while text not in recipient.received:
            await asyncio.wait_for(recipient.arrived.wait(), 10)
            recipient.arrived.clear()
        latencies.append((recipient.received[text] - started) * 1000)
        await asyncio.sleep(0.002)
    return latencies


async def _delivery_rate(pages: list[Page], each: int) -> float:
    half = len(pages) // 2
    expected = [(pages[i + half], f"flood {i} {k}") for i in range(half) for k in range(each)]
    started = time.perf_counter()

    async def sender(i: int) -> None:
        for k in range(each):
            answer = await pages[i].send(pages[i + half].user, f"flood {i} {k}", f"fl{i}.{k}")
            await answer

    await asyncio.gather(*(sender(i) for i in range(half)))
    deadline = time.monotonic() + 60
    while not all(text in page.received for page, text in expected):
        if time.monotonic() > deadline:
            raise RuntimeError("bench: flood messages were not all delivered in 60 s")
        await asyncio.sleep(0.005)
    last = max(page.received[text] for page, text in expected)
    return len(expected) / (last - started)


async def _web_round(pages: list[Page], count: int, tag: str) -> float:
    """Seconds per message, WIDTH pages sending at once, each waiting for its `sent`."""
    half = len(pages) // 2
    numbers = itertools.count()

    async def worker(i: int) -> None:
        while (n := next(numbers)) < count:
            answer = await pages[i].send(pages[i + half].user, f"{tag} {n}", f"{tag}.{n}")
            await answer

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(WIDTH)))
    return (time.perf_counter() - started) / count


async def _direct_round(client: Any, users: int, count: int, tag: str) -> float:
    half = users // 2
    numbers = itertools.count()

    async def worker(i: int) -> None:
        while (n := next(numbers)) < count:
            await client.send(i + 1, [i + 1 + half], f"{tag} {n}", key=f"{tag}.{n}")

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(WIDTH)))
    return (time.perf_counter() - started) / count


def _cpu_s(pid: int) -> float:
    """CPU seconds (user and system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(
    server_port: int, web_port: int, key: str, pids: dict[str, int], quick: bool
) -> dict[str, Any]:
    from pyserver.client import Client

    users = 100 if quick else USERS
    web = f"http://127.0.0.1:{web_port}"
    connector = aiohttp.TCPConnector(limit=0)
    jar = aiohttp.DummyCookieJar()
    async with aiohttp.ClientSession(connector=connector, cookie_jar=jar) as http:
        pages = await _open_pages(http, web, key, users)
        readers = [asyncio.create_task(page.read()) for page in pages]
        try:
            await asyncio.wait_for(asyncio.gather(*(p.live.wait() for p in pages)), 60)
            client = await Client.connect("127.0.0.1", server_port, service_key=key)
            try:
                # warm up: every user's image in the cache, the code paths hot
                await _web_round(pages, 200, "warm-web")
                await _direct_round(client, users, 200, "warm-direct")
                latencies = await _latency(pages, 50 if quick else LATENCY_SAMPLES)
                delivered = await _delivery_rate(pages, 2 if quick else MESSAGES_EACH)
                best_web = best_direct = float("inf")
                count = 200 if quick else ROUND_MESSAGES
                rounds = 1 if quick else ROUNDS
                web_cpu = cell_cpu = 0.0
                for r in range(rounds):
                    before = _cpu_s(pids["web"])
                    best_web = min(best_web, await _web_round(pages, count, f"web{r}"))
                    web_cpu += _cpu_s(pids["web"]) - before
                    before = _cpu_s(pids["cell"])
                    best_direct = min(
                        best_direct, await _direct_round(client, users, count, f"direct{r}")
                    )
                    cell_cpu += _cpu_s(pids["cell"]) - before
            finally:
                await client.close()
        finally:
            for page in pages:
                await page.socket.close()
            for reader in readers:
                reader.cancel()
    latencies.sort()
    return {
        "pages_connected": users,
        "chat_p50_ms": round(statistics.median(latencies), 2),
        "chat_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 2),
        "chat_samples": len(latencies),
        "delivered_per_s": round(delivered, 1),
        "web_send_us": round(best_web * 1e6, 1),
        "direct_send_us": round(best_direct * 1e6, 1),
        "web_vs_direct_send": round(best_web / best_direct, 2),
        # CPU of the web process per message sent through it, of the app server per
        # direct SEND (which also sends its events to the web tier's subscriptions)
        "web_cpu_us_per_message": round(web_cpu / (rounds * count) * 1e6, 1),
        "server_cpu_us_per_send": round(cell_cpu / (rounds * count) * 1e6, 1),
        "in_flight": WIDTH,
    }


def _more_files() -> None:
    """Thousands of sockets on both sides: raise the open-file limit (the children inherit)."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65_536 if hard == resource.RLIM_INFINITY else min(hard, 65_536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def run(quick: bool = False) -> dict[str, Any]:
    from pyserver.app.loop import new_event_loop

    _more_files()
    with _cell_and_web() as (server_port, web_port, key, pids):
        loop = new_event_loop()
        try:
            measured = _measure(server_port, web_port, key, pids, quick)
            return {"web": loop.run_until_complete(measured)}
        finally:
            loop.close()
