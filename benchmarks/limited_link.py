"""A rate-limited network link on this machine: a network namespace joined by a veth pair, shaped by tc tbf.

    with limited_link("100mbit") as link:   # needs root (CAP_NET_ADMIN)
        LocalTriton(repository, address=link.server_address, prefix=link.prefix)

The server runs inside the namespace and is reached at its address through the veth pair, whose two ends
(both directions) are limited to the rate: a stand-in for a hospital network between a workstation and a GPU
server. Loopback, which other processes use, is left alone. Everything is removed on exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
from collections.abc import Iterator

from meddpm.errors import ConfigurationError


@dataclasses.dataclass(frozen=True)
class Link:
    rate: str
    prefix: tuple[str, ...]  # runs a command inside the namespace
    server_address: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def limited_link(rate: str, subnet: str = "10.201.0") -> Iterator[Link]:
    """A namespace at SUBNET.2 behind a veth pair from SUBNET.1, both ends limited to `rate` (tc syntax)."""
    tag = f"md{os.getpid() % 100000}"
    namespace, outside, inside = f"{tag}_ns", f"{tag}c", f"{tag}s"
    inside_ns = ("netns", "exec", namespace)
    shape = ("qdisc", "add", "dev")
    try:
        _ip("netns", "add", namespace)
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        raise ConfigurationError(
            f"cannot create a network namespace ({getattr(error, 'stderr', error)}); "
            f"run as root with iproute2, or leave out --link-rate"
        ) from None
    try:
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", namespace)
        _ip("addr", "add", f"{subnet}.1/30", "dev", outside)
        _ip("link", "set", outside, "up")
        _ip(*inside_ns, "ip", "addr", "add", f"{subnet}.2/30", "dev", inside)
        _ip(*inside_ns, "ip", "link", "set", inside, "up")
        _ip(*inside_ns, "ip", "link", "set", "lo", "up")
        tbf = ("root", "tbf", "rate", rate, "burst", "256kb", "latency", "200ms")
        subprocess.run(["tc", *shape, outside, *tbf], check=True, capture_output=True)
        subprocess.run(["ip", *inside_ns, "tc", *shape, inside, *tbf], check=True, capture_output=True)
        yield Link(rate, ("ip", *inside_ns), f"{subnet}.2")
    finally:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)  # takes the veth pair with it
