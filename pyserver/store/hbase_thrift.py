"""One connection to an HBase Thrift gateway on asyncio, encoded by thriftpy2's compiled protocol.

Owns the bytes between the store and the gateway. aiohappybase's client (thriftpy2's
`contrib.aio`) encodes and decodes in pure Python and awaits the socket for every
field it reads; this one encodes a call with thriftpy2's Cython binary protocol
(`TCyBinaryProtocol`) into one buffer, writes it at once, and decodes the reply in
one pass once its bytes are in:

1. `ThriftClient.<method>(*args)` builds the method's argument struct and encodes
   the call message;
2. the reply's bytes collect in the connection's `asyncio.Protocol`; each time more
   arrive, the reply is checked for completeness by skipping over it (the protocol's
   own `skip`, compiled: no objects built) and, once whole, decoded into the
   method's result struct;
3. the result's value is returned, or the exception the gateway declared (HBase's
   `IOError`, `IllegalArgument`...) or a `TApplicationException` is raised.

A connection speaks one service: `THRIFT1` (the Thrift1 gateway's `Hbase`, whose IDL
aiohappybase loads) or `THRIFT2` (the Thrift2 gateway's `THBaseService`, from the
subset of its IDL in `hbase2.thrift` beside this module).

The gateway's buffered transport answers a connection's calls one at a time, so a
connection carries one call at a time: a second concurrent call is refused
(`RuntimeError`). A connection that failed, or whose call was abandoned, must be
closed (`pyserver.store.hbase_pool` does so).

`PROTOCOL` says which encoder is in use: "cython", or "pure" when thriftpy2's
compiled modules are missing or `PYSERVER_PURE` is set (same bytes, slower).

May import: thriftpy2, `Hbase_thrift` (through aiohappybase), pyserver.implementation.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohappybase  # noqa: F401  (loads the Hbase_thrift module below)
import thriftpy2
from Hbase_thrift import Hbase
from thriftpy2.protocol.binary import TBinaryProtocol
from thriftpy2.thrift import TApplicationException, TMessageType, TType, args_to_kwargs
from thriftpy2.transport import TTransportException
from thriftpy2.transport.buffered import TBufferedTransport
from thriftpy2.transport.memory import TMemoryBuffer

from pyserver.implementation import PURE_FORCED

__all__ = ["PROTOCOL", "THRIFT1", "THRIFT2", "ThriftClient", "connect", "thrift2_types"]

# The two gateways' services: Thrift1's `Hbase`, Thrift2's `THBaseService`.
THRIFT1: Any = Hbase
_THRIFT2_MODULE: Any = thriftpy2.load(
    str(Path(__file__).with_name("hbase2.thrift")), module_name="pyserver_hbase2_thrift"
)
THRIFT2: Any = _THRIFT2_MODULE.THBaseService


def thrift2_types() -> Any:
    """The Thrift2 IDL's module: its structs (`TPut`, `TColumnValue`, ...) and exceptions."""
    return _THRIFT2_MODULE


_Protocol: Any = TBinaryProtocol
_Buffered: Any = TBufferedTransport
_Memory: Any = TMemoryBuffer
PROTOCOL = "pure"
if not PURE_FORCED:
    try:
        from thriftpy2.protocol.cybin import TCyBinaryProtocol
        from thriftpy2.transport.buffered.cybuffered import TCyBufferedTransport
        from thriftpy2.transport.memory.cymemory import TCyMemoryBuffer
    except ImportError:  # thriftpy2 built without its extensions: the pure protocol
        pass
    else:
        _Protocol, _Buffered, _Memory = TCyBinaryProtocol, TCyBufferedTransport, TCyMemoryBuffer
        PROTOCOL = "cython"

# A reply at least this big is checked for completeness (skipped over) before decoding.
_SKIP_FIRST_BYTES = 64 << 10


class _Incomplete(Exception):
    """The reply's bytes run out before its end: wait for more."""


class _Feed:
    """The bytes received so far, as the transport a decoder reads; `_Incomplete` past them."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def read(self, size: int) -> bytes:
        if self._at >= len(self._data):
            raise _Incomplete()
        chunk = self._data[self._at : self._at + size]
        self._at += len(chunk)
        return chunk

    def is_open(self) -> bool:
        return True


def _reader(data: bytes) -> Any:
    return _Protocol(_Buffered(_Feed(data)), decode_response=False)


def _whole(data: bytes) -> bool:
    """Whether `data` holds a whole reply message (walked over, nothing built)."""
    protocol = _reader(data)
    try:
        protocol.read_message_begin()
        protocol.skip(TType.STRUCT)
    except _Incomplete:
        return False
    return True


def decode_reply(data: bytes, result_type: type) -> tuple[int, int, Any]:
    """(message type, seqid, result struct or TApplicationException) of one reply message.

    Raises `_Incomplete` when `data` ends before the message does.
    """
    protocol = _reader(data)
    _, kind, seqid = protocol.read_message_begin()
    result = TApplicationException() if kind == TMessageType.EXCEPTION else result_type()
    protocol.read_struct(result)
    return kind, seqid, result


def encode_call(method: str, seqid: int, args: Any) -> bytes:
    """The bytes of one call message."""
    buffer = _Memory()
    protocol = _Protocol(buffer)
    protocol.write_message_begin(method, TMessageType.CALL, seqid)
    protocol.write_struct(args)
    protocol.write_message_end()
    return buffer.getvalue()


@functools.cache
def _method(service: Any, name: str) -> tuple[type, type]:
    """(argument struct, result struct) of one method of a gateway's service."""
    if name not in service.thrift_services:
        raise AttributeError(f"the HBase gateway's {service.__name__} has no method {name!r}")
    return getattr(service, f"{name}_args"), getattr(service, f"{name}_result")


def _outcome(result: Any) -> Any:
    """A reply's value, or the exception it carries (as thriftpy2's own client reads it)."""
    if getattr(result, "success", None) is not None:
        return result.success
    for name, value in vars(result).items():
        if name != "success" and value is not None:
            raise value
    if hasattr(result, "success"):
        raise TApplicationException(TApplicationException.MISSING_RESULT)
    return None


class _Wire(asyncio.Protocol):
    """The socket side: collects a reply's bytes and hands the decoded reply to its waiter."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, int, Any]] | None = None
        self._result_type: type = type(None)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  (uvloop's is no subclass)

    def expect(self, result_type: type) -> asyncio.Future[tuple[int, int, Any]]:
        self._buffer.clear()
        self._result_type = result_type
        self._waiter = asyncio.get_running_loop().create_future()
        return self._waiter

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            self._fail(TTransportException(message="the gateway sent bytes no call asked for"))
            return
        self._buffer += data
        raw = bytes(self._buffer)
        if len(raw) >= _SKIP_FIRST_BYTES and not _whole(raw):
            return
        try:
            reply = decode_reply(raw, self._result_type)
        except _Incomplete:
            return
        except Exception as exc:  # bytes that are no reply: this connection is done
            self._fail(exc)
            return
        self._buffer.clear()
        self._waiter = None
        waiter.set_result(reply)

    def eof_received(self) -> bool:
        self._fail(TTransportException(TTransportException.END_OF_FILE, "the gateway hung up"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(TTransportException(TTransportException.END_OF_FILE, f"connection lost: {exc}"))

    def _fail(self, exc: BaseException) -> None:
        self.closed = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


class ThriftClient:
    """The gateway's methods as coroutines: `await client.checkAndPut(table, row, ...)`.

    One call at a time; `socket_timeout_s` bounds each call as a backstop (the
    caller's deadline is meant to come first). `service`: `THRIFT1` or `THRIFT2`.
    """

    def __init__(self, wire: _Wire, socket_timeout_s: float, service: Any = THRIFT1) -> None:
        self._wire = wire
        self._timeout_s = socket_timeout_s
        self._service = service
        self._seqid = 0

    @property
    def closed(self) -> bool:
        """True once the connection failed or the gateway closed it."""
        return self._wire.closed

    def __getattr__(self, name: str) -> Callable[..., Any]:
        _method(self._service, name)  # AttributeError for what the gateway does not have
        bound = self.__dict__[name] = functools.partial(self.call, name)  # found directly next time
        return bound

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call one gateway method; its result, or the exception it answered with."""
        args_type, result_type = _method(self._service, method)
        wire = self._wire
        if wire.closed or wire.transport is None:
            raise TTransportException(TTransportException.NOT_OPEN, "the connection is closed")
        if wire._waiter is not None:
            raise RuntimeError("one call at a time on a Thrift connection")
        try:
            fields = args_to_kwargs(args_type.thrift_spec, *args, **kwargs)
        except ValueError as exc:
            raise TypeError(f"{method}: missing argument {exc.args[0]}") from None
        self._seqid = (self._seqid + 1) & 0x7FFFFFFF
        message = encode_call(method, self._seqid, args_type(**fields))
        reply = wire.expect(result_type)
        wire.transport.write(message)
        timer = asyncio.get_running_loop().call_later(self._timeout_s, self._expire, reply)
        try:
            kind, seqid, result = await reply
        finally:
            timer.cancel()
        if seqid != self._seqid:
            self.close()
            raise TApplicationException(
                TApplicationException.BAD_SEQUENCE_ID, f"{method}: reply to another call"
            )
        if kind == TMessageType.EXCEPTION:
            raise result
        return _outcome(result)

    def _expire(self, reply: asyncio.Future[Any]) -> None:
        if not reply.done():
            self._wire._fail(
                TTransportException(TTransportException.TIMED_OUT, "the gateway did not answer")
            )

    def close(self) -> None:
        self._wire._fail(TTransportException(TTransportException.NOT_OPEN, "closed"))
        if self._wire.transport is not None:
            self._wire.transport.close()


async def connect(
    host: str, port: int, socket_timeout_s: float, service: Any = THRIFT1
) -> ThriftClient:
    """A client of `service` on a new connection to the gateway at host:port."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(socket_timeout_s):
        _, wire = await loop.create_connection(_Wire, host, port)
    return ThriftClient(wire, socket_timeout_s, service)
