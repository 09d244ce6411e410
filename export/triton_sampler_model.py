"""Triton python-backend model: the whole Med-DDPM sampling loop on the server, its progress streamed.

`python -m export` copies this file to `<name>_sampler/1/model.py`, with the sampling core of the `meddpm` package
(the files meddpm.sampling.sampler_files lists) and the model's manifest beside it: the loop is
`meddpm.sampling.loop.sample`, the one the app runs; only its denoiser differs (`BlsDenoiser`: each step calls the
UNet model through BLS, so the tensors stay inside the server).

Requests and responses follow meddpm.sampling.protocol: one condition and a SamplingRequest in, one response per
step with the progress, then a final one with the volumes. A cancelled request stops before its next step; any
error ends the request with a final response that carries the error. It refuses to load when the
`meddpm` copy's tree hash is not the one its config records (`package_sha256`, written by the export).
"""

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the meddpm copied beside this file, not another
from meddpm.errors import Interrupted, ServerError  # noqa: E402
from meddpm.model.manifest import MANIFEST, PACKAGE_SHA256, SAMPLER_PACKAGE, Manifest, sha256_of  # noqa: E402
from meddpm.model.tensors import CONDITION, INPUTS, PREDICTED_NOISE  # noqa: E402
from meddpm.sampling import protocol  # noqa: E402
from meddpm.sampling.denoiser import Denoiser, NoisePredictor  # noqa: E402
from meddpm.sampling.loop import sample  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def checked_exec(request: "pb_utils.InferenceRequest", model_name: str) -> "pb_utils.InferenceResponse":
    """Run a BLS request and check the response it returned (not some other one) for an error."""
    response = request.exec()
    if response.has_error():
        raise ServerError(
            f"UNet model '{model_name}' failed inside the server-side loop: "
            f"{response.error().message()}; check that it is loaded and ready"
        )
    return response


class BlsDenoiser(Denoiser):
    """The UNet model of this server, called through BLS in chunks of its max_batch_size."""

    def __init__(self, model_name: str, max_batch_size: int):
        self.name = f"bls {model_name}"
        self.model_name = model_name
        self.max_batch_size = max_batch_size

    @contextlib.contextmanager
    def conditioned(self, condition: np.ndarray) -> Iterator[NoisePredictor]:
        yield lambda noisy_image, timestep: self._predict(noisy_image, timestep, condition)

    def _predict(self, noisy_image: np.ndarray, timestep: np.ndarray, condition: np.ndarray) -> np.ndarray:
        noise = np.empty_like(noisy_image)
        for start in range(0, len(noisy_image), self.max_batch_size):
            stop = min(start + self.max_batch_size, len(noisy_image))
            tensors = (noisy_image[start:stop], condition[start:stop], timestep[start:stop].reshape(-1, 1))
            request = pb_utils.InferenceRequest(
                model_name=self.model_name,
                requested_output_names=[PREDICTED_NOISE],
                inputs=[pb_utils.Tensor(name, np.ascontiguousarray(a)) for name, a in zip(INPUTS, tensors)],
            )
            output = pb_utils.get_output_tensor_by_name(checked_exec(request, self.model_name), PREDICTED_NOISE)
            if output is None:
                raise ServerError(
                    f"UNet model '{self.model_name}' returned no '{PREDICTED_NOISE}'; serve the model "
                    f"that `python -m export` wrote"
                )
            noise[start:stop] = output.as_numpy()
        return noise


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("the sampler must be decoupled (model_transaction_policy)")
        parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
        # "NAME:4,NAME_openvino:1,...": the UNet entries it may call and their max batch sizes
        self.unet_models = {
            name: int(batch) for name, batch in (entry.rsplit(":", 1) for entry in parameters["unet_models"].split(","))
        }
        folder = os.path.join(args["model_repository"], args["model_version"])
        package = Path(folder, SAMPLER_PACKAGE)
        found, expected = sha256_of(package), parameters.get(PACKAGE_SHA256)
        if found != expected:
            raise pb_utils.TritonModelException(
                f"{package}: tree SHA-256 {found}, but config.pbtxt records {PACKAGE_SHA256} {expected or 'none'}: "
                f"the package changed after export; re-run `python -m export` into this model repository and load "
                f"the model again"
            )
        self.preset = Manifest.read(Path(folder, MANIFEST)).preset

    def execute(self, requests):
        for request in requests:
            self.serve(request)
        return None

    def serve(self, request) -> None:
        """Run one request's loop; whatever happens, its last response carries the final flag."""
        sender = request.get_response_sender()
        try:
            sampling, unet_model = protocol.decode_request(
                json.loads(request.parameters() or "{}"), list(self.unet_models)
            )
            condition = pb_utils.get_input_tensor_by_name(request, CONDITION).as_numpy()
            stop = threading.Event()
            if sender.is_cancelled():
                raise Interrupted("cancelled before the first step")

            def progress(done: int, total: int, elapsed: float) -> None:
                if sender.is_cancelled():
                    stop.set()  # the loop ends before its next step
                    return
                done_of_total = np.array([done, total], np.int32)
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor(protocol.PROGRESS, done_of_total)]))

            started = time.monotonic()
            image = sample(
                BlsDenoiser(unet_model, self.unet_models[unet_model]),
                condition,
                sampling,
                self.preset,
                progress=progress,
                stop=stop,
            )
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor(protocol.IMAGE, image)]), flags=FINAL)
            pb_utils.Logger.log_verbose(
                f"{sampling.samples} sample(s), {sampling.steps} steps in {time.monotonic() - started:.2f} s"
            )
        except Exception as error:
            message = protocol.error_message(error)
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)
