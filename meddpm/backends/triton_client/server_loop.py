"""The whole sampling loop on a Triton server (the `<name>_sampler` model), its progress streamed over gRPC.

One request carries the condition and the SamplingRequest (meddpm.sampling.protocol); the server runs
`meddpm.sampling.loop.sample`, the loop the app runs, with the UNet called through BLS, and streams the progress
after every step, then the volumes. Same seeds and settings give the same volumes as the client-side loop: the
client checks first that the server's copy of the sampling core is its own. Setting `stop` (Ctrl-C) or a server
that stays silent past the deadline cancels the request, which stops the server's loop before its next step.
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

from meddpm.backends.triton_client.client import TritonDenoiser
from meddpm.backends.triton_client.shared_memory import CONTROL_TIMEOUT_S
from meddpm.errors import Interrupted, MedDDPMError, ModelError, ServerError
from meddpm.model.manifest import PACKAGE_SHA256
from meddpm.model.presets import Preset
from meddpm.model.served_model import Entry
from meddpm.model.tensors import CONDITION
from meddpm.sampling import protocol, sampler_files
from meddpm.sampling.loop import Progress
from meddpm.sampling.request import SamplingRequest

log = logging.getLogger(__name__)


class TritonServerLoop:
    """`sample` with the signature of `meddpm.sampling.loop.sample` (less the denoiser), run inside the server.

    `denoiser` has found and checked the UNet model the server-side loop calls; its policy's deadline bounds
    the wait for each response (a step, or the final volumes).
    """

    def __init__(self, denoiser: TritonDenoiser):
        self.denoiser = denoiser
        self.sampler_name = denoiser.model.name + Entry.SAMPLER
        self.name = f"triton {self.sampler_name} (server-side loop, UNet {denoiser.served_name})"
        self._check_sampling_code()
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
        denoiser.model.check_served_hash(
            config.parameters, PACKAGE_SHA256, f"Triton model '{self.sampler_name}' at {denoiser.url}"
        )
        log.info(
            "Triton at %s: sampling loop on the server (%s calling %s)",
            denoiser.url,
            self.sampler_name,
            denoiser.served_name,
        )

    def _check_sampling_code(self) -> None:
        """The exported sampling core must be this app's, or the server's volumes would differ from the app's."""
        exported, own = self.denoiser.model.manifest.sampler_package, sampler_files.code_sha256()
        if exported.sha256 != own:
            raise ModelError(
                f"{self.denoiser.model.manifest_path}: the server-side loop '{self.sampler_name}' was exported with "
                f"the sampling code of meddpm-deploy {exported.version} (tree SHA-256 {exported.sha256}), and this "
                f"app's differs ({own}); re-export the model with this version (`python -m export`) and reload it, "
                f"or use --triton-loop client"
            )
        self.denoiser.model.verified[f"{self.sampler_name} sampling code, against this app's"] = own

    def sample(
        self,
        condition: np.ndarray,
        request: SamplingRequest,
        preset: Preset,
        *,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
    ) -> np.ndarray:
        """Synthesise the request's samples for one condition (L, D, H, W): (samples, C, D, H, W)."""
        request.check(preset.schedule)
        events: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.denoiser.url)  # one stream per client: a client per run
        request_id = uuid.uuid4().hex[:12]
        finished = False
        try:
            client.start_stream(callback=lambda result, error: events.put((result, error)))
            tensor = grpcclient.InferInput(CONDITION, list(condition.shape), "FP32")
            tensor.set_data_from_numpy(np.ascontiguousarray(condition, dtype=np.float32))
            client.async_stream_infer(
                self.sampler_name,
                [tensor],
                request_id=request_id,
                parameters=protocol.encode_request(request, self.denoiser.served_name),
            )
            image = self._receive(events, request, preset.out_channels, progress, stop)
            finished = True
            return image
        finally:
            client.stop_stream(cancel_requests=not finished)  # an unfinished request is cancelled on the server
            client.close()

    def _receive(
        self,
        events: queue.Queue,
        request: SamplingRequest,
        out_channels: int,
        progress: Progress | None,
        stop: threading.Event | None,
    ) -> np.ndarray:
        """Progress responses until the one with the volumes; raises on an error, a stop or a silent server."""
        started = last = time.monotonic()
        done, steps = 0, request.steps
        deadline = self.denoiser.policy.deadline_s
        while True:
            if stop is not None and stop.is_set():
                raise Interrupted(
                    f"stopped at step {done + 1} of {steps}; the server-side loop was cancelled and nothing was written"
                )
            try:
                result, error = events.get(timeout=0.25)
            except queue.Empty:
                if time.monotonic() - last > deadline:
                    raise ServerError(
                        f"Triton at {self.denoiser.url}: the server-side loop sent nothing for {deadline:.0f} s "
                        f"after step {done} of {steps}; the request was cancelled; check the server, or raise "
                        f"--triton-deadline"
                    ) from None
                continue
            last = time.monotonic()
            if error is not None:
                raise self._error(error)
            image = result.as_numpy(protocol.IMAGE)
            if image is not None:
                if image.shape[:2] != (request.samples, out_channels):
                    raise ModelError(
                        f"'{self.sampler_name}' returned volumes of shape {image.shape} for "
                        f"{request.samples} sample(s) of {out_channels} channel(s); re-export the model"
                    )
                return image
            done, total = (int(v) for v in result.as_numpy(protocol.PROGRESS))
            log.debug("server-side loop: step %d/%d", done, total)
            if progress is not None:
                progress(done, total, last - started)

    def _error(self, error: InferenceServerException) -> MedDDPMError:
        """A typed error: what the sampler reported keeps its class; a broken stream is a server error."""
        text = error.message() or str(error)
        where = f"Triton at {self.denoiser.url}, '{self.sampler_name}'"
        if error.status() is not None:  # gRPC itself: the server went away or refused the stream
            return ServerError(
                f"{where}: the stream broke ({error.status()} {text}); the volume is lost (the "
                f"server-side loop cannot resume); restart the server and run again"
            )
        return protocol.reported_error(text, where)
