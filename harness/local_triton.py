"""A local Triton Inference Server on loopback, serving the CPU variants of a model repository.

The server is the real `tritonserver` binary that the nvidia-pytriton wheel carries, run from its own virtual
environment (`scripts/setup_triton.sh` makes `.venv-triton`). It has the python backend but no ONNX Runtime
backend, so it loads the `<name>_cpu` entries that `python -m export` writes: the same graph, same tensor
names, run by ONNX Runtime inside the python backend; and the `<name>_sampler` entries (the server-side
sampling loop, which calls them).

    python -m harness.local_triton --repository model_repository      # serves until Ctrl-C

Tests use `LocalTriton` directly: start(), stop(), kill(), and the same ports again after a restart.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from harness import free_port
from meddpm.errors import ConfigurationError, ModelError, ServerError
from meddpm.model.manifest import MANIFEST
from meddpm.model.served_model import Entry, read_config
from meddpm.retry import Backoff

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = REPO / ".venv-triton"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def servable_entries(repository: Path) -> list[str]:
    """The exported CPU and sampler entries of a repository (those written by `python -m export`)."""
    return sorted(
        p.name
        for suffix in (Entry.CPU, Entry.SAMPLER)
        for p in repository.glob(f"*{suffix}")
        if (p / "1" / MANIFEST).is_file()
    )


def server_processes(grpc_port: int) -> list[int]:
    """Pids of the tritonserver processes serving this gRPC port (none, once a server is stopped)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            arguments = cmdline.read_bytes().split(b"\0")
        except OSError:  # the process ended meanwhile
            continue
        if arguments[0].endswith(b"tritonserver") and f"--grpc-port={grpc_port}".encode() in arguments:
            found.append(int(cmdline.parent.name))
    return found


class LocalTriton:
    """One tritonserver process with explicit model control, loading the repository's CPU and sampler entries."""

    def __init__(
        self,
        repository: Path,
        venv: Path = DEFAULT_VENV,
        grpc_port: int | None = None,
        http_port: int | None = None,
        log_path: Path | None = None,
        address: str = "127.0.0.1",
        prefix: tuple[str, ...] = (),
        models: Sequence[str] | None = None,
    ):
        """`address` and `prefix` serve elsewhere than loopback, e.g. inside a network namespace
        (prefix ("ip", "netns", "exec", NAME) and that namespace's address: benchmarks/limited_link.py). `models`
        loads only these entries (default: every CPU and sampler entry): a server of one UNet entry starts and
        stops in a fraction of the time that the sampler entries' instances take."""
        self.repository = Path(repository).resolve()
        self.venv = Path(venv)
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.log_path = log_path or Path(tempfile.gettempdir()) / f"meddpm-tritonserver-{self.grpc_port}.log"
        servable = servable_entries(self.repository)
        self.models = servable if models is None else list(models)
        self.address, self.prefix = address, list(prefix)
        self.process: subprocess.Popen | None = None
        if not servable:
            raise ConfigurationError(
                f"{self.repository}: no exported <name>{Entry.CPU} model to serve; run `python -m export` into it first"
            )
        unknown = [name for name in self.models if name not in servable]
        if unknown or not self.models:
            raise ConfigurationError(
                f"{self.repository}: {', '.join(unknown) or 'no model'} asked for, but it serves {', '.join(servable)}"
            )
        for name in self.models:  # a config the server would refuse stops it at start, its reason only in its log
            read_config(self.repository / name)

    @property
    def url(self) -> str:
        """The gRPC address, as TRITON_SERVER_NETLOC takes it."""
        return f"{'localhost' if self.address == '127.0.0.1' else self.address}:{self.grpc_port}"

    def command(self) -> tuple[list[str], dict[str, str]]:
        server = self._server_folder()
        command = [
            *self.prefix,
            str(server / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={server / 'backends'}",
            "--model-control-mode=explicit",
            *(f"--load-model={name}" for name in self.models),
            f"--grpc-address={self.address}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.address}",
            f"--http-port={self.http_port}",
            "--allow-metrics=false",
            "--exit-timeout-secs=10",
        ]
        environment = {
            **os.environ,
            "PATH": f"{self.venv / 'bin'}:{os.environ.get('PATH', '')}",
            "VIRTUAL_ENV": str(self.venv),
            "LD_LIBRARY_PATH": f"{server.parent.parent / 'nvidia_pytriton.libs'}:{self._python_library_folder()}",
        }
        environment.pop("PYTHONPATH", None)
        return command, environment

    def start(self, timeout_s: float = 120.0) -> LocalTriton:
        """Start the server and wait until it and every model are ready."""
        command, environment = self.command()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        for pause in Backoff(first_s=0.25, max_s=0.25, window_s=timeout_s).pauses():
            if self.process.poll() is not None:
                raise ServerError(
                    f"tritonserver exited with code {self.process.returncode} while starting; see {self.log_path}"
                )
            if self.ready():
                return self
            time.sleep(pause)
        self.stop()
        raise ServerError(f"tritonserver was not ready after {timeout_s:.0f} s; see {self.log_path}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.address}:{self.http_port}/v2/health/ready", timeout=2) as answer:
                return answer.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask the server to exit (SIGTERM), then kill it if it does not."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)  # a paused server cannot exit
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """Kill the server at once, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _python_library_folder(self) -> Path:
        """Where the libpython of the venv's interpreter is: the python stub links libpython3.X.so dynamically,
        and must load the one whose standard library (lib-dynload: _ssl, which diffusers needs) the venv uses,
        not the system's."""
        config = dict(
            line.split(" = ", 1) for line in (self.venv / "pyvenv.cfg").read_text().splitlines() if " = " in line
        )
        return Path(config["home"]).parent / "lib"

    def _server_folder(self) -> Path:
        found = sorted(self.venv.glob("lib/python3*/site-packages/pytriton/tritonserver"))
        if not found or not (found[0] / "backends" / "python" / "triton_python_backend_stub").exists():
            raise ConfigurationError(
                f"{self.venv}: no tritonserver with its python backend stub there; run scripts/setup_triton.sh"
            )
        return found[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.local_triton", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repository",
        type=Path,
        default=REPO / "model_repository",
        help="model repository written by `python -m export` (default: model_repository)",
    )
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument(
        "--models", nargs="+", metavar="NAME", help="load only these entries (default: every CPU and sampler entry)"
    )
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="made by scripts/setup_triton.sh")
    parser.add_argument(
        "--log",
        type=Path,
        help="the server's log (default: meddpm-tritonserver-PORT.log in the system's temporary folder)",
    )
    args = parser.parse_args(argv)
    try:
        server = LocalTriton(
            args.repository, args.venv, args.grpc_port, args.http_port, log_path=args.log, models=args.models
        )
    except (ConfigurationError, ModelError) as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    received = []

    def stop(signum, _frame):  # the server runs in a session of its own: it must be stopped, not orphaned
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        received.append(signum)
        raise KeyboardInterrupt

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
    try:
        server.start()
        print(
            f"Triton ready: gRPC {server.url}, models {', '.join(server.models)}; log {server.log_path}. "
            f"Ctrl-C or SIGTERM stops it.",
            flush=True,
        )
        server.process.wait()
    except KeyboardInterrupt:
        pass
    except ServerError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    finally:
        server.stop()
    if received:
        return 128 + received[0]
    return 0 if server.process.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
