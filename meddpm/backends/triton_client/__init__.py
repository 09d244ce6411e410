"""The UNet on a Triton server (client, shared memory) and the whole loop inside it (server_loop)."""
