"""The pinned Neuron stack, read from versions/neuron.json (the one source of truth), as Dockerfile build args."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO_ROOT / "versions" / "neuron.json"

FLAVORS = ("neuron", "cpu", "cuda")
# Dockerfile ARG that names each flavor's base image.
BASE_IMAGE_ARG = {"neuron": "NEURON_BASE_IMAGE", "cpu": "CPU_BASE_IMAGE", "cuda": "CUDA_BASE_IMAGE"}
# The SDK environment's interpreter per flavor (ENV L3HP_SDK_PYTHON). The neuron one is AWS's (the image builds
# Python 3.12 into /usr/local, Dockerfile.neuronx lines 100-107); cpu/cuda make their own SDK venv.
SDK_PYTHON = {"neuron": "/usr/local/bin/python3.12", "cpu": "/opt/sdk/bin/python", "cuda": "/opt/sdk/bin/python"}
PROJECT_PYTHON = "/opt/venv/bin/python"
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")

# Dockerfile ARG name -> path of its value in neuron.json (the rest of the file is checked inside the build).
NEURON_ARGS: dict[str, tuple[str, ...]] = {
    "NEURON_SDK_VERSION": ("neuron_sdk",),
    "NXDT_GIT_URL": ("nxdt_examples", "git"),
    "NXDT_EXAMPLES_COMMIT": ("nxdt_examples", "commit"),
    "CPU_BASE_IMAGE": ("base_images", "cpu"),
    "CUDA_BASE_IMAGE": ("base_images", "cuda"),
}


@dataclass(frozen=True)
class NeuronVersions:
    """The parsed versions file; `raw` keeps every field for labels and reports."""

    raw: dict[str, Any]

    def get(self, *path: str) -> str:
        node: Any = self.raw
        for key in path:
            if not isinstance(node, dict) or key not in node:
                raise KeyError(f"{VERSIONS_FILE.name}: missing {'.'.join(path)}")
            node = node[key]
        return str(node)

    def digest(self, flavor: str) -> str | None:
        """The base image's recorded manifest digest, or None where none is recorded."""
        value = self.raw.get("base_image_digests", {}).get(flavor)
        if value is None:
            return None
        if not isinstance(value, str) or not DIGEST.match(value):
            raise ValueError(f"{VERSIONS_FILE.name}: base_image_digests.{flavor}={value!r} is not sha256:<64 hex>")
        return value

    def base_image(self, flavor: str) -> str:
        """The flavor's base image reference: tag, plus @digest where one is recorded."""
        ref = self.get("base_images", flavor)
        digest = self.digest(flavor)
        return f"{ref}@{digest}" if digest else ref

    def build_args(self) -> dict[str, str]:
        """Every Dockerfile ARG the versions file defines."""
        args = {arg: self.get(*path) for arg, path in NEURON_ARGS.items()}
        args["NEURON_BASE_IMAGE"] = self.base_image("neuron")
        return args


def load_versions(path: Path = VERSIONS_FILE) -> NeuronVersions:
    return NeuronVersions(json.loads(path.read_text()))


def build_args_for(flavor: str, versions: NeuronVersions) -> dict[str, str]:
    """Build args for one flavor: the Neuron pins only where they are used, the flavor's base image always."""
    args = {BASE_IMAGE_ARG[flavor]: versions.base_image(flavor), "FLAVOR": flavor,
            "TORCH_CPU_INDEX": versions.get("repos", "torch_cpu_index")}
    if flavor == "neuron":
        args.update({k: v for k, v in versions.build_args().items() if k not in BASE_IMAGE_ARG.values()})
    return args
