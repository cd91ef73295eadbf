"""The settings objects of ``prune`` from its command-line options (shared by the image and HF paths)."""

from __future__ import annotations

from typing import Any

from ..engine.correct.settings import RepairSettings
from ..prune.methods import FisherOptions, PruneMethod
from ..prune.settings import PruneSettings
from ..prune.obs import ObsOptions
from ..prune.targets import PruneError
from ..prune.obs_layer import DEFAULT_CANDIDATES, MaskCandidate, parse_candidates


def method_options(method: PruneMethod, fisher_samples: int | None, fisher_batch: int, damp: float, block_size: int,
                   obs_update: bool, max_memory_gb: float, seed: int, allocation: str, damping: float,
                   obs_candidates: str = ",".join(c.value for c in DEFAULT_CANDIDATES), obs_steps: int = 1
                   ) -> FisherOptions | ObsOptions | None:
    """The settings object of ``--method`` from its command-line options (None for the others)."""
    if not method.reconstructs and (obs_steps != 1 or parse_candidates(obs_candidates) != DEFAULT_CANDIDATES):
        raise PruneError(f"--obs-steps and --obs-candidates apply to --method obs, not {method.value}: drop them")
    if method.reconstructs:
        return ObsOptions(allocation=allocation, damping=damping, block_size=block_size,
                          candidates=parse_candidates(obs_candidates), steps=obs_steps)
    if method.needs_labels:
        return FisherOptions(num_grads=fisher_samples, group_size=fisher_batch, damp=damp, block_size=block_size,
                             obs_update=obs_update, max_memory_gb=max_memory_gb, seed=seed)
    return None


def run_settings(*, layers: tuple[str, ...], skip_first: bool, skip_classifier: bool, config: dict | None,
                 prune_head: bool, no_row_floor: bool, include_tied: bool, mode: str, passes: str, offload: str | None,
                 batch_size: int | None, include_classifier: bool, goal: Any, damping: float, **_: Any
                 ) -> tuple[PruneSettings, RepairSettings]:
    """What to prune and how to correct it, from ``prune``'s options (the command's locals; others are ignored)."""
    prune = PruneSettings(select=list(layers) or None, skip_first=skip_first, skip_classifier=skip_classifier,
                          sparsity_config=config, prune_head=prune_head, floor=not no_row_floor,
                          include_tied=include_tied)
    repair = RepairSettings(mode, passes=passes, offload=offload, batch_size=batch_size, progress=True,
                            include_classifier=include_classifier, goal=goal, damping=damping)
    return prune, repair


def fisher_settings(method: PruneMethod, options: FisherOptions) -> dict | None:
    """The report's ``fisher`` entry (``seed``: the seed of the image path's gradient-sample draw)."""
    if not method.needs_labels:
        return None
    settings = {"samples": options.num_grads, "seed": options.seed + 1}
    if method is PruneMethod.WOODFISHER:
        settings.update(batch=options.group_size, damp=options.damp, block_size=options.block_size,
                        obs_update=options.obs_update)
    return settings


OBS_CANDIDATES_HELP = ("obs: masks tried per layer, comma-separated; each is refitted exactly and the lowest output "
                       f"error on the calibration data is kept ({MaskCandidate.describe()}).")
OBS_STEPS_HELP = ("obs: prune in this many steps (gradual one-shot: each removes the same fraction of the weights "
                  "left, refitted to the dense model on the inputs of the model pruned so far); costs that many "
                  "obs passes. Helps at high sparsity (zoo:mnist-vit 90%: 4 steps 89.5% vs 83.7%).")
