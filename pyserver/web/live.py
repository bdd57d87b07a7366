"""Live pages: each signed-in user's mailbox events, fanned out to their open pages.

Owns the web tier's side of SUBSCRIBE. However many pages (WebSockets) a user
has open on this web process, the process holds one subscription of that user
at the user's app server (`UserFeed`), started with the first page and closed
with the last. Each page is a `PageFeed`: a bounded queue its WebSocket writer
drains, so a slow browser never holds up the others; a page that falls that far
behind is told to reload its state (`resync`) instead of being sent the rest.

What a page receives (JSON objects, `type` first):

- `{"type": "event", ...}`: a SUBSCRIBE event as the app server sent it
  (`message_added` with the message, `marked_read`, `moved`, ...);
- `{"type": "counts", "folders": {...}}`: unread counts, after each event;
- `{"type": "resync"}`: from now on the page misses nothing, but it may have
  missed events before: it re-reads what it shows. Sent once the user's
  subscription is live (to a page that joins a live one, at once), again each
  time it is live again after it ended (an app server restarted or failed
  over), and to a page that fell behind. Messages carry their ids, so a page
  merging what it re-reads with what it has shows nothing twice.

When a subscription ends the feed subscribes again, with back-off, for as long
as pages are open; `ClusterClient` finds the user's new owner meanwhile. Calls
the `Viewer`'s subscribe and counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson

from pyserver.errors import PyserverError
from pyserver.web.viewer import Viewer

__all__ = ["LiveHub", "PageFeed"]

log = logging.getLogger(__name__)

# events that change unread counts (a `counts` update follows them)
_COUNTING = frozenset(
    {"message_added", "marked_read", "marked_unread", "moved", "message_deleted"}
    | {"thread_deleted", "folder_seen"}
)
_RESYNC = orjson.dumps({"type": "resync"})


def _changes_counts(event: dict[str, Any]) -> bool:
    """Whether an event may change unread counts (the sender's own copy of a message,
    already read, does not)."""
    if event.get("event") == "message_added":
        return bool((event.get("message") or {}).get("unread", True))
    return event.get("event") in _COUNTING


class PageFeed:
    """What one open page is sent: encoded messages, in order, bounded."""

    def __init__(self, limit: int) -> None:
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(limit)
        self.behind = False  # dropped messages: the next thing it gets is a resync

    def offer(self, message: bytes) -> None:
        if self.behind:
            return
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            # Too far behind: drop what is queued and ask the page to re-read instead.
            self.behind = True
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(_RESYNC)

    async def next(self) -> bytes:
        message = await self._queue.get()
        if message is _RESYNC:
            self.behind = False
        return message


class UserFeed:
    """One user's subscription, shared by that user's open pages."""

    def __init__(self, viewer: Viewer, backoff_max_s: float) -> None:
        self.viewer = viewer
        self.pages: set[PageFeed] = set()
        self._backoff_max_s = backoff_max_s
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()  # set while a subscription is live

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _broadcast(self, message: bytes) -> None:
        for page in self.pages:
            page.offer(message)

    async def _run(self) -> None:
        delay = 0.05
        while True:
            subscription = self.viewer.subscribe()
            try:
                await subscription.start()
                self.subscribed.set()
                delay = 0.05
                # From here on nothing is missed: the pages (re-)read what they show.
                self._broadcast(_RESYNC)
                async for event in subscription:
                    self._broadcast(orjson.dumps({"type": "event", **event}))
                    if _changes_counts(event):
                        await self._send_counts()
            except PyserverError as exc:
                log.info("live feed of user %d ended: %s", self.viewer.user, exc)
            except Exception:
                log.exception("live feed of user %d failed", self.viewer.user)
            finally:
                self.subscribed.clear()
                with contextlib.suppress(PyserverError):
                    await subscription.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff_max_s)

    async def _send_counts(self) -> None:
        try:
            folders = await self.viewer.counts()
        except PyserverError as exc:
            log.info("counts of user %d not read: %s", self.viewer.user, exc)
            return
        self._broadcast(orjson.dumps({"type": "counts", "folders": folders}))


class LiveHub:
    """The user feeds of one web process (see the module docstring)."""

    def __init__(self, *, page_queue: int = 256, backoff_max_s: float = 1.0) -> None:
        self._feeds: dict[int, UserFeed] = {}
        self._page_queue = page_queue
        self._backoff_max_s = backoff_max_s

    def open_page(self, viewer: Viewer) -> PageFeed:
        """A new page of `viewer`'s; the user's feed starts with their first page."""
        feed = self._feeds.get(viewer.user)
        if feed is None:
            feed = self._feeds[viewer.user] = UserFeed(viewer, self._backoff_max_s)
            feed.start()
        page = PageFeed(self._page_queue)
        feed.pages.add(page)
        if feed.subscribed.is_set():  # live already: the page reads its state now
            page.offer(_RESYNC)
        return page

    async def close_page(self, user: int, page: PageFeed) -> None:
        feed = self._feeds.get(user)
        if feed is None:
            return
        feed.pages.discard(page)
        if not feed.pages:
            del self._feeds[user]
            await feed.stop()

    async def close(self) -> None:
        feeds, self._feeds = list(self._feeds.values()), {}
        for feed in feeds:
            await feed.stop()
