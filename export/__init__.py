"""Export a Med-DDPM checkpoint into a verified Triton model repository (`python -m export --help`)."""
