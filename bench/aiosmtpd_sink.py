"""A bare aiosmtpd sink on uvloop, the ceiling of the MTA proxy's own library: it answers
250 to every mail and keeps nothing. `python -m bench.aiosmtpd_sink PORT` serves until
killed (bench mail starts one beside the cell)."""

from __future__ import annotations

import asyncio
import logging
import sys

import uvloop
from aiosmtpd.smtp import SMTP, Envelope, Session


class _Discard:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 OK"


async def _serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(_Discard(), data_size_limit=80 << 20, hostname="sink", loop=loop),
        "127.0.0.1",
        port,
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    uvloop.run(_serve(int(sys.argv[1])))
