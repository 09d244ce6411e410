"""The denoisers behind `meddpm.sampling.denoiser.Denoiser`: ONNX Runtime in process, PyTorch, Triton."""
