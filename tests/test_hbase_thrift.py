"""The Thrift1 client of the HBase store: the compiled protocol, whole replies, a cut gateway.

The bytes are checked against thriftpy2's pure binary protocol (the twins must
agree); calls run on the real gateway (`hbase_thrift` fixture), and through a
relay this test cuts and restores, so the shared gateway itself never stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohappybase  # noqa: F401  (loads the Hbase_thrift module below)
import pytest
from hbase_namespaces import drop_made, fresh_namespace, wait_for_drops
from Hbase_thrift import Hbase, IOError, Mutation, TCell, TRowResult
from thriftpy2.protocol.binary import TBinaryProtocol
from thriftpy2.thrift import TMessageType
from thriftpy2.transport.memory import TMemoryBuffer

from pyserver.implementation import PURE_FORCED
from pyserver.store import hbase_thrift as thrift_client
from pyserver.store.base import LogAppend, StoreUnavailable
from pyserver.store.hbase import HBaseStore
from pyserver.store.hbase_pool import ThriftPool
from pyserver.store.hbase_thrift import _Incomplete, decode_reply, encode_call
from tests.support.relay import Relay


@pytest.fixture(scope="module", autouse=True)
def _drop_hbase_tables() -> Iterator[None]:
    yield
    drop_made()
    wait_for_drops()


def _pure_bytes(write: Any) -> bytes:
    buffer = TMemoryBuffer()
    write(TBinaryProtocol(buffer))
    return buffer.getvalue()


def _reply(result: Any, seqid: int = 7) -> bytes:
    def write(protocol: Any) -> None:
        protocol.write_message_begin("getRowWithColumns", TMessageType.REPLY, seqid)
        protocol.write_struct(result)
        protocol.write_message_end()

    return _pure_bytes(write)


@contextlib.contextmanager
def pure_twin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The module's encoder and decoder switched to thriftpy2's pure classes."""
    from thriftpy2.transport.buffered import TBufferedTransport

    with monkeypatch.context() as patch:
        patch.setattr(thrift_client, "_Protocol", TBinaryProtocol)
        patch.setattr(thrift_client, "_Buffered", TBufferedTransport)
        patch.setattr(thrift_client, "_Memory", TMemoryBuffer)
        yield


def _a_big_row(cells: int, size: int) -> Any:
    columns = {
        b"m:%06d" % i: TCell(value=bytes([i % 251]) * size, timestamp=i) for i in range(cells)
    }
    return Hbase.getRowWithColumns_result(success=[TRowResult(row=b"\x01row", columns=columns)])


# ---- the protocol in use, and its bytes ----


@pytest.mark.skipif(PURE_FORCED, reason="PYSERVER_PURE chooses the pure protocol")
def test_the_compiled_protocol_is_in_use_when_thriftpy2_has_it() -> None:
    from thriftpy2.protocol.cybin import TCyBinaryProtocol

    assert thrift_client.PROTOCOL == "cython"
    assert thrift_client._Protocol is TCyBinaryProtocol


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("import os; os.environ['PYSERVER_PURE'] = '1'", "pure"),
        # thriftpy2 loaded, its compiled protocol then missing (as on PyPy)
        (
            "import sys, aiohappybase; sys.modules['thriftpy2.protocol.cybin'] = None",
            "pure",
        ),
    ],
    ids=["forced", "compiled-module-missing"],
)
def test_without_the_compiled_protocol_the_pure_one_is_used(setup: str, expected: str) -> None:
    code = (
        f"{setup}\n"
        "from pyserver.store import hbase_thrift\n"
        "print(hbase_thrift.PROTOCOL, hbase_thrift._Protocol.__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYSERVER_PURE"}
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [expected, "TBinaryProtocol"]


def test_a_call_is_the_bytes_the_pure_protocol_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    args = Hbase.checkAndPut_args(
        tableName=b"ns_users",
        row=b"\x07" + (7).to_bytes(8, "big"),
        column=b"l:last",
        value=bytes(range(256)),
        mput=Mutation(column=b"l:last", value=b"\x00\xff" * 500),
        attributes={},
    )

    def write(protocol: Any) -> None:
        protocol.write_message_begin("checkAndPut", TMessageType.CALL, 42)
        protocol.write_struct(args)
        protocol.write_message_end()

    expected = _pure_bytes(write)
    assert encode_call("checkAndPut", 42, args) == expected
    with pure_twin(monkeypatch):
        assert encode_call("checkAndPut", 42, args) == expected


@pytest.mark.parametrize("twin", ["chosen", "pure"])
def test_a_reply_decodes_once_it_is_whole(twin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _a_big_row(cells=40, size=30)
    raw = _reply(result)
    with pure_twin(monkeypatch) if twin == "pure" else contextlib.nullcontext():
        for cut in (0, 1, 4, 11, 12, len(raw) // 2, len(raw) - 1):
            with pytest.raises(_Incomplete):
                decode_reply(raw[:cut], Hbase.getRowWithColumns_result)
        kind, seqid, decoded = decode_reply(raw, Hbase.getRowWithColumns_result)
    assert (kind, seqid) == (TMessageType.REPLY, 7)
    assert decoded == result


class _Sink:
    """A stand-in transport for the protocol object: it records what is written or closed."""

    def __init__(self) -> None:
        self.closed = False

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_a_big_reply_in_small_pieces_is_decoded_once_at_its_end() -> None:
    async def body() -> None:
        result = _a_big_row(cells=300, size=1000)  # about 300 KB: checked by skipping first
        raw = _reply(result)
        wire = thrift_client._Wire()
        wire.connection_made(_Sink())  # type: ignore[arg-type]
        waiter = wire.expect(Hbase.getRowWithColumns_result)
        for start in range(0, len(raw), 1000):
            assert not waiter.done()
            wire.data_received(raw[start : start + 1000])
        assert waiter.done()
        assert waiter.result()[2] == result

    asyncio.run(body())


def test_bytes_that_are_no_reply_close_the_connection() -> None:
    async def body() -> None:
        sink = _Sink()
        wire = thrift_client._Wire()
        wire.connection_made(sink)  # type: ignore[arg-type]
        wire.data_received(b"\x00\x00\x00\x05hello")  # nothing was asked
        assert wire.closed and sink.closed
        wire = thrift_client._Wire()
        wire.connection_made(_Sink())  # type: ignore[arg-type]
        waiter = wire.expect(Hbase.getRowWithColumns_result)
        wire.data_received(b"\x80\x01\x00\x02" + b"\xff" * 16)  # a name of -1 bytes
        assert wire.closed
        with pytest.raises(Exception):  # noqa: B017 (whatever thriftpy2 makes of the bytes)
            waiter.result()

    asyncio.run(body())


# ---- on the real gateway ----


def test_calls_answer_and_the_gateway_s_exceptions_are_raised(
    hbase_thrift: tuple[str, int],
) -> None:
    async def body() -> None:
        client = await thrift_client.connect(*hbase_thrift, socket_timeout_s=30)
        try:
            assert isinstance(await client.getTableNames(), list)
            with pytest.raises(IOError):
                await client.getColumnDescriptors(b"pyserver_no_such_table_at_all")
            assert not client.closed  # a declared exception leaves the connection usable
            assert isinstance(await client.getTableNames(), list)
            with pytest.raises(AttributeError):
                client.noSuchMethod  # noqa: B018
        finally:
            client.close()
        assert client.closed

    asyncio.run(body())


@contextlib.asynccontextmanager
async def relayed_store(target: tuple[str, int]) -> AsyncIterator[tuple[HBaseStore, Relay]]:
    relay = Relay(target)
    await relay.start()
    namespace = fresh_namespace(*target)
    store = HBaseStore("127.0.0.1", relay.port, namespace=namespace, timeout_s=5, pool_size=4)
    await store.open()
    try:
        yield store, relay
    finally:
        await store.close()
        with contextlib.suppress(Exception):
            await relay.cut()


def test_the_store_rides_out_a_cut_gateway_connection(hbase_thrift: tuple[str, int]) -> None:
    async def body() -> None:
        async with relayed_store(hbase_thrift) as (store, relay):
            for seq in range(5):
                await store.append(
                    LogAppend(1, seq, [b"%d" % (seq + 1)], messages={f"m{seq}": b"x"})
                )
            await relay.cut()
            for call in (
                lambda: store.append(LogAppend(1, 5, [b"lost"])),
                lambda: store.read_log(1),
                lambda: store.last_seq(1),
            ):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await call()
                assert time.monotonic() - started < 6
            await relay.start()  # the same port again
            # The same store object, never reopened: its first call already succeeds.
            assert [s for s, _ in await store.read_log(1)] == [1, 2, 3, 4, 5]
            await store.append(LogAppend(1, 5, [b"6"]))
            assert await store.last_seq(1) == 6
            assert await store.get_messages(1, ["m0", "m4"]) == {"m0": b"x", "m4": b"x"}

    asyncio.run(body())


def test_a_pool_connection_is_one_call_at_a_time(hbase_thrift: tuple[str, int]) -> None:
    async def body() -> None:
        pool = ThriftPool(*hbase_thrift, size=1, socket_timeout_s=30)
        try:
            async with pool.borrow() as connection:
                client = connection.client
                assert client is not None
                first = asyncio.ensure_future(client.getTableNames())
                await asyncio.sleep(0)
                with pytest.raises(RuntimeError):
                    await client.getTableNames()
                assert isinstance(await first, list)
        finally:
            pool.close()

    asyncio.run(body())
