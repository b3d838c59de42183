"""NxDT's config semantics by Hydra itself: compose a YAML with overrides exactly as NxDT's orchestrator does.

NxDT's training_orchestrator.py is `@hydra.main(config_path=..., config_name=..., version_base="1.2")`, so what a user
may write after the config is Hydra's override grammar with struct rules (`key=` only for keys the YAML has, `+key=`
to add, `++key=` to set or add, `~key` to delete, quoting for `,` `(` `)` ...). The project composes with the same
hydra-core (the lock pins NxDT's 1.3.2) through its public compose API, so `plan` accepts what NxDT accepts, and
every override the plan emits is written with `hydra_value` so Hydra reads back the exact value.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from llama3_hyperpod.errors import ConfigError

_KEY = re.compile(r"^[+~]{0,2}([A-Za-z_][\w.\-/@]*)")


def override_key(item: str) -> str:
    """The dotted key an override names ('override' when it names none), for error messages."""
    match = _KEY.match(item.strip())
    return match.group(1) if match else "override"


def parse(items: Sequence[str]) -> list[Any]:
    """Hydra's own parse of each override; a syntax error is one ConfigError naming the key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for item in items:
        try:
            parsed.extend(parser.parse_overrides([item]))
        except OverrideParseException as exc:
            lines = [ln.strip() for ln in str(exc).splitlines()]
            detail = next((ln for ln in lines if ln and not ln.startswith(("Error parsing", "See "))), "")
            if "missing EQUAL" in detail:
                detail = "it must look like key=value"
            key = override_key(item)
            hint = ""
            if "=" in item and key != "override":
                quoted = hydra_value(item.split("=", 1)[1])
                hint = f"; quote a value holding , ( ) [ ] {{ }} = or quotes: {key}={quoted}"
            raise ConfigError(key, f"override {item!r} is not valid Hydra syntax ({detail}){hint}") from None
    return parsed


def compose(config_path: Path, overrides: Sequence[str]) -> DictConfig:
    """The config NxDT's orchestrator would receive for `config_path` and `overrides` (interpolations unresolved)."""
    from hydra.errors import HydraException

    parse(overrides)  # syntax errors first, each naming its override
    try:
        return _compose(config_path, list(overrides))
    except (HydraException, ValueError) as exc:
        failing = _first_failing(config_path, list(overrides))
        raise _composition_error(failing, exc) from None


def _compose(config_path: Path, overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_path.parent), version_base="1.2", job_name="llama3_hyperpod"):
        cfg = hydra_compose(config_name=config_path.stem, overrides=overrides)
    assert isinstance(cfg, DictConfig)
    return cfg


def _first_failing(config_path: Path, overrides: list[str]) -> str | None:
    """The override whose addition makes composition fail (None when the YAML alone fails)."""
    from hydra.errors import HydraException

    for i in range(len(overrides) + 1):
        try:
            _compose(config_path, overrides[:i])
        except (HydraException, ValueError):
            return overrides[i - 1] if i else None
    return overrides[-1] if overrides else None


def _composition_error(failing: str | None, exc: Exception) -> ConfigError:
    text = " ".join(str(exc).split())
    if failing is None:
        return ConfigError("CONFIG", f"Hydra cannot load it: {text}")
    key = override_key(failing)
    if text.startswith("Could not override"):
        from llama3_hyperpod import nxdt_keys

        parent, _, leaf = key.rpartition(".")
        near = nxdt_keys.nearest(parent, leaf)
        hint = f" (did you mean '{near}'?)" if near and near != key else ""
        return ConfigError(key, f"is not in the config{hint}; to add a new key write +{failing.lstrip('+')}")
    if text.startswith("Ambiguous value"):
        value = failing.split("=", 1)[1]
        return ConfigError(key, f"{value} is a sweep in Hydra's grammar: quote it ({key}={hydra_value(value)}) "
                                f"or write a list ({key}=[{value}])")
    if text.startswith("Could not append"):
        return ConfigError(key, f"is already in the config: write {failing.lstrip('+')} (or ++{failing.lstrip('+')})")
    if text.startswith("Could not delete"):
        return ConfigError(key, "cannot be deleted: it is not in the config")
    return ConfigError(key, f"override {failing!r} failed in Hydra: {text}")


def hydra_value(value: Any) -> str:
    """`value` written so that Hydra's override grammar reads back exactly `value` (strings are always quoted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple | ListConfig):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{k!s}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    # In a quoted value only backslashes before a quote (or at the end) need escaping. `${...}` stays an
    # interpolation, as it would in the YAML.
    text = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text)
    return f"'{text}'"


def assignment(key: str, value: Any, present: Collection[str]) -> str:
    """`key=value` when the composed config already has `key`, `++key=value` (set or add) otherwise: a plain
    override of a key the YAML lacks fails in Hydra's struct mode."""
    return f"{'' if key in present else '++'}{key}={hydra_value(value)}"


def present_keys(cfg: DictConfig, prefix: str = "") -> frozenset[str]:
    """Every dotted key path of `cfg` (mappings only; list items are values)."""
    keys: set[str] = set()
    for key, value in cfg.items_ex(resolve=False):
        dotted = f"{prefix}{key!s}"
        keys.add(dotted)
        if isinstance(value, DictConfig):
            keys |= present_keys(value, f"{dotted}.")
    return frozenset(keys)
