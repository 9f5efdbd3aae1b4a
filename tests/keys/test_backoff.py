"""The gate before unwraps: its windows, its probe, and what opens or shuts it."""

from __future__ import annotations

import pytest

from tenantvault.errors import DecryptionError, KeyProviderError, KeyProviderUnavailable
from tenantvault.keys.backoff import ProviderBackoff


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def _fail(gate: ProviderBackoff, error: Exception) -> None:
    with pytest.raises(type(error)), gate.call("unwrap a data key"):
        raise error


def _admitted(gate: ProviderBackoff) -> bool:
    try:
        with gate.call("unwrap a data key"):
            return True
    except KeyProviderUnavailable:
        return False


def test_windows_double_per_failure_in_a_row_within_their_upper_half_and_are_capped() -> None:
    clock = Clock()
    gate = ProviderBackoff(initial_seconds=1.0, max_seconds=5.0, clock=clock, jitter=lambda: 0.0)
    windows = []
    for _ in range(5):
        _fail(gate, KeyProviderUnavailable("down"))
        windows.append(gate._retry_at - clock.now)
        clock.now = gate._retry_at  # the probe is let through, and fails
    assert windows == [0.5, 1.0, 2.0, 2.5, 2.5]  # half of 1, 2, 4, 5, 5: the lowest jitter


def test_within_the_window_calls_fail_at_once_then_one_probe_goes_through() -> None:
    clock = Clock()
    gate = ProviderBackoff(initial_seconds=2.0, clock=clock, jitter=lambda: 0.999)
    _fail(gate, KeyProviderUnavailable("could not unwrap: transit at https://v:8200 is down"))
    clock.now += 1.0
    with pytest.raises(KeyProviderUnavailable) as refused, gate.call("unwrap a data key"):
        pytest.fail("no call within the window")
    assert str(refused.value) == (
        "could not unwrap a data key: the key provider (transit) failed 1.0s ago (1 in a row), "
        "so keys not cached fail at once until its backoff ends; next try in 1.0s. It failed "
        "with: could not unwrap: transit at https://v:8200 is down"
    )
    clock.now += 1.0
    with (
        gate.call("unwrap a data key"),  # the probe
        pytest.raises(KeyProviderUnavailable, match="a retry is under way"),
        gate.call("unwrap a data key"),
    ):
        pytest.fail("no second call while the probe is out")
    # The probe was answered: the gate is open to every call.
    assert _admitted(gate)
    assert _admitted(gate)


def test_a_ciphertext_that_does_not_open_is_an_answer_and_other_errors_teach_nothing() -> None:
    clock = Clock()
    gate = ProviderBackoff(clock=clock)
    _fail(gate, DecryptionError("cannot unwrap data key"))
    assert _admitted(gate)

    _fail(gate, KeyProviderUnavailable("down"))
    clock.now += 30
    _fail(gate, KeyProviderError("key provider returned a data key of the wrong length"))
    assert gate._failures == 1  # no answer, no new failure: the next caller probes
    _fail(gate, DecryptionError("cannot unwrap data key"))  # that probe is answered
    assert _admitted(gate)


def test_a_cancelled_probe_hands_the_probe_to_the_next_caller() -> None:
    clock = Clock()
    gate = ProviderBackoff(clock=clock)
    _fail(gate, KeyProviderUnavailable("down"))
    clock.now += 30
    with pytest.raises(KeyboardInterrupt), gate.call("unwrap a data key"):
        raise KeyboardInterrupt
    assert _admitted(gate)


def test_calls_already_out_when_vault_failed_count_as_one_failure() -> None:
    clock = Clock()
    gate = ProviderBackoff(initial_seconds=1.0, clock=clock, jitter=lambda: 0.999)
    first, second = gate.call("unwrap a data key"), gate.call("unwrap a data key")
    first.__enter__()
    second.__enter__()
    down = KeyProviderUnavailable("down")
    # Both fail with the same outage (False: the error goes on to their callers).
    assert first.__exit__(KeyProviderUnavailable, down, None) is False
    assert second.__exit__(KeyProviderUnavailable, down, None) is False
    assert gate._failures == 1
    assert gate._retry_at - clock.now == pytest.approx(0.9995)


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="initial_seconds"):
        ProviderBackoff(initial_seconds=5, max_seconds=1)
