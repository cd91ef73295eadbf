"""``--goal-stats FILE|batchnorm`` of ``repair`` and ``prune``: goal statistics without data.

The goal (the unoperated model's per-channel statistics) comes from a file written by
``ActivationStats.save`` / ``RecordStats.save`` or from the reference's BatchNorm layers
instead of a forward pass over ``--data``. ``--data`` is still read: the operated model's
own statistics are measured on the calibration batch (see
:mod:`prune_repair.engine.stats.goal`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..engine.stats.goal import batchnorm_goal, match_goal
from ..engine.correct.modes import RepairMode
from ..engine.run.forward import head
from ..engine.sites.find import find_sites
from ..engine.stats.activation import ActivationStats

BATCHNORM = "batchnorm"


def goal_stats_option(command: Callable) -> Callable:
    return click.option(
        "--goal-stats", "goal_stats", default=None, metavar="FILE|batchnorm",
        help="goal statistics instead of measuring the reference on --data: a file written by "
             "ActivationStats.save / RecordStats.save, or 'batchnorm' to read them from the reference's "
             "BatchNorm layers. --data is still used to measure the operated model.")(command)


def goal_inputs(spec: str | None) -> list[str]:
    """The input files named by ``--goal-stats`` (for the output checks)."""
    return [spec] if spec is not None and spec != BATCHNORM else []


def load_goal(spec: str, model: nn.Module, x: torch.Tensor | dict[str, torch.Tensor], mode: str, include_classifier: bool
              ) -> tuple[ActivationStats, dict[str, Any]]:
    """The goal for ``model`` (the reference / dense model) and its entry in the report."""
    if RepairMode.parse(mode, "correction").reconstructs:
        raise ValueError(f"--repair {mode} refits layers to the reference model's outputs and cannot use "
                         "--goal-stats: drop --goal-stats or use --repair auto/repair/rescale")
    sites = find_sites(model, head(x, 2), include_classifier=include_classifier)
    if spec == BATCHNORM:
        if not any(isinstance(m, _BatchNorm) for m in model.modules()):
            raise ValueError(f"--goal-stats batchnorm reads the goal from BatchNorm layers, and this model has none "
                             f"({_norm_kind(model)}): record the goal to a file with RecordStats / "
                             "ActivationStats.save and pass --goal-stats FILE")
        goal = batchnorm_goal(model, sites=sites)
        return goal, {"source": BATCHNORM, "sites": len(goal)}
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"--goal-stats {spec}: no such file (a file written by ActivationStats.save / "
                         "RecordStats.save, or 'batchnorm')")
    try:
        stored = ActivationStats.load(path)
    except Exception as err:  # not a torch file, unsafe pickle, wrong layout
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--goal-stats {spec} is not a statistics file written by ActivationStats.save / "
                         f"RecordStats.save ({first[:160]})") from None
    known = find_sites(model, head(x, 2), include_classifier=True)
    goal = match_goal(stored, sites, known=known, what=f"--goal-stats {spec}")
    return goal, {"source": str(spec), "sites": len(goal)}


def _norm_kind(model: nn.Module) -> str:
    """What normalizes the model instead of BatchNorm, for the message of a model without it."""
    kinds = [type(m).__name__ for m in model.modules() if "norm" in type(m).__name__.lower()]
    return f"its {kinds[0]}s keep no running statistics" if kinds else "no normalization layer at all"


def goal_note(modes: list[str]) -> str | None:
    """A line for the sites whose correction ignores the goal (``reset`` recomputes BN stats)."""
    reset = sum(m == "reset" for m in modes)
    if not reset:
        return None
    return (f"--goal-stats: {reset} site(s) were reset (BatchNorm statistics recomputed on --data), which does "
            "not use goal statistics; --repair repair corrects toward them")
