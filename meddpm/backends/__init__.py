"""The denoisers behind `meddpm.sampling.denoiser.Denoiser`: OpenVINO (the CPU default) and ONNX Runtime (CUDA) in
process, PyTorch, Triton."""
