"""The UNet on a Triton Inference Server over gRPC, behind the same Denoiser interface as in-process ONNX Runtime.

The sampling loop stays in the client; every step is one request per batch chunk, binary tensors, a request id
and a deadline. Two transports:

- "shm": system shared memory regions (POSIX /dev/shm) hold the tensors; the condition is written once per run,
  each step writes the noisy image and reads the noise in place. Needs the server on this host, sharing /dev/shm.
- "network": the tensors travel in the gRPC messages (condition included, every step).

"auto" takes shared memory when the server address is this host and the server can open our regions, the network
otherwise; the choice is logged once. A failed call is retried with backoff for a bounded window: a server that is
restarted meanwhile gets its lost shared-memory registrations back and the run goes on from the step it was at.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from meddpm.denoisers import Denoiser, NoisePredictor
from meddpm.errors import ConfigurationError, ModelError, ServerError
from meddpm.served_model import ONNX_SHA256, ServedModel
from meddpm.unet import INPUT_NAMES, OUTPUT_NAME

log = logging.getLogger(__name__)
TRANSPORTS = ("auto", "shm", "network")
GRPC_MESSAGE_LIMIT = 2**31 - 1  # what gRPC and Triton accept per message unless configured lower
# A control call (liveness, config, shared memory registration) on a server that is up answers within this even
# when the server and this host are busy (2 s was not enough under load); an absent server fails at once anyway.
CONTROL_TIMEOUT_S = 10.0
CLEANUP_WINDOW_S = 60.0  # how long to keep asking a busy server to unregister a region before leaving it registered
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    deadline_s: float = 120.0  # one UNet call; a 128^3 step takes ~0.03 s on a GPU, seconds on a CPU
    window_s: float = 60.0  # how long a failing server may take to come back (and to come up at the start)
    first_backoff_s: float = 0.25
    max_backoff_s: float = 4.0


class TritonDenoiser(Denoiser):
    """Predicts noise with a model served by Triton; checked against the local manifest before any step."""

    name = "triton"

    def __init__(self, url: str, model: ServedModel, served_name: str | None = None, transport: str = "auto",
                 policy: RetryPolicy = RetryPolicy(), max_message_bytes: int = GRPC_MESSAGE_LIMIT):
        if transport not in TRANSPORTS:
            raise ConfigurationError(f"'{transport}' is not a Triton transport; choose one of {', '.join(TRANSPORTS)}")
        self.url = url
        self.model = model
        self.policy = policy
        self.max_message_bytes = max_message_bytes
        self.client = grpcclient.InferenceServerClient(url, channel_args=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ])
        self.served_name = self._wait_for_model(served_name)
        self.max_batch_size = self._check_served_model()
        self.transport = self._choose_transport(transport)
        self.name = f"triton {self.served_name} ({self.transport})"

    def predict(self, noisy_image: np.ndarray, timestep: np.ndarray, condition: np.ndarray) -> np.ndarray:
        with self.conditioned(condition) as predict_noise:
            return predict_noise(noisy_image, timestep)

    @contextlib.contextmanager
    def conditioned(self, condition: np.ndarray) -> Iterator[NoisePredictor]:
        run = TritonRun(self, condition, shared_memory=self.transport == "shm")
        try:
            yield run.predict_noise
        finally:
            run.close()

    # --- before the first step -------------------------------------------------------------------------------

    def _wait_for_model(self, served_name: str | None) -> str:
        """The served model to call: the one asked for, else NAME or NAME_cpu, whichever is ready."""
        candidates = [served_name] if served_name else [self.model.name, f"{self.model.name}_cpu"]
        deadline = time.monotonic() + self.policy.window_s
        last_error, waiting = "no answer", False
        while True:
            try:
                if self.client.is_server_live(client_timeout=CONTROL_TIMEOUT_S):
                    for name in candidates:
                        if self.client.is_model_ready(name, client_timeout=CONTROL_TIMEOUT_S):
                            return name
                    last_error = "server: " + self._model_states()
            except InferenceServerException as error:
                last_error = error.message()
            if time.monotonic() >= deadline:
                break
            if not waiting:
                log.info("Triton at %s: not ready (%s); waiting up to %.0f s", self.url, last_error, self.policy.window_s)
                waiting = True
            time.sleep(0.5)
        wanted = " or ".join(f"'{name}'" for name in candidates)
        raise ServerError(
            f"Triton at {self.url}: model {wanted} not ready after {self.policy.window_s:.0f} s ({last_error}); "
            f"start the server (python -m deploy.local_triton, or deploy/README.md), load the model, or check "
            f"TRITON_SERVER_NETLOC / --triton-model"
        )

    def _model_states(self) -> str:
        index = self.client.get_model_repository_index(client_timeout=CONTROL_TIMEOUT_S).models
        return ", ".join(f"{m.name} {m.state or 'UNLOADED'}" for m in index) or "no models"

    def _check_served_model(self) -> int:
        """The served model's tensors must be the ones the local preset feeds, and its config must record the
        manifest's graph hash; returns its max batch size."""
        config = self._call(lambda: self.client.get_model_config(self.served_name, client_timeout=CONTROL_TIMEOUT_S)).config
        preset = self.model.preset
        grid = list(preset.image.grid)
        expected = {
            INPUT_NAMES[0]: [preset.out_channels, *grid],
            INPUT_NAMES[1]: [len(preset.condition.labels), *grid],
            INPUT_NAMES[2]: [1],
            OUTPUT_NAME: [preset.out_channels, *grid],
        }
        served = {t.name: (grpcclient.model_config_pb2.DataType.Name(t.data_type), list(t.dims))
                  for t in [*config.input, *config.output]}
        for tensor, dims in expected.items():
            dtype, served_dims = served.get(tensor, (None, None))
            fits = served_dims is not None and len(served_dims) == len(dims) and all(
                s in (d, -1) for s, d in zip(served_dims, dims))
            if dtype != "TYPE_FP32" or not fits:
                found = "missing" if dtype is None else f"{dtype} {served_dims}"
                raise ModelError(
                    f"Triton model '{self.served_name}' at {self.url}: tensor '{tensor}' is {found} on the server, "
                    f"but preset '{preset.name}' of {self.model.folder} needs TYPE_FP32 {dims}; serve the model "
                    f"exported for this preset, or point -m at the repository the server loads"
                )
        if config.max_batch_size < 1:
            raise ModelError(f"Triton model '{self.served_name}' at {self.url} has max_batch_size "
                             f"{config.max_batch_size}; re-export it with `python -m export --max-batch-size N`")
        self.model.check_served_hash(config.parameters, ONNX_SHA256, f"Triton model '{self.served_name}' at {self.url}")
        return config.max_batch_size

    def _choose_transport(self, asked: str) -> str:
        if asked == "network" or (asked == "auto" and not is_this_host(self.url)):
            chosen, why = "network", "asked for" if asked == "network" else "server on another host"
        else:
            problem = SharedMemoryRegions.probe(self.client)
            if problem and asked == "shm":
                raise ConfigurationError(
                    f"Triton at {self.url} cannot use this process's shared memory ({problem}); run the app on the "
                    f"server's host with /dev/shm shared (containers: --ipc=host), or use --triton-transport network"
                )
            chosen, why = ("network", f"server cannot map our shared memory: {problem}") if problem else ("shm", "same host")
        log.info("Triton at %s: model %s (max batch %d), transport %s (%s)", self.url, self.served_name,
                 self.max_batch_size, chosen, why)
        return chosen

    # --- every call --------------------------------------------------------------------------------------------

    def _call(self, call: Callable[[], T], recover: Callable[[], bool] = lambda: False, what: str = "a call") -> T:
        """Run a Triton call; retry with backoff while the server is away, for at most the retry window.

        `recover` repairs what a restarted server lost (shared memory registrations); True if it did.
        """
        failing_since, backoff = None, self.policy.first_backoff_s
        while True:
            try:
                return call()
            except InferenceServerException as error:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since >= self.policy.window_s:
                    raise ServerError(
                        f"Triton at {self.url} did not answer {what} for {self.policy.window_s:.0f} s (last: "
                        f"{error.status()} {error.message()}); restart the server or raise --triton-retry-window"
                    ) from None
                with contextlib.suppress(InferenceServerException):
                    if recover():
                        continue
                if not self._worth_retrying(error):
                    raise ModelError(f"Triton model '{self.served_name}' at {self.url} refused {what}: "
                                     f"{error.message()}") from None
                log.warning("Triton at %s: %s failed (%s); retrying for up to %.0f s more", self.url, what,
                            error.status(), self.policy.window_s - (now - failing_since))
                time.sleep(backoff)
                backoff = min(2 * backoff, self.policy.max_backoff_s)

    def _worth_retrying(self, error: InferenceServerException) -> bool:
        """A deadline, an unreachable server or a model not (yet) ready is worth waiting for; a refusal is not."""
        if error.status() in ("StatusCode.DEADLINE_EXCEEDED", "StatusCode.UNAVAILABLE"):
            return True
        try:
            return not (self.client.is_server_live(client_timeout=CONTROL_TIMEOUT_S)
                        and self.client.is_model_ready(self.served_name, client_timeout=CONTROL_TIMEOUT_S))
        except InferenceServerException:
            return True


class TritonRun:
    """One sampling run's requests: the condition bound, batch chunks, request ids, shared memory if used."""

    def __init__(self, denoiser: TritonDenoiser, condition: np.ndarray, shared_memory: bool):
        self.denoiser = denoiser
        self.condition = np.ascontiguousarray(condition, dtype=np.float32)
        self.batch = len(condition)
        self.tag = uuid.uuid4().hex[:12]
        self.step = 0
        self.chunk = self._chunk_size(shared_memory)
        self.regions = None
        if shared_memory:
            model = denoiser.model.preset
            image_shape = (self.batch, model.out_channels, *self.condition.shape[2:])
            self.regions = SharedMemoryRegions(f"meddpm_{self.tag}", {
                INPUT_NAMES[0]: (image_shape, np.float32),
                INPUT_NAMES[1]: (self.condition.shape, np.float32),
                INPUT_NAMES[2]: ((self.batch, 1), np.float32),
                OUTPUT_NAME: (image_shape, np.float32),
            })
            try:
                self.regions.write(INPUT_NAMES[1], self.condition)
                denoiser._call(lambda: self.regions.register(denoiser.client), what="shared memory registration")
            except BaseException:
                self.regions.close(denoiser.client)
                raise

    def _chunk_size(self, shared_memory: bool) -> int:
        """Samples per request: the server's max batch, and under the gRPC message limit on the network."""
        chunk = self.denoiser.max_batch_size
        if shared_memory:
            return chunk
        per_sample = (2 * self.denoiser.model.preset.out_channels + self.condition.shape[1]) * self.condition[0, 0].nbytes
        fitting = (self.denoiser.max_message_bytes - 64 * 1024) // per_sample  # headroom for the message envelope
        if fitting < 1:
            raise ConfigurationError(
                f"one sample needs {per_sample / 2**20:.1f} MiB per gRPC message, over the limit of "
                f"{self.denoiser.max_message_bytes / 2**20:.1f} MiB; run the app on the Triton host with "
                f"--triton-transport shm (nothing but metadata then travels over gRPC), or raise the limit"
            )
        return min(chunk, fitting)

    def predict_noise(self, noisy_image: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        self.step += 1
        if self.regions is not None:
            self.regions.write(INPUT_NAMES[0], noisy_image)
            self.regions.write(INPUT_NAMES[2], timestep.reshape(-1, 1))
        noise = np.empty_like(noisy_image)
        for start in range(0, self.batch, self.chunk):
            stop = min(start + self.chunk, self.batch)
            request_id = f"{self.tag}-{self.step}-{start}"
            request = functools.partial(self._infer, noisy_image[start:stop], timestep[start:stop], start, request_id)
            noise[start:stop] = self.denoiser._call(request, self._restore_registration, f"request {request_id}")
        log.debug("Triton step %d: %d request(s) of <= %d samples", self.step, -(-self.batch // self.chunk), self.chunk)
        return noise

    def _infer(self, noisy_image: np.ndarray, timestep: np.ndarray, start: int, request_id: str) -> np.ndarray:
        count = len(noisy_image)
        tensors = {INPUT_NAMES[0]: noisy_image, INPUT_NAMES[1]: self.condition[start : start + count],
                   INPUT_NAMES[2]: timestep.reshape(-1, 1)}
        inputs = [grpcclient.InferInput(name, list(array.shape), "FP32") for name, array in tensors.items()]
        output = grpcclient.InferRequestedOutput(OUTPUT_NAME)
        if self.regions is None:
            for tensor, array in zip(inputs, tensors.values()):
                tensor.set_data_from_numpy(array)
        else:
            for tensor in inputs:
                self.regions.attach(tensor, start, count)
            self.regions.attach(output, start, count)
        denoiser = self.denoiser
        result = denoiser.client.infer(denoiser.served_name, inputs, outputs=[output], request_id=request_id,
                                       client_timeout=denoiser.policy.deadline_s)
        if result.get_response().id != request_id:
            raise ModelError(f"Triton answered request {result.get_response().id!r} to {request_id!r}")
        if self.regions is not None:
            return self.regions.read(OUTPUT_NAME, start, count)
        noise = result.as_numpy(OUTPUT_NAME)
        if noise is None or noise.shape != noisy_image.shape:
            raise ModelError(f"Triton model '{denoiser.served_name}' returned {OUTPUT_NAME} of shape "
                             f"{None if noise is None else noise.shape} for an input of {noisy_image.shape}")
        return noise

    def _restore_registration(self) -> bool:
        """A restarted server has forgotten our regions: register them again (their contents are intact)."""
        if self.regions is None or self.regions.registered(self.denoiser.client):
            return False
        self.regions.register(self.denoiser.client)
        log.warning("Triton at %s: shared memory registered again after a server restart", self.denoiser.url)
        return True

    def close(self) -> None:
        if self.regions is not None:
            self.regions.close(self.denoiser.client)


class SharedMemoryRegions:
    """One POSIX shared memory region per tensor, registered with Triton; closed means unregistered and unlinked."""

    def __init__(self, prefix: str, tensors: dict[str, tuple[tuple[int, ...], type]]):
        self.layout = {name: (shape, np.dtype(dtype)) for name, (shape, dtype) in tensors.items()}
        self.names = {name: f"{prefix}_{name}" for name in tensors}
        self.handles = {}
        try:
            for name, (shape, dtype) in self.layout.items():
                self.handles[name] = shm.create_shared_memory_region(
                    self.names[name], "/" + self.names[name], int(np.prod(shape)) * dtype.itemsize, create_only=True)
        except BaseException:
            self.close(None)
            raise

    @classmethod
    def probe(cls, client: grpcclient.InferenceServerClient) -> str | None:
        """None if the server can map a region of ours, else why not."""
        regions = cls(f"meddpm_probe_{uuid.uuid4().hex[:12]}", {"probe": ((1,), np.float32)})
        try:
            regions.register(client)
            return None
        except InferenceServerException as error:
            return error.message()
        finally:
            regions.close(client)

    def byte_size(self, name: str, samples: int | None = None) -> int:
        """Bytes of `samples` samples of a tensor (default: the whole batch); also the offset of sample `samples`."""
        shape, dtype = self.layout[name]
        return (shape[0] if samples is None else samples) * int(np.prod(shape[1:])) * dtype.itemsize

    def write(self, name: str, array: np.ndarray) -> None:
        shm.set_shared_memory_region(self.handles[name], [np.ascontiguousarray(array, dtype=self.layout[name][1])])

    def read(self, name: str, start: int, count: int) -> np.ndarray:
        shape, dtype = self.layout[name]
        view = shm.get_contents_as_numpy(self.handles[name], dtype, [count, *shape[1:]], self.byte_size(name, start))
        return view.copy()

    def attach(self, tensor: grpcclient.InferInput | grpcclient.InferRequestedOutput, start: int, count: int) -> None:
        name = tensor.name()
        tensor.set_shared_memory(self.names[name], self.byte_size(name, count), offset=self.byte_size(name, start))

    def register(self, client: grpcclient.InferenceServerClient) -> None:
        for name, region in self.names.items():
            with contextlib.suppress(InferenceServerException):  # stale registration of the same name
                client.unregister_system_shared_memory(region, client_timeout=CONTROL_TIMEOUT_S)
            client.register_system_shared_memory(region, "/" + region, self.byte_size(name),
                                                 client_timeout=CONTROL_TIMEOUT_S)

    def registered(self, client: grpcclient.InferenceServerClient) -> bool:
        status = client.get_system_shared_memory_status(client_timeout=CONTROL_TIMEOUT_S).regions
        return all(region in status for region in self.names.values())

    def close(self, client: grpcclient.InferenceServerClient | None) -> None:
        """Unregister and unlink every region; safe to call twice."""
        for name, handle in list(self.handles.items()):
            if client is not None:
                unregister(client, self.names[name])
            shm.destroy_shared_memory_region(handle)
            del self.handles[name]


def unregister(client: grpcclient.InferenceServerClient, region: str) -> None:
    """Unregister a region, waiting for a busy server (up to CLEANUP_WINDOW_S); a server that is gone has forgotten
    its registrations, and is not waited for."""
    deadline = time.monotonic() + CLEANUP_WINDOW_S
    while True:
        try:
            client.unregister_system_shared_memory(region, client_timeout=CONTROL_TIMEOUT_S)
            return
        except InferenceServerException as error:
            if error.status() != "StatusCode.DEADLINE_EXCEEDED":
                return
            if time.monotonic() >= deadline:
                log.warning("Triton: shared memory region %s may still be registered (no answer for %.0f s); "
                            "unregister it or restart the server", region, CLEANUP_WINDOW_S)
                return


def is_this_host(url: str) -> bool:
    """Whether a HOST:PORT address names this machine (loopback or one of its own addresses)."""
    host = url.rsplit(":", 1)[0].strip("[]")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        own = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except socket.gaierror:
        return False
    return any(ipaddress.ip_address(a).is_loopback or a in own for a in addresses)
