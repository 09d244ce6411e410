"""Pauses between the tries of a call that may fail for a while (a server restarting, a busy PACS)."""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Iterator

from meddpm.errors import Interrupted


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Pauses that double from `first_s` up to `max_s`, while the tries stay within `window_s` seconds of the first
    pause and number at most `attempts` retries (None: no such bound)."""

    first_s: float = 0.25
    max_s: float = math.inf
    window_s: float | None = None
    attempts: int | None = None

    def pauses(self) -> Iterator[float]:
        """The pause before each retry; exhausted when the window or the attempts are spent (give up then). The
        window's clock starts at the first pause, i.e. at the first failure."""
        started = time.monotonic()
        pause, retries = self.first_s, 0
        while self.attempts is None or retries < self.attempts:
            if self.window_s is not None and time.monotonic() - started >= self.window_s:
                return
            yield pause
            retries += 1
            pause = min(2 * pause, self.max_s)


def wait(seconds: float, stop: threading.Event | None, what: str) -> None:
    """Sleep `seconds`; when `stop` is set (Ctrl-C, SIGTERM), raise Interrupted at once, saying `what` it ended."""
    if stop is None:
        time.sleep(seconds)
    elif stop.wait(seconds):
        raise Interrupted(f"stopped by Ctrl-C or SIGTERM while {what}")
