"""Med-DDPM core: presets, the 3D UNet, checkpoints, schedules, sampling, geometry and phantoms."""
