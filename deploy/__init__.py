"""Running meddpm-deploy for real: a local Triton server for development and tests, containers, Kubernetes."""
