"""Which server serves a load (tenantvault.db.standbys.StandbyRouting), on a clock the
tests move: the standby only while it holds this process's commits and every commit
older than the lag bound; the primary otherwise."""

from __future__ import annotations

import pytest

from tenantvault.db.standbys import (
    PRIMARY_POSITION,
    STANDBY_POSITION,
    StandbyReads,
    StandbyRouting,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def routing(clock: Clock, standbys: int = 1) -> StandbyRouting:
    return StandbyRouting(standbys, max_lag_ms=1000, clock=clock)


def probe(r: StandbyRouting, primary: int | None, **answers: int | None) -> None:
    due = r.probe_due()
    assert due is not None
    r.probed(due, primary, {int(k[1:]): v for k, v in answers.items()})


def test_nothing_is_read_from_a_standby_before_a_probe() -> None:
    assert routing(Clock()).pick() is None


def test_a_standby_that_replayed_the_primarys_position_serves_until_the_lag_bound() -> None:
    clock = Clock()
    r = routing(clock)
    probe(r, 500, s0=500)
    assert r.pick() == 0
    assert r.probe_due() is None  # between probes, no round trip
    clock.now += 0.99
    assert r.pick() == 0
    clock.now += 0.02  # its last known state is now older than the bound
    assert r.pick() is None


def test_a_commit_of_this_process_sends_loads_to_the_primary_until_the_standby_has_it() -> None:
    clock = Clock()
    r = routing(clock)
    probe(r, 500, s0=500)
    r.committed()
    assert r.pick() is None  # its position is not known yet
    probe(r, 700, s0=600)  # read after the commit: the standby has not replayed it
    assert r.pick() is None
    clock.now += 0.3
    probe(r, 700, s0=700)
    assert r.pick() == 0


def test_a_standby_behind_the_newest_position_is_as_current_as_the_sample_it_replayed() -> None:
    clock = Clock()
    r = routing(clock)
    probe(r, 500, s0=500)
    clock.now += 0.5
    probe(r, 900, s0=600)  # holds what the primary had at 100.0, not at 100.5
    assert r.pick() == 0
    clock.now += 0.6  # 1.1 s after 100.0
    assert r.pick() is None


def test_a_failed_or_promoted_standby_is_skipped_and_probed_again_after_a_backoff() -> None:
    clock = Clock()
    r = routing(clock)
    probe(r, 500, s0=500)
    r.failed(0)
    assert r.pick() is None
    assert not r.probing(0)
    clock.now += 1.0
    assert r.probing(0)
    probe(r, 500, s0=None)  # not in recovery: never read
    assert r.pick() is None
    clock.now += 1.5
    assert not r.probing(0)  # the backoff doubled
    clock.now += 0.5
    probe(r, 500, s0=500)
    assert r.pick() == 0


def test_a_primary_that_does_not_answer_teaches_nothing_and_lets_the_next_caller_probe() -> None:
    clock = Clock()
    r = routing(clock)
    r.committed()
    probe(r, None)
    assert r.pick() is None
    assert r.probe_due() is not None  # the commit is still not covered


def test_loads_take_turns_among_current_standbys() -> None:
    r = routing(Clock(), standbys=2)
    probe(r, 500, s0=500, s1=500)
    assert {r.pick() for _ in range(4)} == {0, 1}


def test_one_caller_probes_at_a_time() -> None:
    r = routing(Clock())
    assert r.probe_due() is not None
    assert r.probe_due() is None


@pytest.mark.parametrize(("standbys", "lag"), [(0, 1000), (1, 0)])
def test_bounds_are_checked(standbys: int, lag: int) -> None:
    with pytest.raises(ValueError, match="must be at least 1"):
        StandbyRouting(standbys, max_lag_ms=lag)


class Held:
    """A server's held connections, as StandbyReads uses them: it answers the position
    statements with ``position`` and counts every statement."""

    def __init__(self, position: int | None) -> None:
        self.position = position
        self.statements: list[str] = []

    def fetch_one(self, statement: str, params: tuple[object, ...]) -> tuple[object, ...]:
        self.statements.append(statement)
        if statement in (PRIMARY_POSITION, STANDBY_POSITION):
            return (self.position,)
        return ("row",)


def test_loads_between_probes_are_one_statement_each_on_the_standby() -> None:
    clock = Clock()
    primary, standby = Held(500), Held(500)
    reads = StandbyReads(primary, [standby], routing(clock))  # type: ignore[list-item,arg-type]
    for _ in range(100):
        assert reads.fetch_one("load", ()) == ("row",)
    assert primary.statements == [PRIMARY_POSITION]  # one probe for the lot
    assert standby.statements == [STANDBY_POSITION] + ["load"] * 100
    reads.routing.committed()
    primary.position = 600
    reads.fetch_one("load", ())  # probes again: the standby has not replayed 600
    assert primary.statements[-2:] == [PRIMARY_POSITION, "load"]
