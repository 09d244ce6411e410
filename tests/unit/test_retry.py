"""The one retry helper: doubling pauses, bounded by attempts or by a window that starts at the first failure."""

from __future__ import annotations

import time

from meddpm.retry import Backoff


def test_pauses_double_up_to_the_cap_for_the_attempts_given():
    assert list(Backoff(first_s=1.0, max_s=4.0, attempts=5).pauses()) == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert list(Backoff(first_s=1.0, attempts=0).pauses()) == []


def test_the_window_ends_the_pauses():
    started = time.monotonic()
    pauses = Backoff(first_s=0.0, window_s=0.2).pauses()
    count = 0
    for _ in pauses:
        count += 1
        time.sleep(0.01)
    assert count >= 2 and time.monotonic() - started >= 0.2
