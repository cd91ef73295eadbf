"""Per-layer sparsity recipes: a mapping of layer FQN or ``re:`` pattern -> sparsity.

A config file is JSON (``.json``) or YAML (``.yaml`` / ``.yml``, read with PyYAML when it
is installed) holding one mapping, e.g. ``{"classifier": 0.3, "re:^features\\.": 0.9}``.
:func:`layer_sparsities` resolves it against the prunable layers: an exact FQN wins over a
pattern, otherwise the first matching pattern in file order; an entry that names no
prunable layer is an error (a typo would otherwise leave layers silently at the default).
Layers the config does not name are pruned at the run's ``sparsity``.

Example:
    >>> from torch import nn
    >>> from .targets import find_targets
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> layer_sparsities(find_targets(model), {"re:^[0-9]$": 0.5, "2": 0.25})
    {'0': 0.5, '2': 0.25}
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from .masks import check_sparsity
from .targets import PruneError, Target


def load_sparsity_config(path: str | Path) -> dict[str, float]:
    """Read a JSON or YAML config file into ``{pattern: sparsity}`` (values checked)."""
    path = Path(path)
    if not path.is_file():
        raise PruneError(f"sparsity config {path} does not exist: give a JSON or YAML file of layer -> sparsity")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise PruneError(f"reading {path} needs PyYAML: pip install pyyaml, or write the config as JSON") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise PruneError(f"sparsity config {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise PruneError(f"sparsity config {path} is not valid JSON ({err.msg}, line {err.lineno}): "
                             "write e.g. {\"layer1.0.conv1\": 0.5, \"re:^fc\": 0.2}") from None
    return check_config(raw, str(path))


def check_config(raw: object, where: str = "the sparsity config") -> dict[str, float]:
    """``raw`` as ``{pattern: sparsity}``: a non-empty mapping of strings to sparsities in [0, 1)."""
    if not isinstance(raw, Mapping) or not raw:
        raise PruneError(f"{where} must be a non-empty mapping of layer FQN or re:PATTERN -> sparsity")
    config = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not key:
            raise PruneError(f"{where}: key {key!r} is not a layer name: use a layer FQN or re:PATTERN")
        if key.startswith("re:"):
            try:
                re.compile(key[3:])
            except re.error as err:
                raise PruneError(f"{where}: pattern {key!r} is not a valid regular expression ({err})") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PruneError(f"{where}: the sparsity of {key!r} is {value!r}, not a number in [0, 1) "
                             "(N:M patterns go in --sparsity, for every layer)")
        try:
            config[key] = check_sparsity(value)
        except PruneError as err:
            raise PruneError(f"{where}: {key!r}: {err}") from None
    return config


def _matches(pattern: str, fqn: str) -> bool:
    return bool(re.search(pattern[3:], fqn)) if pattern.startswith("re:") else pattern == fqn


def layer_sparsities(targets: list[Target], config: Mapping[str, float]) -> dict[str, float]:
    """``{fqn: sparsity}`` for the prunable layers the config names (see the module doc)."""
    config = check_config(dict(config))
    fqns = [t.fqn for t in targets]
    for pattern in config:
        if not any(_matches(pattern, f) for f in fqns):
            near = ", ".join(fqns[:4]) + (", ..." if len(fqns) > 4 else "")
            raise PruneError(f"sparsity config entry {pattern!r} names no prunable layer (the layers are {near}): "
                             "fix the name or the re: pattern")
    resolved = {}
    for fqn in fqns:
        if fqn in config:
            resolved[fqn] = config[fqn]
            continue
        hit = next((p for p in config if p.startswith("re:") and _matches(p, fqn)), None)
        if hit is not None:
            resolved[fqn] = config[hit]
    return resolved


def config_selects(config: Mapping[str, float] | None, fqn: str) -> bool:
    """Whether a config entry names ``fqn`` (used to let a named output head be pruned)."""
    return bool(config) and any(_matches(p, fqn) for p in config)
