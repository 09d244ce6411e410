"""Med-DDPM core, in layers (each imports only those below it; docs/architecture.md draws them):

mask_inputs          what an input path holds, and reading each mask (NIfTI, or DICOM when there is any)
dicom | backends     DICOM reader, writer, PACS, phantom studies | denoisers: ONNX Runtime, OpenVINO, PyTorch, Triton
imaging | sampling   label masks, geometry, memory | the sampling loop, schedulers, request, protocol
model                presets, the UNet and its tensors, checkpoints, schedule, manifest, model repository
atomic | retry | choices | names, errors
"""

__version__ = "0.1.0"  # the project's version (pyproject.toml reads it)
