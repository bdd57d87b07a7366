"""The SMS gateway as a service of a cluster: app servers hand it the copies to text.

In a cluster the SMSC sessions live in one place, the `pyserver sms` process (an
operator grants an account a few binds, not one per app server). An app server
whose outbox has a phone to text sends SMS_SUBMIT with the outbox's mail dict to
that process (`RemoteSmsSender`); the process texts it through its sessions
(`SmsSender`, which also remembers the ids for receipts and the conversation for
replies) and answers each phone's outcome, which the app server settles in the
user's log as it does in a single cell. A gateway that cannot be reached answers
`retry` for every phone: the outbox tries again later.
"""

from __future__ import annotations

import ssl
from collections import Counter
from collections.abc import Callable
from typing import Any

from pyserver.errors import BadRequest, PyserverError
from pyserver.servicekey import ServiceKey
from pyserver.servicelink import ServiceLink
from pyserver.wire.ops import Op

__all__ = ["RemoteSmsSender", "SmsService"]

Send = Callable[[dict[str, Any]], Any]
_MAIL_FIELDS = ("user", "message_id", "thread_id", "addresses", "text")


class SmsService:
    """SMS_SUBMIT on the wire shell, answered by a sender (`SmsSender.send`)."""

    def __init__(self, send: Send, stats: Callable[[], dict[str, Any]]) -> None:
        self._send = send
        self._stats = stats
        self.requests: Counter[str] = Counter()

    async def execute(self, op: Op, payload: dict[str, Any]) -> dict[str, Any]:
        if op != Op.SMS_SUBMIT:
            raise BadRequest(f"{op.name}: the SMS gateway answers SMS_SUBMIT only")
        missing = [name for name in _MAIL_FIELDS if name not in payload]
        if missing or not isinstance(payload["addresses"], list):
            raise BadRequest(f"SMS_SUBMIT: missing {', '.join(missing) or 'addresses'}")
        phones = [a for a in payload["addresses"] if isinstance(a, str) and a.startswith("+")]
        self.requests["SMS_SUBMIT"] += 1
        outcomes = await self._send({**payload, "addresses": phones})
        return {"outcomes": {phone: list(outcome) for phone, outcome in outcomes.items()}}

    def subscribe(self, user_id: int, callback: Callable[[dict[str, Any]], None]) -> Any:
        raise BadRequest("SUBSCRIBE: the SMS gateway has no mailboxes to watch")

    def unsubscribe(self, token: Any) -> None:
        return None

    def stats(self) -> dict[str, Any]:
        return {"requests": dict(self.requests), **self._stats()}


class RemoteSmsSender:
    """An app server's sender for phones: SMS_SUBMIT to the cluster's SMS gateway."""

    def __init__(
        self,
        host: str,
        port: int,
        service_key: ServiceKey,
        timeout_s: float = 30.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._link = ServiceLink(
            host, port, service_key, name="SMS gateway", request_timeout_s=timeout_s, tls=tls
        )

    async def send(self, mail: dict[str, Any]) -> dict[str, tuple[str, str]]:
        payload = {key: mail[key] for key in mail if key != "attachments"}
        try:
            reply = await self._link.request(Op.SMS_SUBMIT, payload)
        except PyserverError as error:
            return dict.fromkeys(mail["addresses"], ("retry", f"SMS gateway: {error}"))
        return {phone: (str(o[0]), str(o[1])) for phone, o in reply["outcomes"].items()}

    async def close(self) -> None:
        await self._link.close()
