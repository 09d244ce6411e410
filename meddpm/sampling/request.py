"""What one run of the sampling loop makes: the same request in process, as a Triton client and inside Triton."""

from __future__ import annotations

import dataclasses
import secrets

from meddpm.errors import ConfigurationError
from meddpm.model.presets import ScheduleConfig, Scheduler
from meddpm.sampling.schedulers import check_steps, default_steps

MAX_SEED = 2**63 - 1  # torch generators take 64 bits; the server-side loop passes a seed as a gRPC int64


@dataclasses.dataclass(frozen=True)
class SamplingRequest:
    """`samples` volumes by `scheduler` in `steps` UNet calls; sample i starts from the noise of seed `seed + i`,
    so a sample depends on its own seed only, whatever the batch it runs in."""

    scheduler: Scheduler
    steps: int
    seed: int
    samples: int = 1

    @classmethod
    def resolve(
        cls,
        schedule: ScheduleConfig,
        scheduler: Scheduler | None = None,
        steps: int | None = None,
        seed: int | None = None,
        samples: int = 1,
    ) -> SamplingRequest:
        """A checked request; what is not given is the preset's (scheduler, then that scheduler's steps), and a
        seed not given is drawn at random (the record keeps it)."""
        scheduler = scheduler or schedule.default_scheduler
        steps = steps or default_steps(scheduler, schedule)
        seed = seed if seed is not None else secrets.randbelow(2**31)
        request = cls(scheduler, steps, seed, samples)
        request.check(schedule)
        return request

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.samples)]

    def batches(self, batch_size: int) -> list[SamplingRequest]:
        """The request split into runs of at most `batch_size` samples, each keeping its samples' seeds."""
        return [
            dataclasses.replace(self, seed=self.seed + start, samples=min(batch_size, self.samples - start))
            for start in range(0, self.samples, batch_size)
        ]

    def check(self, schedule: ScheduleConfig) -> None:
        """ConfigurationError saying what to change when the request cannot run on `schedule`."""
        check_steps(self.scheduler, self.steps, schedule)
        if self.samples < 1:
            raise ConfigurationError(f"{self.samples} samples: ask for at least 1")
        if not 0 <= self.seed <= MAX_SEED - self.samples + 1:
            raise ConfigurationError(
                f"seed {self.seed} with {self.samples} sample(s) leaves 0..{MAX_SEED}; sample i uses seed + i: "
                f"choose a seed from 0 to {MAX_SEED - self.samples + 1}"
            )
