"""Who a mail speaks for: a registered user, only when the mail proves it.

A mail whose From address is registered to a user becomes that user's message
(sender = the user, in the conversation of the same people on every channel)
only if it carries a valid DKIM signature *aligned* with the From domain: the
signature's `d=` is the From address's domain or a parent of it (DMARC's
relaxed alignment). dkimpy checks the signatures; its DNS lookups go through
`dns` (name -> TXT record bytes, or None), so a deployment uses the system's
resolver (dnspython) and the tests serve their keys without a network. A mail
that claims a registered address without such a signature stays a message from
outside, marked unverified.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import dkim

__all__ = ["DnsLookup", "SenderProof", "check_dkim", "from_domain"]

log = logging.getLogger(__name__)

# name (b"selector._domainkey.example.org.") -> the TXT record, or None
DnsLookup = Callable[..., bytes | None]

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_SIGNATURE = re.compile(rb"^dkim-signature\s*:", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True, slots=True)
class SenderProof:
    """The outcome of checking a mail's signatures against its From domain."""

    verified: bool
    # "dkim:<d= domain>" when verified; else why not, for the message's `extra`
    detail: str


def from_domain(address: str) -> str:
    """The domain of an address, lower case, without a trailing dot ("" if there is none)."""
    _, at, domain = address.strip().rpartition("@")
    return domain.strip().rstrip(".").lower() if at else ""


def _aligned(signing_domain: str, author_domain: str) -> bool:
    signing = signing_domain.rstrip(".").lower()
    return bool(signing) and (author_domain == signing or author_domain.endswith("." + signing))


def _check(raw: bytes, author_domain: str, dns: DnsLookup | None) -> SenderProof:
    end = _HEADER_END.search(raw)
    headers = raw[: end.start()] if end else raw
    count = len(_SIGNATURE.findall(headers))
    if count == 0:
        return SenderProof(False, "no DKIM signature")
    reasons = []
    for index in range(count):
        checker = dkim.DKIM(raw)
        try:
            valid = (
                checker.verify(idx=index, dnsfunc=dns)
                if dns is not None
                else checker.verify(idx=index)
            )
        except dkim.DKIMException as error:
            reasons.append(f"signature {index + 1}: {error}")
            continue
        except Exception as error:  # a resolver failure or a malformed key record
            reasons.append(f"signature {index + 1}: {type(error).__name__}: {error}")
            continue
        domain = (checker.domain or b"").decode("ascii", "replace")
        if not valid:
            reasons.append(f"signature {index + 1} ({domain}): does not verify")
        elif not _aligned(domain, author_domain):
            reasons.append(f"signature {index + 1}: d={domain} is not aligned with the From")
        else:
            return SenderProof(True, f"dkim:{domain.rstrip('.').lower()}")
    return SenderProof(False, "; ".join(reasons)[:500])


async def check_dkim(raw: bytes, from_address: str, dns: DnsLookup | None = None) -> SenderProof:
    """Whether a valid DKIM signature aligned with `from_address`'s domain signs `raw`.

    Runs on a worker thread: the lookups block and the body hash is over the whole
    message.
    """
    author_domain = from_domain(from_address)
    if not author_domain:
        return SenderProof(False, "the From address has no domain")
    return await asyncio.to_thread(_check, raw, author_domain, dns)
