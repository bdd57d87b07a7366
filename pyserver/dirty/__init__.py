"""The memcache dirty service: no home page shows a stale unread count for long.

The web tier caches each user's COUNTS reply in memcached, in every data centre,
under `count_key(user)`. App servers report the users whose counts changed
(`pyserver.dirty.reporter`); the service (`pyserver.dirty.service`) deletes
those keys in every data centre and acknowledges the report; the web tier's
read (`pyserver.web.counts`) fills the keys again. This module owns what they
share: the key of a user's counts and the memcached client of a data centre.

May import: pyserver.errors, pyserver.userid, pyserver.addresses, pyserver.wire, pyserver.client,
pyserver.servicelink, pyserver.servicekey.
"""

from __future__ import annotations

import logging
from typing import Any

from pyserver.addresses import DataCentre

__all__ = ["COUNT_KEY_PREFIX", "count_key", "memcached_client"]

COUNT_KEY_PREFIX = b"pyserver:counts:"


def count_key(user_id: int) -> bytes:
    """The memcached key of a user's cached counts."""
    return COUNT_KEY_PREFIX + str(user_id).encode()


async def local_memcached(config: Any) -> Any:
    """The memcached client of this process's data centre (`local_dc`, else the first of
    `memcached_dcs`), for count reads; None without memcached."""
    centres = config.data_centres
    if not centres:
        return None
    local = config.local_dc or centres[0].name
    return await memcached_client(next(centre for centre in centres if centre.name == local))


async def memcached_client(centre: DataCentre, timeout_s: float = 0.5) -> Any:
    """An emcache client of one data centre's servers; every call times out after `timeout_s`.

    The service and the web tier build theirs here, so both spread keys over a
    data centre's servers the same way (emcache's rendezvous hashing).
    """
    import emcache

    # emcache logs each connection it opens at INFO: keep its warnings only.
    logging.getLogger("emcache").setLevel(max(logging.WARNING, logging.getLogger().level))
    addresses = [emcache.MemcachedHostAddress(host, port) for host, port in centre.servers]
    return await emcache.create_client(
        addresses,
        timeout=timeout_s,
        connection_timeout=timeout_s,
        max_connections=8,
        # A server that was down is tried again on its next use.
        purge_unhealthy_nodes=False,
    )
