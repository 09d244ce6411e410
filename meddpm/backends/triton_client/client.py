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
from tritonclient.utils import InferenceServerException

from meddpm.backends.triton_client.options import RetryPolicy, Transport
from meddpm.backends.triton_client.shared_memory import CONTROL_TIMEOUT_S, SharedMemoryRegions
from meddpm.errors import ConfigurationError, ModelError, ServerError
from meddpm.model.manifest import ONNX_SHA256
from meddpm.model.served_model import Entry, ServedModel
from meddpm.model.tensors import CONDITION, INPUTS, NOISY_IMAGE, PREDICTED_NOISE, TIMESTEP, sample_shapes
from meddpm.retry import Backoff
from meddpm.sampling.denoiser import Denoiser, NoisePredictor

log = logging.getLogger(__name__)
GRPC_MESSAGE_LIMIT = 2**31 - 1  # what gRPC and Triton accept per message unless configured lower
T = TypeVar("T")


class TritonDenoiser(Denoiser):
    """Predicts noise with a model served by Triton; checked against the local manifest before any step."""

    name = "triton"
    in_process = False

    def __init__(
        self,
        url: str,
        model: ServedModel,
        served_name: str | None = None,
        transport: Transport = Transport.AUTO,
        policy: RetryPolicy | None = None,
        max_message_bytes: int = GRPC_MESSAGE_LIMIT,
    ):
        self.url = url
        self.model = model
        self.policy = policy or RetryPolicy()
        self.max_message_bytes = max_message_bytes
        self.client = grpcclient.InferenceServerClient(
            url,
            channel_args=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
            ],
        )
        try:
            self.served_name = self._wait_for_model(served_name)
            self.max_batch_size = self._check_served_model()
            self.transport = self._choose_transport(Transport(transport))
        except BaseException:
            self.client.close()
            raise
        self.name = f"triton {self.served_name} ({self.transport})"

    def close(self) -> None:
        self.client.close()

    @contextlib.contextmanager
    def conditioned(self, condition: np.ndarray) -> Iterator[NoisePredictor]:
        run = TritonRun(self, condition, shared_memory=self.transport == Transport.SHM)
        try:
            yield run.predict_noise
        finally:
            run.close()

    # --- before the first step -------------------------------------------------------------------------------

    def _wait_for_model(self, served_name: str | None) -> str:
        """The served model to call: the one asked for, else NAME, NAME_openvino or NAME_cpu, whichever is ready
        first in that order (a GPU, the stock container's OpenVINO on a CPU, the python backend)."""
        entries = (Entry.UNET, Entry.OPENVINO, Entry.CPU)
        candidates = [served_name] if served_name else [self.model.name + entry for entry in entries]
        pauses = Backoff(first_s=0.5, max_s=0.5, window_s=self.policy.window_s).pauses()
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
            pause = next(pauses, None)
            if pause is None:
                break
            if not waiting:
                log.info(
                    "Triton at %s: not ready (%s); waiting up to %.0f s", self.url, last_error, self.policy.window_s
                )
                waiting = True
            time.sleep(pause)
        wanted = " or ".join(f"'{name}'" for name in candidates)
        raise ServerError(
            f"Triton at {self.url}: model {wanted} not ready after {self.policy.window_s:.0f} s ({last_error}); "
            f"start the server (python -m harness.local_triton, or deploy/README.md), load the model, or check "
            f"TRITON_SERVER_NETLOC / --triton-model"
        )

    def _model_states(self) -> str:
        index = self.client.get_model_repository_index(client_timeout=CONTROL_TIMEOUT_S).models
        return ", ".join(f"{m.name} {m.state or 'UNLOADED'}" for m in index) or "no models"

    def _check_served_model(self) -> int:
        """The served model's tensors must be the ones the local preset feeds, and its config must record the
        manifest's graph hash; returns its max batch size."""
        config = self._call(
            lambda: self.client.get_model_config(self.served_name, client_timeout=CONTROL_TIMEOUT_S)
        ).config
        preset = self.model.preset
        expected = sample_shapes(preset)
        served = {
            t.name: (grpcclient.model_config_pb2.DataType.Name(t.data_type), list(t.dims))
            for t in [*config.input, *config.output]
        }
        for tensor, dims in expected.items():
            dtype, served_dims = served.get(tensor, (None, None))
            fits = (
                served_dims is not None
                and len(served_dims) == len(dims)
                and all(s in (d, -1) for s, d in zip(served_dims, dims))
            )
            if dtype != "TYPE_FP32" or not fits:
                found = "missing" if dtype is None else f"{dtype} {served_dims}"
                raise ModelError(
                    f"Triton model '{self.served_name}' at {self.url}: tensor '{tensor}' is {found} on the server, "
                    f"but preset '{preset.name}' of {self.model.folder} needs TYPE_FP32 {list(dims)}; serve the model "
                    f"exported for this preset, or point -m at the repository the server loads"
                )
        if config.max_batch_size < 1:
            raise ModelError(
                f"Triton model '{self.served_name}' at {self.url} has max_batch_size "
                f"{config.max_batch_size}; re-export it with `python -m export --max-batch-size N`"
            )
        self.model.check_served_hash(config.parameters, ONNX_SHA256, f"Triton model '{self.served_name}' at {self.url}")
        return config.max_batch_size

    def _choose_transport(self, asked: Transport) -> Transport:
        if asked == Transport.NETWORK or (asked == Transport.AUTO and not is_this_host(self.url)):
            chosen, why = Transport.NETWORK, "asked for" if asked == Transport.NETWORK else "server on another host"
        else:
            problem = SharedMemoryRegions.probe(self.client)
            if problem and asked == Transport.SHM:
                raise ConfigurationError(
                    f"Triton at {self.url} cannot use this process's shared memory ({problem}); run the app on the "
                    f"server's host with /dev/shm shared (containers: --ipc=host), or use --triton-transport network"
                )
            chosen, why = (
                (Transport.NETWORK, f"server cannot map our shared memory: {problem}")
                if problem
                else (Transport.SHM, "same host")
            )
        log.info(
            "Triton at %s: model %s (max batch %d), transport %s (%s)",
            self.url,
            self.served_name,
            self.max_batch_size,
            chosen,
            why,
        )
        return chosen

    # --- every call --------------------------------------------------------------------------------------------

    def _call(self, call: Callable[[], T], recover: Callable[[], bool] = lambda: False, what: str = "a call") -> T:
        """Run a Triton call; retry with backoff while the server is away, for at most the retry window.

        `recover` repairs what a restarted server lost (shared memory registrations); True if it did.
        """
        pauses = None
        while True:
            try:
                return call()
            except InferenceServerException as error:
                pauses = pauses or self.policy.backoff.pauses()  # the window starts at the first failure
                pause = next(pauses, None)
                if pause is None:
                    raise ServerError(
                        f"Triton at {self.url} did not answer {what} for {self.policy.window_s:.0f} s (last: "
                        f"{error.status()} {error.message()}); restart the server or raise --triton-retry-window"
                    ) from None
                with contextlib.suppress(InferenceServerException):
                    if recover():
                        continue
                if not self._worth_retrying(error):
                    raise ModelError(
                        f"Triton model '{self.served_name}' at {self.url} refused {what}: {error.message()}"
                    ) from None
                log.warning(
                    "Triton at %s: %s failed (%s); retrying for up to %.0f s",
                    self.url,
                    what,
                    error.status(),
                    self.policy.window_s,
                )
                time.sleep(pause)

    def _worth_retrying(self, error: InferenceServerException) -> bool:
        """A deadline, an unreachable server or a model not (yet) ready is worth waiting for; a refusal is not."""
        if error.status() in ("StatusCode.DEADLINE_EXCEEDED", "StatusCode.UNAVAILABLE"):
            return True
        try:
            return not (
                self.client.is_server_live(client_timeout=CONTROL_TIMEOUT_S)
                and self.client.is_model_ready(self.served_name, client_timeout=CONTROL_TIMEOUT_S)
            )
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
            shapes = sample_shapes(denoiser.model.preset)
            regions = SharedMemoryRegions(
                f"meddpm_{self.tag}", {name: ((self.batch, *shape), np.float32) for name, shape in shapes.items()}
            )
            self.regions = regions
            try:
                regions.write(CONDITION, self.condition)
                denoiser._call(lambda: regions.register(denoiser.client), what="shared memory registration")
            except BaseException:
                regions.close(denoiser.client)
                raise

    def _chunk_size(self, shared_memory: bool) -> int:
        """Samples per request: the server's max batch, and under the gRPC message limit on the network."""
        chunk = self.denoiser.max_batch_size
        if shared_memory:
            return chunk
        per_sample = (2 * self.denoiser.model.preset.out_channels + self.condition.shape[1]) * self.condition[
            0, 0
        ].nbytes
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
            self.regions.write(NOISY_IMAGE, noisy_image)
            self.regions.write(TIMESTEP, timestep.reshape(-1, 1))
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
        tensors = dict(zip(INPUTS, (noisy_image, self.condition[start : start + count], timestep.reshape(-1, 1))))
        inputs = [grpcclient.InferInput(name, list(array.shape), "FP32") for name, array in tensors.items()]
        output = grpcclient.InferRequestedOutput(PREDICTED_NOISE)
        if self.regions is None:
            for tensor, array in zip(inputs, tensors.values()):
                tensor.set_data_from_numpy(array)
        else:
            for tensor in inputs:
                self.regions.attach(tensor, start, count)
            self.regions.attach(output, start, count)
        denoiser = self.denoiser
        result = denoiser.client.infer(
            denoiser.served_name,
            inputs,
            outputs=[output],
            request_id=request_id,
            client_timeout=denoiser.policy.deadline_s,
        )
        if result.get_response().id != request_id:
            raise ModelError(f"Triton answered request {result.get_response().id!r} to {request_id!r}")
        if self.regions is not None:
            return self.regions.read(PREDICTED_NOISE, start, count)
        noise = result.as_numpy(PREDICTED_NOISE)
        if noise is None or noise.shape != noisy_image.shape:
            raise ModelError(
                f"Triton model '{denoiser.served_name}' returned {PREDICTED_NOISE} of shape "
                f"{None if noise is None else noise.shape} for an input of {noisy_image.shape}"
            )
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


def is_this_host(url: str) -> bool:
    """Whether a HOST:PORT address names this machine (loopback or one of its own addresses)."""
    host = url.rsplit(":", 1)[0].strip("[]")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        own = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except socket.gaierror:
        return False
    return any(ipaddress.ip_address(a).is_loopback or a in own for a in addresses)
