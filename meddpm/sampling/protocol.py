"""The server-side loop's wire protocol, between the app's client (meddpm.backends.triton_client.server_loop) and the
`<name>_sampler` model inside Triton (export/triton_sampler_model.py).

One decoupled request per sampling run: input `condition` (meddpm.model.tensors.CONDITION), float32 (L, D, H, W);
parameters: the SamplingRequest's fields and the UNet entry to call. Responses: PROGRESS, int32 [done, total], after
every step, then IMAGE, float32 (samples, C, D, H, W), with the final flag. An error ends the request as its final
response, its message led by the error's class name, so that the client raises the same type (and exit code).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from meddpm.choices import parse_choice
from meddpm.errors import ConfigurationError, Interrupted, MedDDPMError, ModelError, ServerError
from meddpm.model.presets import Scheduler
from meddpm.sampling.request import SamplingRequest

PROGRESS, IMAGE = "progress", "image"
UNET_MODEL = "unet_model"
PARAMETERS: dict[str, type] = {"scheduler": str, "steps": int, "seed": int, "samples": int, UNET_MODEL: str}
REPORTED_ERRORS = {cls.__name__: cls for cls in (ConfigurationError, ModelError, ServerError, Interrupted)}


def encode_request(request: SamplingRequest, unet_model: str) -> dict[str, str | int]:
    """The request's parameters."""
    return {
        "scheduler": str(request.scheduler),
        "steps": request.steps,
        "seed": request.seed,
        "samples": request.samples,
        UNET_MODEL: unet_model,
    }


def decode_request(given: Mapping[str, Any], unet_models: Sequence[str]) -> tuple[SamplingRequest, str]:
    """A request's parameters, typed and checked: the sampling request and the UNet entry it calls."""
    missing = [name for name in PARAMETERS if name not in given]
    if missing:
        raise ConfigurationError(
            f"request parameters {', '.join(missing)} are missing; send all of {', '.join(PARAMETERS)}"
        )
    try:
        values = {name: kind(given[name]) for name, kind in PARAMETERS.items()}
        scheduler = parse_choice(Scheduler, values["scheduler"], "scheduler")
    except ValueError as error:
        raise ConfigurationError(
            f"a request parameter is wrong ({error}); types: "
            f"{', '.join(f'{n} {k.__name__}' for n, k in PARAMETERS.items())}"
        ) from None
    if values[UNET_MODEL] not in unet_models:
        raise ConfigurationError(
            f"{UNET_MODEL} '{values[UNET_MODEL]}' is not a serving of this model; choose one of "
            f"{', '.join(unet_models)}"
        )
    return SamplingRequest(scheduler, values["steps"], values["seed"], values["samples"]), values[UNET_MODEL]


def error_message(error: Exception) -> str:
    """The final response's error text (server side)."""
    if isinstance(error, MedDDPMError):
        return f"{type(error).__name__}: {error}"
    return f"internal error in the server-side loop: {type(error).__name__}: {error}"


def reported_error(text: str, where: str) -> MedDDPMError:
    """The error a final response reported, as its own type (client side)."""
    kind, _, message = text.partition(": ")
    if kind in REPORTED_ERRORS:
        return REPORTED_ERRORS[kind](f"{where}: {message}")
    return ModelError(f"{where}: {text}")
