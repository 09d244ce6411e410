"""Sampling: the one loop, the scheduler registry, the request, the denoiser interface, the server-loop protocol."""
