"""What happened to each mask of a run: operators record failures here instead of stopping the run.

Two failures end the whole run instead: Ctrl-C / SIGTERM, and a Triton server that did not come back; the
masks not yet started are then reported as skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Iterator

from meddpm.errors import Interrupted, MedDDPMError, ServerError
from meddpm.names import printable

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunReport:
    written: dict[str, str] = dataclasses.field(default_factory=dict)  # mask -> output folder
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # mask -> reason
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)  # set: skip the masks left
    stopped_by: type[MedDDPMError] | None = None
    graph_started: threading.Event = dataclasses.field(default_factory=threading.Event)

    @contextlib.contextmanager
    def step(self, mask: str) -> Iterator[None]:
        """Run one operator's work on one mask; a failure is recorded and the run goes on."""
        try:
            yield
        except (Interrupted, ServerError) as error:
            self.failed[mask] = str(error)
            self.stopped_by = type(error)
            self.stop.set()
            log.error("%s: %s; the masks left are skipped", mask, error)
        except MedDDPMError as error:
            self.failed[mask] = str(error)
            log.error("%s: %s", mask, error)
        except Exception as error:  # a bug must not cost the other masks their results
            self.failed[mask] = f"internal error: {type(error).__name__}: {error}"
            log.exception("%s: internal error", mask)

    def summary(self) -> str:
        lines = [f"{len(self.written)} mask(s) synthesised, {len(self.failed)} failed"]
        lines += [f"  {mask}: {folder}" for mask, folder in self.written.items()]
        lines += [f"  FAILED {printable(mask)}: {printable(reason)}" for mask, reason in self.failed.items()]
        return "\n".join(lines)
