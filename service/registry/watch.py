"""Alias watchers that cost no thread: one asyncio task fans events out to all of them.

A ``WatchAlias`` stream is an ``async`` generator waiting on its own
:class:`asyncio.Queue`. One :class:`WatchHub` task per server wakes when any
alias changes (the registry calls :meth:`WatchHub.notify` from the writer's
thread) or every ``poll_s`` seconds (another server process may share the
database), reads the new events of *every* watched alias in one query, in
the thread pool, and puts each event into the queues of that alias's
watchers. Ten thousand idle watchers are ten thousand small objects, not ten
thousand threads, and a publish costs one query however many are watching.

Order: each watcher has a cursor (the last sequence it was given) and only
gets events after it, in id order, which per alias is commit order (see
:mod:`~service.registry.storage`). A watcher that cannot keep up (its queue
holds ``max_backlog`` events) is ended with RESOURCE_EXHAUSTED; it can resume
with ``after_sequence``. :meth:`WatchHub.close` (server shutdown) ends every
watch with UNAVAILABLE naming its last sequence.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

from .errors import ResourceExhausted, Unavailable
from .handlers import Registry
from .storage import AliasRecord

log = logging.getLogger(__name__)
_CLOSED = object()  # queue sentinel: the hub is shutting down


@dataclasses.dataclass(eq=False)
class _Watcher:
    key: tuple[str, str]
    last: int  # the last sequence queued for it
    queue: asyncio.Queue
    last_sent: int = 0  # the last sequence it yielded (named in the shutdown message)


class WatchHub:
    """Serves every watch of one server from the event loop it runs on.

    Args:
        registry: the registry whose alias events are followed.
        run_blocking: ``await run_blocking(fn, *args)`` runs ``fn`` in the server's thread pool.
        poll_s: re-read the database this often while anyone watches.
        max_backlog: events queued for one watcher before it is cut off as too slow.
    """

    START_CONCURRENCY = 4

    def __init__(self, registry: Registry, run_blocking: Callable[..., Any], *, poll_s: float = 1.0,
                 max_backlog: int = 10_000):
        self.registry = registry
        self._run = run_blocking
        self.poll_s = poll_s
        self.max_backlog = max_backlog
        self._watchers: dict[tuple[str, str], set[_Watcher]] = defaultdict(set)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self._starting: asyncio.Semaphore | None = None

    # -- lifecycle (on the loop) -------------------------------------------------
    def start(self) -> None:
        """Start the fan-out task; call from a coroutine on the server's loop."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        # A burst of new watches (a fleet reconnecting) reads the database a few at a time:
        # it neither stampedes the database nor grows the thread pool.
        self._starting = asyncio.Semaphore(self.START_CONCURRENCY)
        self._task = self._loop.create_task(self._fan_out(), name="registry-watch-hub")
        self.registry.subscribe(self.notify, self.close)

    def notify(self) -> None:
        """An alias changed (any thread): wake the fan-out task."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    def close(self) -> None:
        """End every watch with UNAVAILABLE (any thread)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._close_now)

    def _close_now(self) -> None:
        self._closed = True
        for watchers in self._watchers.values():
            for w in watchers:
                w.queue.put_nowait(_CLOSED)
        if self._task is not None:
            self._task.cancel()

    @property
    def watcher_count(self) -> int:
        return sum(len(ws) for ws in self._watchers.values())

    # -- one watch -----------------------------------------------------------------
    async def watch(self, name: str, alias: str, after_sequence: int = 0) -> AsyncIterator[AliasRecord]:
        """The events of one ``WatchAlias`` call (see :meth:`Registry.watch_start`)."""
        if self._closed or self.registry.closed:
            raise Unavailable("registry server is shutting down; watch again on another instance or after "
                              "its restart")
        async with self._starting:
            first, last = await self._run(self.registry.watch_start, name, alias, after_sequence)
        # Registered before the first event goes out: once a client holds it, moves reach it.
        watcher = _Watcher((name, alias), last, asyncio.Queue(), last)
        self._watchers[watcher.key].add(watcher)
        self._wake.set()  # catch up on anything committed since watch_start read the alias
        try:
            if self._closed:  # closed while this watch was starting: it got no sentinel
                raise self.registry.shutdown_error(name, alias, watcher.last_sent)
            for event in first:
                yield event
            while True:
                event = await watcher.queue.get()
                if event is _CLOSED:
                    raise self.registry.shutdown_error(name, alias, watcher.last_sent)
                if isinstance(event, Exception):  # cut off as too slow
                    raise event
                watcher.last_sent = event.sequence
                yield event
        finally:
            self._forget(watcher)

    # -- the fan-out task ------------------------------------------------------------
    async def _fan_out(self) -> None:
        while not self._closed:
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s if self._watchers else None)
            except TimeoutError:
                pass
            self._wake.clear()
            if not self._watchers:
                continue
            # Deliver only to the watchers the query's cursors were computed from: one that
            # registers while it runs may be behind them, and gets its events next round.
            snapshot = {key: list(ws) for key, ws in self._watchers.items()}
            cursors = {key: min(w.last for w in ws) for key, ws in snapshot.items()}
            try:
                events = await self._run(self.registry.store.alias_events_since, cursors)
            except asyncio.CancelledError:
                raise
            except Exception:  # a database hiccup: try again at the next wake-up
                log.exception("registry: reading alias events for watchers failed")
                await asyncio.sleep(min(self.poll_s, 1.0))
                self._wake.set()
                continue
            for event in events:
                current = self._watchers.get((event.name, event.alias), ())
                for w in snapshot.get((event.name, event.alias), ()):
                    if w not in current or event.sequence <= w.last:
                        continue
                    if w.queue.qsize() >= self.max_backlog:
                        self._cut_off(w)
                        continue
                    w.last = event.sequence
                    w.queue.put_nowait(event)

    def _forget(self, w: _Watcher) -> None:
        watchers = self._watchers.get(w.key)
        if watchers is not None:
            watchers.discard(w)
            if not watchers:
                del self._watchers[w.key]

    def _cut_off(self, w: _Watcher) -> None:
        self._forget(w)
        w.queue.put_nowait(ResourceExhausted(
            f"watch of {w.key[0]}@{w.key[1]} fell {self.max_backlog} events behind; "
            "resume with after_sequence set to the last sequence received"))
