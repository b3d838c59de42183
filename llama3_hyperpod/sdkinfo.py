"""What the image says about its SDK environment, for code that runs inside it (cache manifest, preflight).

The image records both at build time (Dockerfile, image/sdkcheck.py): the pins it was built against
(`/etc/llama3-hyperpod/neuron.json`, a copy of versions/neuron.json; neuron flavor) and every distribution of the SDK
environment (`/etc/llama3-hyperpod/sdk.json`), which the project's own venv cannot import from. Outside an image the
checkout's versions/neuron.json stands in for the pins and no SDK record exists.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

IMAGE_DIR = Path("/etc/llama3-hyperpod")
CHECKOUT_PINS = Path(__file__).resolve().parents[1] / "versions" / "neuron.json"


def pins_file() -> Path:
    """The versions file in effect: the checkout's when there is one, else the copy baked into the image."""
    return CHECKOUT_PINS if CHECKOUT_PINS.is_file() else IMAGE_DIR / "neuron.json"


def load_pins() -> dict[str, Any]:
    """The parsed versions file; raises OSError / ValueError when it is missing or broken."""
    data = json.loads(pins_file().read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{pins_file()} does not hold a JSON object")
    return data


@cache
def _sdk_distributions() -> dict[str, str]:
    try:
        data = json.loads((IMAGE_DIR / "sdk.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    found = data.get("distributions") if isinstance(data, dict) else None
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def installed_version(dist: str) -> str | None:
    """The version of `dist` in this interpreter's environment, else in the image's SDK environment."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return _sdk_distributions().get(dist.lower().replace("_", "-"))
