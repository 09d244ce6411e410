"""Triton python-backend model: the whole Med-DDPM sampling loop on the server, its progress streamed.

`python -m export` copies this file to `<name>_sampler/1/model.py`, with the project's `meddpm` package and the
model's manifest beside it: the loop is `meddpm.sampling.sample`, the one the app runs; only its denoiser differs
(`BlsDenoiser`: each step calls the UNet model through BLS, so the tensors stay inside the server).

A request carries one condition (L, D, H, W) and the parameters scheduler, steps, seed, samples and unet_model
(sample i uses seed + i, as in the app). The model is decoupled: one response per step with `progress`
[done, total], then a final one with `image` (samples, C, D, H, W). A cancelled request stops before its next
step; any error ends the request with a final response that carries the error. It refuses to load when the
`meddpm` copy's tree hash is not the one its config records (`package_sha256`, written by the export).
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the meddpm copied beside this file, not another
from meddpm.checkpoint import sha256_of  # noqa: E402
from meddpm.denoisers import Denoiser  # noqa: E402
from meddpm.errors import ConfigurationError, Interrupted, MedDDPMError, ServerError  # noqa: E402
from meddpm.presets import Preset  # noqa: E402
from meddpm.sampling import sample  # noqa: E402
from meddpm.served_model import PACKAGE_SHA256, SAMPLER_PACKAGE  # noqa: E402
from meddpm.unet import INPUT_NAMES, OUTPUT_NAME  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
PARAMETERS = {"scheduler": str, "steps": int, "seed": int, "samples": int, "unet_model": str}


def checked_exec(request: "pb_utils.InferenceRequest", model_name: str) -> "pb_utils.InferenceResponse":
    """Run a BLS request and check the response it returned (not some other one) for an error."""
    response = request.exec()
    if response.has_error():
        raise ServerError(f"UNet model '{model_name}' failed inside the server-side loop: "
                          f"{response.error().message()}; check that it is loaded and ready")
    return response


class BlsDenoiser(Denoiser):
    """The UNet model of this server, called through BLS in chunks of its max_batch_size."""

    def __init__(self, model_name: str, max_batch_size: int):
        self.name = f"bls {model_name}"
        self.model_name = model_name
        self.max_batch_size = max_batch_size

    def predict(self, noisy_image: np.ndarray, timestep: np.ndarray, condition: np.ndarray) -> np.ndarray:
        noise = np.empty_like(noisy_image)
        for start in range(0, len(noisy_image), self.max_batch_size):
            stop = min(start + self.max_batch_size, len(noisy_image))
            tensors = (noisy_image[start:stop], condition[start:stop], timestep[start:stop].reshape(-1, 1))
            request = pb_utils.InferenceRequest(
                model_name=self.model_name, requested_output_names=[OUTPUT_NAME],
                inputs=[pb_utils.Tensor(name, np.ascontiguousarray(a)) for name, a in zip(INPUT_NAMES, tensors)])
            output = pb_utils.get_output_tensor_by_name(checked_exec(request, self.model_name), OUTPUT_NAME)
            if output is None:
                raise ServerError(f"UNet model '{self.model_name}' returned no '{OUTPUT_NAME}'; serve the model "
                                  f"that `python -m export` wrote")
            noise[start:stop] = output.as_numpy()
        return noise


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("the sampler must be decoupled (model_transaction_policy)")
        parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
        self.unet_models = parameters["unet_models"].split(",")
        self.unet_max_batch_size = int(parameters["unet_max_batch_size"])
        folder = os.path.join(args["model_repository"], args["model_version"])
        package = Path(folder, SAMPLER_PACKAGE)
        found, expected = sha256_of(package), parameters.get(PACKAGE_SHA256)
        if found != expected:
            raise pb_utils.TritonModelException(
                f"{package}: tree SHA-256 {found}, but config.pbtxt records {PACKAGE_SHA256} {expected or 'none'}: "
                f"the package changed after export; re-run `python -m export` into this model repository and load "
                f"the model again")
        with open(os.path.join(folder, "manifest.json")) as file:
            manifest = json.load(file)
        self.preset = Preset.from_dict(manifest["preset"]["name"], manifest["preset"], source="manifest.json")

    def execute(self, requests):
        for request in requests:
            self.serve(request)
        return None

    def serve(self, request) -> None:
        """Run one request's loop; whatever happens, its last response carries the final flag."""
        sender = request.get_response_sender()
        try:
            settings = self.settings(request)
            condition = pb_utils.get_input_tensor_by_name(request, "condition").as_numpy()
            stop = threading.Event()
            if sender.is_cancelled():
                raise Interrupted("cancelled before the first step")

            def progress(done: int, total: int, elapsed: float) -> None:
                if sender.is_cancelled():
                    stop.set()  # the loop ends before its next step
                    return
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("progress", np.array([done, total], np.int32))]))

            started = time.monotonic()
            seeds = [settings["seed"] + i for i in range(settings["samples"])]
            image = sample(BlsDenoiser(settings["unet_model"], self.unet_max_batch_size), condition,
                           self.preset.out_channels, settings["scheduler"], settings["steps"], self.preset.schedule,
                           seeds, progress, stop)
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("image", image)]), flags=FINAL)
            pb_utils.Logger.log_verbose(f"{len(seeds)} sample(s), {settings['steps']} steps in "
                                        f"{time.monotonic() - started:.2f} s")
        except Exception as error:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(self.message(error))), flags=FINAL)

    def settings(self, request) -> dict:
        """The request's parameters, typed and checked against this model."""
        given = json.loads(request.parameters() or "{}")
        missing = [name for name in PARAMETERS if name not in given]
        if missing:
            raise ConfigurationError(f"request parameters {', '.join(missing)} are missing; send all of "
                                     f"{', '.join(PARAMETERS)}")
        try:
            settings = {name: kind(given[name]) for name, kind in PARAMETERS.items()}
        except ValueError as error:
            raise ConfigurationError(f"a request parameter has the wrong type ({error}); types: "
                                     f"{', '.join(f'{n} {k.__name__}' for n, k in PARAMETERS.items())}") from None
        if settings["unet_model"] not in self.unet_models:
            raise ConfigurationError(f"unet_model '{settings['unet_model']}' is not a serving of this model; "
                                     f"choose one of {', '.join(self.unet_models)}")
        if settings["samples"] < 1:
            raise ConfigurationError(f"samples {settings['samples']}: ask for at least 1")
        return settings

    @staticmethod
    def message(error: Exception) -> str:
        if isinstance(error, MedDDPMError):
            return f"{type(error).__name__}: {error}"
        return f"internal error in the server-side loop: {type(error).__name__}: {error}"
