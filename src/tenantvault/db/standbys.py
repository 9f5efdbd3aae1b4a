"""Loads from hot standbys: which server may serve a hot-path read now.

With ``TENANTVAULT_READ_DATABASE_URLS`` the load hot path's one statement (held
connections, autocommit) goes to a PostgreSQL streaming replica when one is known
to be current enough, and to the primary otherwise. Everything else (writes, the
full path after a key-cache miss, calls joined to a caller's session) stays on
the primary. A standby holds what the primary held: the same rows, the same
ciphertext, the same row-level security.

When a standby may serve, decided without a round trip on the load itself:

- **Read your writes.** A commit of this process (a vault call's own transaction,
  read-only ones too, or a caller's session it joined) is counted when it returns. Until the
  primary's WAL position has been read after the last counted commit, and a
  standby has replayed up to it, loads read the primary. Reading that position
  after the commit is what makes it cover the commit: the insert position is at
  or past the end of every record already inserted, the commit's included.
- **Bounded lag.** Every probe reads the primary's WAL position (time t) and each
  standby's replay position. A standby that has replayed what the primary had at
  t holds every commit made before t; it serves while that t is less than
  ``TENANTVAULT_READ_MAX_LAG_MS`` ago. This needs no clock on the servers and no
  replay timestamps (an idle primary commits nothing, and is still current).
- **Probes are amortised.** One caller probes at a time, when the last probe is a
  quarter of the lag bound old or a commit was counted since; the others meanwhile
  use what is known (or the primary). A probe is two round trips plus one per
  standby; a load between probes is one statement, as without standbys.
- **Down means skipped.** A standby whose probe or statement fails is skipped (the
  load is read from the primary instead, so no load fails for it) and probed again
  after a backoff that doubles up to 30 s. A server that is not in recovery (a
  promoted standby) is never read: it no longer follows the primary.

Commits of other processes are seen within the lag bound, never sooner.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import sqlalchemy as sa

from tenantvault.db.held import AsyncHeldConnections, HeldConnections, Row

# The primary's WAL insert position as a byte count. A position just past a page
# header (24 bytes; 40 at a segment's first page) means the same as the page's start,
# which is where a standby that replayed everything before it reports itself: without
# this an idle primary would look ahead of its standbys for good.
PRIMARY_POSITION = (
    "SELECT p - CASE WHEN mod(p, s) = 40 THEN 40 WHEN mod(p, b) = 24 THEN 24 ELSE 0 END "
    "FROM (SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8 AS p, "
    "pg_size_bytes(current_setting('wal_segment_size')) AS s, "
    "current_setting('wal_block_size')::int8 AS b) AS wal"
)
# A standby's replay position, as a byte count; NULL on a server not in recovery.
STANDBY_POSITION = (
    "SELECT CASE WHEN pg_is_in_recovery() THEN (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8 END"
)

BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0


@dataclass
class _Standby:
    replayed: int = -1  # its replay position at its last probe
    current_since: float = float("-inf")  # it holds every commit made before this
    down_until: float = 0.0
    backoff: float = 0.0


class StandbyRouting:
    """What is known of the standbys, and which one may serve a load now; thread-safe.

    Holds no connection: :class:`StandbyReads` and :class:`AsyncStandbyReads` do the
    I/O its probes ask for."""

    def __init__(
        self,
        standbys: int,
        *,
        max_lag_ms: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if standbys < 1:
            raise ValueError("standbys must be at least 1")
        if max_lag_ms < 1:
            raise ValueError("max_lag_ms must be at least 1")
        self.max_lag = max_lag_ms / 1000
        self.probe_every = self.max_lag / 4
        self._clock = clock
        self._lock = threading.Lock()
        self._standbys = [_Standby() for _ in range(standbys)]
        # The primary's positions at past probes (time, position), newest last: what a
        # standby that is behind the newest one is known to hold.
        self._samples: deque[tuple[float, int]] = deque()
        self._commits = 0  # commits of this process counted so far
        self._commits_covered = 0  # those the position in ``_required`` covers
        self._required = 0
        self._next_probe = 0.0
        self._probing = False
        self._turn = 0

    def __repr__(self) -> str:
        return f"StandbyRouting(standbys={len(self._standbys)}, max_lag={self.max_lag}s)"

    def committed(self) -> None:
        """A transaction of this process committed (call after the commit returned)."""
        with self._lock:
            self._commits += 1

    def probe_due(self) -> tuple[int, float] | None:
        """None, or (the commits counted, the time) when the caller is to probe now:
        it then reads the primary's position, each standby's, and calls :meth:`probed`."""
        now = self._clock()
        if self._probing or (now < self._next_probe and self._commits == self._commits_covered):
            return None
        with self._lock:
            if self._probing:
                return None
            self._probing = True
            return self._commits, now

    def probing(self, index: int) -> bool:
        """Whether the probe is to ask standby ``index`` (not while it is backed off)."""
        return self._clock() >= self._standbys[index].down_until

    def probed(
        self,
        due: tuple[int, float],
        primary: int | None,
        standbys: dict[int, int | None],
    ) -> None:
        """A probe's answers: the primary's position (None: it did not answer, or the
        probe was interrupted) and the asked standbys' by index (None: it did not
        answer, or is not in recovery)."""
        commits, started = due
        with self._lock:
            try:
                if primary is None:
                    return  # nothing new is known; loads read the primary meanwhile
                if commits > self._commits_covered:
                    # Read after this process's newest commits: a standby must have it.
                    # Only then: other processes' commits need only the lag bound.
                    self._required = max(self._required, primary)
                    self._commits_covered = commits
                self._samples.append((started, primary))
                while self._samples and self._samples[0][0] < started - self.max_lag:
                    self._samples.popleft()
                for index, answer in standbys.items():
                    self._learn(self._standbys[index], answer)
            finally:
                self._probing = False
                self._next_probe = self._clock() + self.probe_every

    def _learn(self, standby: _Standby, answer: int | None) -> None:
        if answer is None:
            self._down(standby)
            return
        standby.replayed = answer
        standby.backoff = 0.0
        for moment, position in reversed(self._samples):
            if position <= answer:
                standby.current_since = max(standby.current_since, moment)
                break

    def failed(self, index: int) -> None:
        """Standby ``index`` failed a load's statement: skipped until probed again."""
        with self._lock:
            self._down(self._standbys[index])

    def _down(self, standby: _Standby) -> None:
        standby.backoff = min(max(standby.backoff * 2, BACKOFF_FIRST_SECONDS), BACKOFF_MAX_SECONDS)
        standby.down_until = self._clock() + standby.backoff
        standby.current_since = float("-inf")

    def pick(self) -> int | None:
        """The standby that serves the next load, or None: the primary does."""
        if self._commits != self._commits_covered:
            return None  # a commit of this process whose position is not known yet
        oldest = self._clock() - self.max_lag
        count = len(self._standbys)
        self._turn = turn = (self._turn + 1) % count
        for step in range(count):
            index = (turn + step) % count
            standby = self._standbys[index]
            if standby.current_since >= oldest and standby.replayed >= self._required:
                return index
        return None


def _position(row: Row | None) -> int | None:
    return None if row is None or row[0] is None else int(row[0])


class StandbyReads:
    """``Vault``'s hot-path reads: a standby's held connections when one may serve,
    the primary's otherwise; the same ``fetch_one`` as :class:`HeldConnections`."""

    def __init__(
        self,
        primary: HeldConnections,
        standbys: Sequence[HeldConnections],
        routing: StandbyRouting,
        engines: Sequence[sa.Engine] = (),
    ) -> None:
        self._primary = primary
        self._standbys = list(standbys)
        self._engines = list(engines)
        self.routing = routing

    def __repr__(self) -> str:
        return f"StandbyReads(standbys={len(self._standbys)})"

    def fetch_one(self, statement: str, params: tuple[Any, ...]) -> Row | None:
        """The first row of ``statement``, from a standby that may serve, or the primary.

        Raises:
            psycopg.Error: the primary's statement or connection failed.
        """
        index = self.standby()
        if index is not None:
            try:
                return self._standbys[index].fetch_one(statement, params)
            except psycopg.Error:
                self.routing.failed(index)  # this load reads the primary instead
        return self._primary.fetch_one(statement, params)

    def standby(self) -> int | None:
        """The standby that may serve a read now (probing first when one is due)."""
        due = self.routing.probe_due()
        if due is not None:
            self._probe(due)
        return self.routing.pick()

    @contextlib.contextmanager
    def read_transaction(self, primary: sa.Engine) -> Iterator[sa.Connection]:
        """A read-only transaction on a standby that may serve (its engine's), or on
        ``primary`` when none may, or the standby does not connect."""
        index = self.standby()
        if index is not None and index < len(self._engines):
            try:
                connection = self._engines[index].connect()
            except sa.exc.DBAPIError:
                self.routing.failed(index)
            else:
                with connection, connection.begin():
                    yield connection
                return
        with primary.begin() as connection:
            yield connection

    def _probe(self, due: tuple[int, float]) -> None:
        primary: int | None = None
        answers: dict[int, int | None] = {}
        try:
            primary = _position(self._primary.fetch_one(PRIMARY_POSITION, ()))
            for index, held in enumerate(self._standbys):
                if self.routing.probing(index):
                    try:
                        answers[index] = _position(held.fetch_one(STANDBY_POSITION, ()))
                    except psycopg.Error:
                        answers[index] = None
        except psycopg.Error:
            primary = None  # loads read the primary (and fail there, as without standbys)
        finally:  # also when interrupted: the next caller probes again
            self.routing.probed(due, primary, answers)

    def close(self) -> None:
        """Close the free held connections, the primary's and the standbys'."""
        self._primary.close()
        for held in self._standbys:
            held.close()
        for engine in self._engines:
            engine.dispose()


class AsyncStandbyReads:
    """``AsyncVault``'s hot-path reads, as :class:`StandbyReads` (probes awaited)."""

    def __init__(
        self,
        primary: AsyncHeldConnections,
        standbys: Sequence[AsyncHeldConnections],
        routing: StandbyRouting,
    ) -> None:
        self._primary = primary
        self._standbys = list(standbys)
        self.routing = routing

    def __repr__(self) -> str:
        return f"AsyncStandbyReads(standbys={len(self._standbys)})"

    async def fetch_one(self, statement: str, params: tuple[Any, ...]) -> Row | None:
        """As :meth:`StandbyReads.fetch_one`, awaited."""
        due = self.routing.probe_due()
        if due is not None:
            await self._probe(due)
        index = self.routing.pick()
        if index is not None:
            try:
                return await self._standbys[index].fetch_one(statement, params)
            except psycopg.Error:
                self.routing.failed(index)
        return await self._primary.fetch_one(statement, params)

    async def _probe(self, due: tuple[int, float]) -> None:
        primary: int | None = None
        answers: dict[int, int | None] = {}
        try:
            primary = _position(await self._primary.fetch_one(PRIMARY_POSITION, ()))
            for index, held in enumerate(self._standbys):
                if self.routing.probing(index):
                    try:
                        answers[index] = _position(await held.fetch_one(STANDBY_POSITION, ()))
                    except psycopg.Error:
                        answers[index] = None
        except psycopg.Error:
            primary = None
        finally:  # also when cancelled: the next caller probes again
            self.routing.probed(due, primary, answers)

    async def close(self) -> None:
        """Close the free held connections, the primary's and the standbys'."""
        await self._primary.close()
        for held in self._standbys:
            await held.close()
