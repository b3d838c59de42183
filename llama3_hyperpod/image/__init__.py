"""Build the project's container image (neuron | cpu | cuda flavors) through the Docker API (Docker Engine or podman)."""
