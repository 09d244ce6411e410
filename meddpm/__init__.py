"""Med-DDPM core, in layers (each imports only those below it; docs/architecture.md draws them):

input_folders        what an input path holds, and reading each mask (NIfTI, or DICOM when there is any)
dicom | backends | synthesis
                     DICOM reader, writer, PACS, phantom studies | denoisers: ONNX Runtime, OpenVINO, PyTorch,
                     Triton | the per-mask pipeline: mask in, volumes on its grid and their record out
imaging | sampling   label masks, geometry, memory | the sampling loop, schedulers, request, protocol
model                presets, the UNet and its tensors, checkpoints, schedule, manifest, served models
output_folders | retry | choices | names, regular_files, errors
"""

__version__ = "0.1.0"  # the project's version (pyproject.toml reads it)
