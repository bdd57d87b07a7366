"""A load generator for the binary protocol, run as its own process by `bench server`.

`python -m bench.loadgen --port P --key K --op counts --conns 64 --pipeline 16 --seconds 3`
keeps `conns` connections each with `pipeline` requests in flight for the
given time and prints one JSON object: ops_per_s, p50_ms, p99_ms, errors.
Requests are encoded once up front (SEND gets a fresh key per request), so
the generator spends its time on the socket, not on building payloads.

`--op redis_get` drives a Redis server instead (RESP GET of one key holding a value of
`--value-bytes`), with the same connections, pipelining, timing and figures, so that
`bench server` compares the two servers through one client.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import ssl
import sys
import time
from collections import Counter, deque
from typing import Any

import orjson

from pyserver.app.loop import new_event_loop
from pyserver.wire.frame import KIND_ERROR, KIND_REQUEST, FrameDecoder, encode_frame
from pyserver.wire.ops import Op

_counter = itertools.count(1)
# The HELLO's request id: the per-request counter never gets this far.
_HELLO_ID = 0xFFFF_FFFF


def request_payload(op: str, args: argparse.Namespace) -> tuple[Op, bytes | None]:
    """The operation and its fixed payload (None: made per request, for SEND's unique keys)."""
    if op == "counts":
        return Op.COUNTS, orjson.dumps({"user": args.user})
    if op == "get_thread":
        return Op.GET_THREAD, orjson.dumps(
            {"user": args.user, "thread_id": args.thread, "limit": 20}
        )
    if op == "ping":
        return Op.PING, b"{}"
    if op == "send":
        return Op.SEND, None
    raise SystemExit(f"loadgen: unknown op {op}")


class _Connection(asyncio.Protocol):
    def __init__(self, run: _Run, sender: int) -> None:
        self.run = run
        # SENDs of one connection come from one user, so connections write to different logs
        self.sender = sender
        self.decoder = FrameDecoder(1 << 24)
        self.sent_at: dict[int, int] = {}
        self.transport: asyncio.Transport | None = None
        self.ready = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.decoder.feed(data)
        now = time.perf_counter_ns()
        run = self.run
        replies = 0
        for frame in self.decoder:
            started = self.sent_at.pop(frame.request_id)
            if frame.request_id == _HELLO_ID:
                if frame.kind == KIND_ERROR:
                    self.ready.set_exception(RuntimeError(frame.payload.decode()))
                else:
                    self.ready.set_result(None)
                continue
            replies += 1
            if frame.kind == KIND_ERROR:
                run.errors += 1
                run.error_codes[_error_code(frame.payload)] += 1
            if run.measuring:
                run.latencies.append(now - started)
        if replies and not run.stopping:
            # One write for all the requests that replace those just answered.
            self.transport.write(b"".join(self.request() for _ in range(replies)))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("connection lost"))

    def request(self) -> bytes:
        """The next request frame, its send time recorded."""
        run = self.run
        request_id = next(_counter)
        payload = run.payload
        if payload is None:  # SEND: a fresh idempotency key each time
            payload = orjson.dumps(
                {
                    "sender": self.sender,
                    "recipients": [self.sender + 1],
                    "text": "load test message",
                    "channel": "chat",
                    "key": f"lg-{run.started}-{request_id}",
                }
            )
        self.sent_at[request_id] = time.perf_counter_ns()
        return encode_frame(KIND_REQUEST, run.op, request_id, payload)


class _RespConnection(asyncio.Protocol):
    """The same load against Redis: GET of one key, in RESP, pipelined like the frames.

    Every reply is the same bulk string, so replies are counted by length and checked
    by one bytes comparison per batch: the client's cost per reply stays below the
    frame decoder's, and the ratio compares the servers.
    """

    def __init__(self, run: _Run, reply: bytes) -> None:
        self.run = run
        self.reply = reply
        self.pending = b""
        self.sent_at: deque[int] = deque()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        run = self.run
        self.pending += data
        replies = len(self.pending) // len(self.reply)
        if not replies:
            return
        done, self.pending = (
            self.pending[: replies * len(self.reply)],
            self.pending[replies * len(self.reply) :],
        )
        if done != self.reply * replies:
            run.errors += replies
        sent_at = self.sent_at
        for _ in range(replies):
            started = sent_at.popleft()
            if run.measuring:
                run.latencies.append(now - started)
        if not run.stopping:
            self.transport.write(run.payload * replies)  # type: ignore[operator]
            sent_at.extend([time.perf_counter_ns()] * replies)

    def send(self, count: int) -> None:
        self.transport.write(self.run.payload * count)  # type: ignore[operator, union-attr]
        self.sent_at.extend([time.perf_counter_ns()] * count)


class _Run:
    def __init__(self, op: Op, payload: bytes | None) -> None:
        self.op = op
        self.payload = payload
        self.latencies: list[int] = []
        self.errors = 0
        self.error_codes: Counter[str] = Counter()
        self.measuring = False
        self.stopping = False
        self.started = time.time_ns()


def _error_code(payload: bytes) -> str:
    """The code of an error reply (docs/protocol.md, "Errors"), or "?" if unreadable."""
    try:
        code = orjson.loads(payload).get("code")
    except (orjson.JSONDecodeError, AttributeError):
        return "?"
    return code if isinstance(code, str) else "?"


def _percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, int(q * len(sorted_values)))
    return sorted_values[index] / 1e6


async def generate_resp(args: argparse.Namespace) -> dict[str, Any]:
    """GET of one key on a Redis server, with the same connections, pipelining and timing."""
    loop = asyncio.get_running_loop()
    value = b"x" * args.value_bytes
    key = b"bench:counts"
    setter = _command(b"SET", key, value)
    reader, writer = await asyncio.open_connection(args.host, args.port)
    writer.write(setter)
    if await reader.readline() != b"+OK\r\n":
        raise SystemExit("loadgen: Redis did not accept SET")
    writer.close()
    run = _Run(Op.PING, _command(b"GET", key))
    reply = b"$%d\r\n%s\r\n" % (len(value), value)
    connections: list[_RespConnection] = []
    for _ in range(args.conns):
        _, conn = await loop.create_connection(
            lambda: _RespConnection(run, reply), args.host, args.port
        )
        connections.append(conn)
    return await _measure(args, run, lambda: [c.send(args.pipeline) for c in connections],
                          connections)  # fmt: skip


def _command(*parts: bytes) -> bytes:
    """One RESP command (an array of bulk strings)."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


async def _measure(
    args: argparse.Namespace, run: _Run, start: Any, connections: list[Any]
) -> dict[str, Any]:
    """Start the load, measure for `args.seconds` after the warm-up, stop: the figures."""
    start()
    await asyncio.sleep(args.warmup)
    run.measuring = True
    started = time.perf_counter()
    await asyncio.sleep(args.seconds)
    run.measuring = False
    elapsed = time.perf_counter() - started
    run.stopping = True
    await asyncio.sleep(0.2)
    for conn in connections:
        conn.transport.close()
    latencies = sorted(run.latencies)
    return {
        "op": args.op,
        "conns": args.conns,
        "pipeline": args.pipeline,
        "ops_per_s": round(len(latencies) / elapsed),
        "p50_ms": round(_percentile(latencies, 0.50), 3),
        "p99_ms": round(_percentile(latencies, 0.99), 3),
        "errors": run.errors,
        "error_codes": dict(run.error_codes),
    }


async def generate(args: argparse.Namespace) -> dict[str, Any]:
    if args.op == "redis_get":
        return await generate_resp(args)
    op, payload = request_payload(args.op, args)
    run = _Run(op, payload)
    loop = asyncio.get_running_loop()
    connections: list[_Connection] = []
    hello = orjson.dumps({"service_key": args.key})
    tls = None
    if args.tls_ca:  # TLS (mutual with a certificate): what the tiers of a TLS cell speak
        tls = ssl.create_default_context(cafile=args.tls_ca)
        if args.tls_cert:
            tls.load_cert_chain(args.tls_cert, args.tls_key)
    senders = [int(user) for user in args.senders.split(",")] if args.senders else []
    for index in range(args.conns):
        sender = senders[index % len(senders)] if senders else args.first_sender + 2 * index
        _, conn = await loop.create_connection(
            lambda sender=sender: _Connection(run, sender),
            args.host,
            args.port,
            ssl=tls,
            server_hostname=args.host if tls else None,
        )
        conn.sent_at[_HELLO_ID] = 0
        conn.transport.write(encode_frame(KIND_REQUEST, Op.HELLO, _HELLO_ID, hello))
        await conn.ready
        connections.append(conn)

    def start() -> None:
        for conn in connections:
            conn.transport.write(b"".join(conn.request() for _ in range(args.pipeline)))

    return await _measure(args, run, start, connections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", default="", help="service key (not for redis_get)")
    parser.add_argument(
        "--op", choices=("counts", "get_thread", "send", "ping", "redis_get"), required=True
    )
    parser.add_argument("--value-bytes", type=int, default=200, help="redis_get: the value's size")
    parser.add_argument("--user", type=int, default=2)
    parser.add_argument("--thread", default="")
    parser.add_argument("--first-sender", type=int, default=1_000_000, help="SEND: first sender")
    parser.add_argument("--senders", help="SEND: the connections' senders, 5,9,... (cycled)")
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--pipeline", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--tls-ca", help="speak TLS, trusting this CA (PEM)")
    parser.add_argument("--tls-cert", help="with --tls-ca: the client certificate (PEM)")
    parser.add_argument("--tls-key", help="with --tls-cert: its key (PEM)")
    args = parser.parse_args(argv)
    loop = new_event_loop()
    try:
        result = loop.run_until_complete(generate(args))
    finally:
        loop.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
