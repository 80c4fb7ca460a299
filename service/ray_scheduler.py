"""One generation of tickets over a pool of Ray actors, with the fault policy.

The policy (DESIGN.md §6), all of it here so it can be read in one place:

* **Sticky placement.** Pair ``i`` goes to actor ``i mod n``. PES keeps an
  inner problem per pair inside the actor that ran it, so without faults every
  pair meets its own state again and a Ray run equals an in-process run.
* **Idempotent tickets, re-issued.** A ticket's result depends only on
  (θ, ticket), so when an actor dies its unfinished tickets go to the least
  loaded live actor (``pairs_reissued``); whichever copy answers first wins.
  A ticket that was in flight on ``max_attempts`` dying actors is dropped (it
  probably kills workers).
* **Poisoned tickets.** When a call raises inside the actor, its tickets are
  split into single-ticket calls; a single ticket that raises is answered
  ``Status.ERROR`` (dropped whole), the rest of the generation goes on.
* **Closing a generation.** When every pair is in; or, once ``deadline_s`` has
  passed, as soon as ``min_fraction`` of the pairs are in; missing pairs are
  answered ``Status.ERROR``. Optional ``straggler_s``: a call running longer
  than that is duplicated on an idle actor.
* **Stale results.** Calls still running when their generation closed are kept;
  their answers, and any answer whose generation differs, are discarded and
  counted (``stale_results``).

A pair is always used whole or dropped whole: a result carries both halves.

Example (needs a running Ray; see ``service.ray_backend`` for the real setup):
    >>> sched = TicketScheduler(actors, SchedulePolicy())          # doctest: +SKIP
    >>> results = sched.run(0, ray.put(theta), tickets)             # doctest: +SKIP
    >>> sched.stats["pairs_reissued"], sched.stats["workers_alive"] # doctest: +SKIP
    (0, 2)
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

from mnemosyne_core.meta.protocol import PairResult, Status, Ticket
from workers.wire import pack_tickets

__all__ = ["SchedulePolicy", "TicketScheduler", "dropped_result"]


@dataclasses.dataclass(frozen=True)
class SchedulePolicy:
    """When a generation closes and how hard to retry. Defaults: wait for every pair."""

    deadline_s: float | None = None
    min_fraction: float = 1.0
    straggler_s: float | None = None
    max_attempts: int = 3
    tickets_per_call: int | None = None  # None: all of an actor's tickets in one call

    def __post_init__(self) -> None:
        if not 0.0 < self.min_fraction <= 1.0:
            raise ValueError(f"min_fraction must be in (0, 1], got {self.min_fraction}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be ≥ 1, got {self.max_attempts}")


def dropped_result(ticket: Ticket, worker_id: int = 0) -> PairResult:
    """The answer for a pair that is dropped whole (raised, timed out, killed workers)."""
    nan = float("nan")
    return PairResult(ticket.generation, ticket.pair_id, nan, nan, 0, Status.ERROR, worker_id)


@dataclasses.dataclass
class _Call:
    actor: int
    generation: int
    tickets: list[Ticket]
    started: float
    duplicated: bool = False


class TicketScheduler:
    """Runs generations on ``actors`` (handles of :class:`workers.InnerLoopWorker`).

    ``respawn(index)`` makes a fresh actor when one has used up its restarts.
    ``clock`` is injectable so the deadline logic is testable without sleeping.
    """

    def __init__(self, actors: Sequence[Any], policy: SchedulePolicy,
                 respawn: Callable[[int], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.actors = list(actors)
        self.policy = policy
        self.respawn = respawn
        self.clock = clock
        self.alive = [True] * len(self.actors)
        self._pings: dict[Any, int] = {}  # ping ref -> actor index (actor coming back?)
        self._orphans: dict[Any, _Call] = {}  # calls still running after their generation closed
        self.totals: dict[str, int] = defaultdict(int)
        self.stats: dict[str, Any] = {}
        # Called as after_submit(generation) once the first calls of a generation are out;
        # fault-injection tests use it to kill a worker while it is busy.
        self.after_submit: Callable[[int], None] | None = None

    # -- one generation -------------------------------------------------
    def run(self, generation: int, theta_ref: Any, tickets: Sequence[Ticket]) -> list[PairResult]:
        t0 = self.clock()
        if not tickets:
            self.stats = {"pairs_reissued": 0, "stale_results": 0, "workers_alive": sum(self.alive)}
            return []
        stats = {"pairs_reissued": 0, "stale_results": 0, "pairs_failed": 0, "pairs_timed_out": 0,
                     "worker_deaths": 0, "result_bytes": 0}
        todo = {t.pair_id: t for t in tickets}
        if len(todo) != len(tickets):
            raise ValueError("tickets of one generation must have distinct pair ids")
        done: dict[int, PairResult] = {}
        deaths: dict[int, int] = defaultdict(int)
        inflight: dict[Any, _Call] = {}
        queues: dict[int, list[list[Ticket]]] = defaultdict(list)
        for actor, chunk in self._place(list(tickets)):
            queues[actor].append(chunk)
        need = max(1, math.ceil(self.policy.min_fraction * len(tickets))) if tickets else 0

        def submit(actor: int, chunk: list[Ticket]) -> None:
            ref = self.actors[actor].evaluate.remote(theta_ref, _wire(chunk))
            inflight[ref] = _Call(actor, generation, chunk, self.clock())

        def requeue(chunk: list[Ticket], avoid: int | None) -> None:
            live = [i for i in range(len(self.actors)) if self.alive[i] and i != avoid]
            if not live:  # everyone is down: wait for the original actor to come back
                live = [avoid] if avoid is not None else list(range(len(self.actors)))
            busy = {i: len(queues[i]) + sum(c.actor == i for c in inflight.values()) for i in live}
            queues[min(live, key=lambda i: (busy[i], i))].append(chunk)

        first_round = True
        while len(done) < len(todo):
            for actor in range(len(self.actors)):
                if not queues[actor]:
                    continue
                if not self.alive[actor]:
                    if any(self.alive):  # don't wait for a restart while others are idle
                        moved, queues[actor] = queues[actor], []
                        for chunk in moved:
                            requeue(chunk, actor)
                    continue
                if not any(c.actor == actor for c in inflight.values()):
                    chunk = [t for t in queues[actor].pop(0) if t.pair_id not in done]
                    if chunk:
                        submit(actor, chunk)
            if first_round:
                first_round = False
                if self.after_submit is not None:
                    self.after_submit(generation)
            now = self.clock()
            if (self.policy.deadline_s is not None and now - t0 >= self.policy.deadline_s
                    and len(done) >= need):
                break
            waiting = list(inflight) + list(self._orphans) + list(self._pings)
            if not waiting:
                if any(queues.values()) and any(self.alive):
                    continue
                break  # nothing runs and nothing can run: the rest is lost
            ready, _ = ray.wait(waiting, num_returns=1, timeout=self._timeout(t0, inflight, queues))
            for ref in ready:
                if ref in self._pings:
                    self._ping_answered(ref)
                elif ref in self._orphans:
                    stats["stale_results"] += self._drain_orphan(ref)
                else:
                    self._answered(ref, inflight.pop(ref), generation, todo, done, deaths, stats,
                                   requeue, queues)
            if not ready:
                self._maybe_duplicate(inflight, queues, stats)

        for ticket in todo.values():
            if ticket.pair_id not in done:
                stats["pairs_timed_out"] += 1
                done[ticket.pair_id] = dropped_result(ticket)
        self._orphans.update(inflight)  # still running: their answers will be stale
        if self._orphans:  # count the ones that already answered now, not a generation late
            ready, _ = ray.wait(list(self._orphans), num_returns=len(self._orphans), timeout=0)
            for ref in ready:
                stats["stale_results"] += self._drain_orphan(ref)
        for k, v in stats.items():
            self.totals[k] += v
        stats["workers_alive"] = sum(self.alive)
        stats["workers"] = len(self.actors)
        stats["unique_workers"] = len({r.worker_id for r in done.values() if r.status.usable})
        stats["ray_wait_seconds"] = self.clock() - t0
        self.stats = stats
        return [done[t.pair_id] for t in tickets]

    # -- helpers ----------------------------------------------------------
    def _place(self, tickets: list[Ticket]) -> list[tuple[int, list[Ticket]]]:
        per_actor: dict[int, list[Ticket]] = defaultdict(list)
        for t in tickets:
            per_actor[t.pair_id % len(self.actors)].append(t)
        size = self.policy.tickets_per_call
        out = []
        for actor, ts in sorted(per_actor.items()):
            step = size or len(ts)
            out += [(actor, ts[i:i + step]) for i in range(0, len(ts), step)]
        return out

    def _idle(self, inflight: dict[Any, _Call], queues) -> list[int]:
        return [i for i in range(len(self.actors)) if self.alive[i] and not queues[i]
                and not any(c.actor == i for c in inflight.values())]

    def _timeout(self, t0: float, inflight: dict[Any, _Call], queues) -> float | None:
        waits = []
        now = self.clock()
        if self.policy.deadline_s is not None and now < t0 + self.policy.deadline_s:
            waits.append(t0 + self.policy.deadline_s - now)
        # Wake up for a straggler only if someone could take its work; otherwise the next
        # answer (which frees an actor) is what we wait for anyway.
        if self.policy.straggler_s is not None and self._idle(inflight, queues):
            started = [c.started for c in inflight.values() if not c.duplicated]
            if started:
                waits.append(max(0.0, min(started) + self.policy.straggler_s - now))
        return min(waits) + 1e-3 if waits else None

    def _answered(self, ref, call: _Call, generation, todo, done, deaths, stats, requeue, queues) -> None:
        try:
            blobs = ray.get(ref)
        except (RayActorError, WorkerCrashedError):
            stats["worker_deaths"] += 1
            self._mark_down(call.actor)
            rest = [t for t in call.tickets if t.pair_id not in done]
            for t in rest:
                deaths[t.pair_id] += 1
            lethal = [t for t in rest if deaths[t.pair_id] >= self.policy.max_attempts]
            for t in lethal:
                stats["pairs_failed"] += 1
                done[t.pair_id] = dropped_result(t, call.actor)
            rest = [t for t in rest if t.pair_id not in done]
            if rest:
                stats["pairs_reissued"] += len(rest)
                requeue(rest, call.actor)
            return
        except RayTaskError:
            rest = [t for t in call.tickets if t.pair_id not in done]
            if len(rest) == 1:
                stats["pairs_failed"] += 1
                done[rest[0].pair_id] = dropped_result(rest[0], call.actor)
            else:  # isolate the poisoned ticket: one call per ticket, same actor
                queues[call.actor][:0] = [[t] for t in rest]
            return
        for blob in blobs:
            stats["result_bytes"] += len(blob)
            result = PairResult.decode(blob)
            if result.generation != generation or result.pair_id not in todo:
                stats["stale_results"] += 1
            elif result.pair_id not in done:
                done[result.pair_id] = result
                if result.status == Status.ERROR:
                    stats["pairs_failed"] += 1

    def _maybe_duplicate(self, inflight: dict[Any, _Call], queues, stats) -> None:
        if self.policy.straggler_s is None:
            return
        now = self.clock()
        idle = self._idle(inflight, queues)
        for call in sorted(inflight.values(), key=lambda c: c.started):
            if not idle:
                return
            if not call.duplicated and now - call.started >= self.policy.straggler_s:
                call.duplicated = True
                stats["pairs_reissued"] += len(call.tickets)
                queues[idle.pop(0)].append(list(call.tickets))

    def _mark_down(self, actor: int) -> None:
        if not self.alive[actor]:
            return
        self.alive[actor] = False
        # Ray restarts the actor (max_restarts); a ping that Ray retries until the
        # restart is done tells us when it is back (or fails if it is gone for good).
        self._pings[self.actors[actor].ping.options(max_task_retries=-1).remote()] = actor

    def _ping_answered(self, ref) -> None:
        actor = self._pings.pop(ref)
        try:
            ray.get(ref)
        except (RayActorError, WorkerCrashedError):
            if self.respawn is None:
                return  # stays down for good
            self.actors[actor] = self.respawn(actor)
            self.totals["workers_replaced"] += 1
            self._pings[self.actors[actor].ping.options(max_task_retries=-1).remote()] = actor
            return
        self.alive[actor] = True

    def _drain_orphan(self, ref) -> int:
        call = self._orphans.pop(ref)
        try:
            return len(ray.get(ref))
        except (RayActorError, WorkerCrashedError):
            self._mark_down(call.actor)
        except RayTaskError:
            pass
        return 0


def _wire(tickets: list[Ticket]) -> bytes | list[Ticket]:
    # Tickets go out as one compact blob per call (26 B per ticket + each task spec once);
    # tickets that do not share a run key (never produced by our estimators) go as objects.
    try:
        return pack_tickets(tickets)
    except ValueError:
        return tickets
