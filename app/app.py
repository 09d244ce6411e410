"""The MONAI Deploy application: label masks in, synthetic MR volumes out.

    mask_loader --mask--> synthesis --synthesis--> output_writer

Everything that can be checked before the graph runs (model repository, settings, input path) is resolved
into a `SynthesisJob` first, so that a bad setting fails at once with a clear message; inside the graph a
failing mask is reported and the others go on. The DICOM, PACS and Triton modules are imported only when a
setting asks for them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from holoscan.conditions import CountCondition
from monai.deploy.core import Application

from app.mask_loader_operator import MaskLoaderOperator
from app.output_writer_operator import OutputWriterOperator
from app.report import RunReport
from app.settings import RunSettings, help_text, parse_settings
from app.synthesis_operator import SynthesisOperator
from meddpm.backends.in_process import in_process_denoiser
from meddpm.backends.triton_client.options import LoopMode, RetryPolicy, Transport, server_address
from meddpm.dicom.options import DicomOptions, SegmentMap
from meddpm.errors import Interrupted, MedDDPMError, ModelError
from meddpm.imaging.formats import OutputFormat
from meddpm.imaging.masks import MaskInput
from meddpm.imaging.memory import check_fits, check_output_room
from meddpm.input_folders import find_mask_inputs, keep_outputs_apart
from meddpm.model.served_model import ServedModel, find_model
from meddpm.names import printable
from meddpm.output_folders import check_writable, unwritable_folder
from meddpm.sampling.denoiser import Denoiser
from meddpm.sampling.loop import DenoiserLoop
from meddpm.sampling.request import SamplingRequest
from meddpm.synthesis import SynthesisPipeline

if TYPE_CHECKING:
    from meddpm.backends.triton_client.server_loop import TritonServerLoop
    from meddpm.dicom.pacs import PacsExporter

log = logging.getLogger("app")


@dataclasses.dataclass
class SynthesisJob:
    model: ServedModel
    denoiser: Denoiser
    request: SamplingRequest
    batch_size: int
    masks: list[MaskInput]
    output_folder: Path
    rescale: tuple[float, float] | None
    output_formats: tuple[OutputFormat, ...] = (OutputFormat.NIFTI,)
    segment_map: SegmentMap | None = None
    dicom: DicomOptions = DicomOptions()
    pacs: PacsExporter | None = None
    server_loop: TritonServerLoop | None = None  # --triton-loop server: the loop runs inside Triton
    report: RunReport = dataclasses.field(default_factory=RunReport)


class SynthesisApp(Application):
    """Synthesises a brain MRI for each label mask with a Med-DDPM model."""

    def __init__(self, job: SynthesisJob, *args, **kwargs):
        self.job = job
        super().__init__([sys.executable, "app"], *args, **kwargs)

    def compose(self):
        job = self.job
        loader = MaskLoaderOperator(
            self,
            CountCondition(self, len(job.masks)),
            mask_inputs=job.masks,
            output_folder=job.output_folder,
            preset=job.model.preset,
            segment_map=job.segment_map,
            report=job.report,
            name="mask_loader",
        )
        synthesis = SynthesisOperator(
            self,
            pipeline=SynthesisPipeline(job.model, job.server_loop or DenoiserLoop(job.denoiser), job.batch_size),
            request=job.request,
            denoiser=job.denoiser,
            report=job.report,
            output_formats=job.output_formats,
            output_folder=job.output_folder,
            name="synthesis",
        )
        writer = OutputWriterOperator(
            self,
            output_folder=job.output_folder,
            model=job.model,
            rescale=job.rescale,
            formats=job.output_formats,
            dicom=job.dicom,
            pacs=job.pacs,
            report=job.report,
            name="output_writer",
        )
        self.add_flow(loader, synthesis, {(loader.output_name_mask, synthesis.input_name_mask)})
        self.add_flow(synthesis, writer, {(synthesis.output_name_synthesis, writer.input_name_synthesis)})


def prepare_job(argv: list[str]) -> SynthesisJob:
    """Resolve the SDK's paths and our settings into a job, or raise a MedDDPMError saying what to fix."""
    settings, sdk_args = parse_settings(argv[1:])
    try:
        context = Application.init_app_context([argv[0], *sdk_args])
    except OSError as error:  # the SDK makes the output folder as it parses -o
        raise unwritable_folder(error.filename, error) from None
    except ValueError as error:  # the SDK reads every entry's config.pbtxt under -m, whether this run uses it or not
        found = str(error).rstrip(".") + (f" ({error.__cause__})" if error.__cause__ else "")
        raise ModelError(
            f"model repository: {found}; the MONAI Deploy SDK reads the config.pbtxt of every entry, used or not: "
            f"repair that entry (`python -m export` writes it) or move it out of the repository"
        ) from None
    model = find_model(Path(context.model_path), settings.model_name, settings.preset, settings.model_sha256)
    request = SamplingRequest.resolve(
        model.preset.schedule, settings.scheduler, settings.steps, settings.seed, settings.samples
    )
    settings.validate(model.preset, context.triton_server_netloc)
    pacs = make_exporter(settings)
    output_folder = Path(context.output_path)
    masks = keep_outputs_apart(Path(context.input_path), output_folder, find_mask_inputs(Path(context.input_path)))
    check_writable(output_folder)
    check_output_room(output_folder)
    denoiser = make_denoiser(context.triton_server_netloc, model, settings)
    try:
        server_loop = make_server_loop(denoiser) if settings.triton_loop == LoopMode.SERVER else None
    except BaseException:
        denoiser.close()
        raise
    log.info(
        "model %s (preset %s), scheduler %s, %d steps, seeds %s, %d mask(s)",
        model.name,
        model.preset.name,
        request.scheduler,
        request.steps,
        request.seeds,
        len(masks),
    )
    dicom = DicomOptions(settings.dicom_identity, settings.dicom_copy or (), settings.dicom_uid_seed)
    return SynthesisJob(
        model,
        denoiser,
        request,
        settings.batch_size,
        masks,
        output_folder,
        settings.rescale,
        settings.output_format,
        settings.segment_map,
        dicom,
        pacs,
        server_loop,
    )


def make_exporter(settings: RunSettings) -> PacsExporter | None:
    """The PACS destinations configured (C-STORE and/or STOW-RS), or None."""
    if not (settings.pacs_cstore or settings.pacs_stow_url):
        return None
    from meddpm.dicom.pacs import PacsExporter, dicomweb_credentials

    return PacsExporter(
        cstore=settings.pacs_cstore,
        calling_ae=settings.pacs_calling_ae,
        stow_url=settings.pacs_stow_url,
        retries=settings.pacs_retries,
        timeout_s=settings.pacs_timeout,
        deadline_s=settings.pacs_deadline,
        credentials=dicomweb_credentials() if settings.pacs_stow_url else None,
    )


def make_denoiser(triton_url: str | None, model: ServedModel, settings: RunSettings) -> Denoiser:
    """The Triton server when an address is given (TRITON_SERVER_NETLOC / --triton-server-netloc), else in process."""
    if not triton_url:
        denoiser = in_process_denoiser(
            model.onnx_path,
            model.preset,
            settings.backend,
            settings.precision,
            settings.threads,
        )
        try:  # the estimate is calibrated for the runtime that `auto` chose
            batch = min(settings.batch_size, settings.samples)
            check_fits(model.preset, batch, model.onnx_path.stat().st_size, denoiser.runtime)
        except BaseException:
            denoiser.close()
            raise
        return denoiser
    from meddpm.backends.triton_client.client import TritonDenoiser

    policy = RetryPolicy(deadline_s=settings.triton_deadline, window_s=settings.triton_retry_window)
    # The server-side loop moves no tensors per step: no shared memory to set up for it.
    transport = Transport.NETWORK if settings.triton_loop == LoopMode.SERVER else settings.triton_transport
    return TritonDenoiser(server_address(triton_url), model, settings.triton_model, transport, policy)


def make_server_loop(denoiser: Denoiser) -> TritonServerLoop:
    """The sampling loop inside the Triton server whose UNet `denoiser` calls (--triton-loop server)."""
    from meddpm.backends.triton_client.client import TritonDenoiser
    from meddpm.backends.triton_client.server_loop import TritonServerLoop

    assert isinstance(denoiser, TritonDenoiser), "RunSettings.validate: the server-side loop needs a Triton server"
    return TritonServerLoop(denoiser)


def run_graph(app: SynthesisApp, report: RunReport) -> None:
    """Run the graph; Ctrl-C or SIGTERM stop the loop between steps (or the masks not yet started), so that its
    cleanup (a Triton server's shared memory registrations) runs. Holoscan installs its own handler as the graph
    starts, which would end the process after 3 s, so ours is installed again once the graph is running."""
    stop_on_signal(report.stop)
    try:
        finished = app.run_async()
        while not (report.graph_started.wait(0.1) or finished.done()):
            pass
        stop_on_signal(report.stop)
        while True:
            with contextlib.suppress(concurrent.futures.TimeoutError):
                finished.result(timeout=0.5)
                break
    finally:
        app.shutdown_async_executor()


def stop_on_signal(stop: threading.Event, interrupt: bool = False) -> None:
    """Ctrl-C and SIGTERM set `stop`; with `interrupt`, they also raise KeyboardInterrupt where the program is."""

    def handler(signum, frame):
        stop.set()
        if interrupt:
            raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def escape_log_messages() -> None:
    """Escape the control characters of every log message, and log Python's warnings too (a library's warning may
    quote input data): text from input data (a DICOM attribute, a file name) cannot start a line of its own."""
    logging.captureWarnings(True)
    make_record = logging.getLogRecordFactory()

    def make_escaped_record(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        with contextlib.suppress(Exception):  # a malformed call is reported by logging itself, as it would be
            record.msg, record.args = printable(record.getMessage()), None
        return record

    logging.setLogRecordFactory(make_escaped_record)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    escape_log_messages()
    os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "WARN")
    interrupted = threading.Event()
    stop_on_signal(interrupted, interrupt=True)
    try:
        job = prepare_job(argv)
    except BaseException as error:  # a library may have turned the KeyboardInterrupt into an error of its own
        if not interrupted.is_set():
            if not isinstance(error, MedDDPMError):
                raise
            print(f"error: {printable(str(error))}", file=sys.stderr)
            return error.exit_code
    if interrupted.is_set():
        print(f"error: {Interrupted.while_starting}", file=sys.stderr)
        return Interrupted.exit_code
    with job.denoiser:  # closed at the end: a Triton client's connection
        run_graph(SynthesisApp(job), job.report)
    print(job.report.summary())
    for folder in job.report.written.values():
        print(f"synthetic volume(s) and preview in {folder} (preview: {Path(folder) / 'preview.png'})")
    if job.report.stop.is_set():  # by a signal, or by a lost server
        return (job.report.stopped_by or Interrupted).exit_code
    return 1 if job.report.failed else 0
