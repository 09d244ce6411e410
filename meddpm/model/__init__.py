"""The model: presets, the 3D UNet and its tensors, checkpoints, the noise schedule, the manifest."""
