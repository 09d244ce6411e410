"""What happened to each mask of a run: operators record failures here instead of stopping the run."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator

from meddpm.errors import MedDDPMError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunReport:
    written: dict[str, str] = dataclasses.field(default_factory=dict)  # mask -> output folder
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # mask -> reason

    @contextlib.contextmanager
    def step(self, mask: str) -> Iterator[None]:
        """Run one operator's work on one mask; a failure is recorded and the run goes on."""
        try:
            yield
        except MedDDPMError as error:
            self.failed[mask] = str(error)
            log.error("%s: %s", mask, error)
        except Exception as error:  # a bug must not cost the other masks their results
            self.failed[mask] = f"internal error: {type(error).__name__}: {error}"
            log.exception("%s: internal error", mask)

    def summary(self) -> str:
        lines = [f"{len(self.written)} mask(s) synthesised, {len(self.failed)} failed"]
        lines += [f"  {mask}: {folder}" for mask, folder in self.written.items()]
        lines += [f"  FAILED {mask}: {reason}" for mask, reason in self.failed.items()]
        return "\n".join(lines)
