"""The checkout's local harness: what development, the demos, the tests and the benchmarks start and check (a local
Triton and Orthanc, the Web Viewer in a browser, dciodvfy, the container checks' output check). A site runs none
of it: what a site runs is in deploy/."""

import socket


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
