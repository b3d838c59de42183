"""Llama 3 training on Trainium with SageMaker HyperPod: the container image's command line and its backends."""

# The release, also in pyproject.toml (a unit test keeps them equal): the image runs the package from /opt/app without
# installing it, so the CLI cannot ask the installed metadata.
__version__ = "0.1.0"
