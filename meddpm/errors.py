"""The project's exception family: every message says what was wrong and how to fix it."""


class MedDDPMError(Exception):
    """Base class; the command-line entry points turn it into a message and an exit code."""

    exit_code = 1


class ConfigurationError(MedDDPMError):
    """A setting, flag or preset is invalid."""

    exit_code = 2


class InputError(MedDDPMError):
    """A user-supplied file (mask, image) cannot be used."""

    exit_code = 3


class OutputError(MedDDPMError):
    """An output folder or file cannot be written where it was asked for."""

    exit_code = 2


class CheckpointError(MedDDPMError):
    """A checkpoint cannot be read or does not fit the preset."""

    exit_code = 4


class ModelError(MedDDPMError):
    """An exported model is missing, unreadable, or does not match what the caller expects."""

    exit_code = 5


class ExportVerificationError(ModelError):
    """The exported graph does not compute what the PyTorch model computes."""


class ServerError(MedDDPMError):
    """The inference server cannot be reached, or stopped answering and did not come back."""

    exit_code = 6


class PacsError(MedDDPMError):
    """A PACS refused the association or an instance, or stayed unreachable through the retries."""

    exit_code = 7


class Interrupted(MedDDPMError):
    """The run was stopped by Ctrl-C or SIGTERM."""

    exit_code = 130
    while_starting = "stopped by Ctrl-C or SIGTERM while starting; no mask was started, nothing was written"
