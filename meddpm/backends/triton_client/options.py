"""The Triton backend's settings, importable without tritonclient (the app's settings table reads them)."""

from __future__ import annotations

import dataclasses
import re
from enum import StrEnum

from meddpm.errors import ConfigurationError
from meddpm.retry import Backoff


class Transport(StrEnum):
    """How the UNet's tensors reach the server, for the client-side loop."""

    AUTO = "auto"  # shared memory when the server is on this host and can map it, else the network
    SHM = "shm"  # POSIX shared memory regions: the server must share this host's /dev/shm
    NETWORK = "network"  # in the gRPC messages


class LoopMode(StrEnum):
    """Where the sampling loop runs when the UNet is on Triton."""

    CLIENT = "client"  # in the app: one request per step
    SERVER = "server"  # in the `<name>_sampler` model: one request per volume, progress streamed


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    deadline_s: float = 120.0  # one UNet call; a 128^3 step takes ~0.03 s on a GPU, seconds on a CPU
    window_s: float = 60.0  # how long a failing server may take to come back (and to come up at the start)
    first_backoff_s: float = 0.25
    max_backoff_s: float = 4.0

    @property
    def backoff(self) -> Backoff:
        return Backoff(self.first_backoff_s, self.max_backoff_s, window_s=self.window_s)


def server_address(netloc: str) -> str:
    """HOST:PORT of a Triton server's gRPC endpoint (TRITON_SERVER_NETLOC), checked before anything waits on it."""
    if not (
        re.fullmatch(r"(?:[\w.-]+|\[[\w:.%]+\]):\d{1,5}", netloc, re.ASCII) and 0 < int(netloc.rsplit(":")[-1]) < 2**16
    ):
        raise ConfigurationError(
            f"TRITON_SERVER_NETLOC / --triton-server-netloc {netloc!a} is not HOST:PORT with a port from 1 to "
            f"65535, e.g. localhost:8001 or [::1]:8001"
        )
    return netloc
