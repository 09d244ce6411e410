"""The whole sampling loop on a Triton server (the `<name>_sampler` model), its progress streamed over gRPC.

One request carries the condition and the settings; the server runs `meddpm.sampling.sample`, the loop the app
runs, with the UNet called through BLS, and streams `progress` [done, total] after every step, then the volumes.
Same seeds and settings give the same volumes as the client-side loop. Setting `stop` (Ctrl-C) or a server that
stays silent past the deadline cancels the request, which stops the server's loop before its next step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from meddpm.errors import ConfigurationError, Interrupted, MedDDPMError, ModelError, ServerError
from meddpm.presets import ScheduleConfig
from meddpm.sampling import Progress, check_steps
from meddpm.served_model import PACKAGE_SHA256, SAMPLER_SUFFIX
from meddpm.triton_denoiser import CONTROL_TIMEOUT_S, TritonDenoiser

log = logging.getLogger(__name__)
LOOP_MODES = ("client", "server")
# Errors the sampler model reports start with their class name: they keep their type (and exit code) here.
REPORTED_ERRORS = {cls.__name__: cls for cls in (ConfigurationError, ModelError, ServerError, Interrupted)}


class TritonServerLoop:
    """`sample` with the signature of `meddpm.sampling.sample` (less the denoiser), run inside the server.

    `denoiser` has found and checked the UNet model the server-side loop calls; its policy's deadline bounds
    the wait for each response (a step, or the final volumes).
    """

    def __init__(self, denoiser: TritonDenoiser):
        self.denoiser = denoiser
        self.sampler_name = denoiser.model.name + SAMPLER_SUFFIX
        self.name = f"triton {self.sampler_name} (server-side loop, UNet {denoiser.served_name})"
        try:
            ready = denoiser.client.is_model_ready(self.sampler_name, client_timeout=CONTROL_TIMEOUT_S)
            if ready:
                config = denoiser.client.get_model_config(self.sampler_name, client_timeout=CONTROL_TIMEOUT_S).config
        except InferenceServerException as error:
            ready, why = False, error.message()
        else:
            why = "not loaded"
        if not ready:
            raise ServerError(
                f"Triton at {denoiser.url}: the server-side loop '{self.sampler_name}' is not ready ({why}); load it "
                f"(--load-model={self.sampler_name}; its python needs torch and diffusers, see deploy/README.md) "
                f"or use --triton-loop client"
            )
        denoiser.model.check_served_hash(config.parameters, PACKAGE_SHA256,
                                         f"Triton model '{self.sampler_name}' at {denoiser.url}")
        log.info("Triton at %s: sampling loop on the server (%s calling %s)", denoiser.url, self.sampler_name,
                 denoiser.served_name)

    def sample(self, condition: np.ndarray, out_channels: int, scheduler_name: str, steps: int,
               schedule: ScheduleConfig, seeds: list[int], progress: Progress | None = None,
               stop: threading.Event | None = None) -> np.ndarray:
        """Synthesise len(seeds) images (consecutive seeds) for one condition (L, D, H, W): (B, C, D, H, W)."""
        check_steps(scheduler_name, steps, schedule)
        if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
            raise ConfigurationError(f"seeds {seeds} are not consecutive; the server-side loop takes a first seed "
                                     f"and a count (sample i uses seed + i)")
        events: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.denoiser.url)  # one stream per client: a client per run
        request_id = uuid.uuid4().hex[:12]
        finished = False
        try:
            client.start_stream(callback=lambda result, error: events.put((result, error)))
            tensor = grpcclient.InferInput("condition", list(condition.shape), "FP32")
            tensor.set_data_from_numpy(np.ascontiguousarray(condition, dtype=np.float32))
            parameters = {"scheduler": scheduler_name, "steps": steps, "seed": seeds[0], "samples": len(seeds),
                          "unet_model": self.denoiser.served_name}
            client.async_stream_infer(self.sampler_name, [tensor], request_id=request_id, parameters=parameters)
            image = self._receive(events, len(seeds), out_channels, steps, progress, stop)
            finished = True
            return image
        finally:
            client.stop_stream(cancel_requests=not finished)  # an unfinished request is cancelled on the server
            client.close()

    def _receive(self, events: queue.Queue, samples: int, out_channels: int, steps: int, progress: Progress | None,
                 stop: threading.Event | None) -> np.ndarray:
        """Progress responses until the one with the volumes; raises on an error, a stop or a silent server."""
        started = last = time.monotonic()
        done = 0
        deadline = self.denoiser.policy.deadline_s
        while True:
            if stop is not None and stop.is_set():
                raise Interrupted(f"stopped at step {done + 1} of {steps}; the server-side loop was cancelled and "
                                  f"nothing was written")
            try:
                result, error = events.get(timeout=0.25)
            except queue.Empty:
                if time.monotonic() - last > deadline:
                    raise ServerError(
                        f"Triton at {self.denoiser.url}: the server-side loop sent nothing for {deadline:.0f} s "
                        f"after step {done} of {steps}; the request was cancelled; check the server, or raise "
                        f"--triton-deadline") from None
                continue
            last = time.monotonic()
            if error is not None:
                raise self._error(error)
            image = result.as_numpy("image")
            if image is not None:
                if image.shape[:2] != (samples, out_channels):
                    raise ModelError(f"'{self.sampler_name}' returned volumes of shape {image.shape} for "
                                     f"{samples} sample(s) of {out_channels} channel(s); re-export the model")
                return image
            done, total = (int(v) for v in result.as_numpy("progress"))
            log.debug("server-side loop: step %d/%d", done, total)
            if progress is not None:
                progress(done, total, last - started)

    def _error(self, error: InferenceServerException) -> MedDDPMError:
        """A typed error: what the sampler reported keeps its class; a broken stream is a server error."""
        text = error.message() or str(error)
        where = f"Triton at {self.denoiser.url}, '{self.sampler_name}'"
        if error.status() is not None:  # gRPC itself: the server went away or refused the stream
            return ServerError(f"{where}: the stream broke ({error.status()} {text}); the volume is lost (the "
                               f"server-side loop cannot resume); restart the server and run again")
        kind, _, message = text.partition(": ")
        return REPORTED_ERRORS.get(kind, ModelError)(f"{where}: {message if kind in REPORTED_ERRORS else text}")
