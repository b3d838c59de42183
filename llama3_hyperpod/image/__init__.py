"""Build the project's container image (neuron | cpu | cuda) through the Docker API: Docker Engine or podman."""
