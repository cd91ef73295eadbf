"""The settings object of ``prune --method`` from its command-line options (shared by the image and HF paths)."""

from __future__ import annotations

from ..prune.methods import FisherOptions, PruneMethod
from ..prune.obs import ObsOptions


def method_options(method: PruneMethod, fisher_samples: int | None, fisher_batch: int, damp: float, block_size: int,
                   obs_update: bool, max_memory_gb: float, seed: int, allocation: str, damping: float
                   ) -> FisherOptions | ObsOptions | None:
    """The settings object of ``--method`` from its command-line options (None for the others)."""
    if method.reconstructs:
        return ObsOptions(allocation=allocation, damping=damping, block_size=block_size)
    if method.needs_labels:
        return FisherOptions(num_grads=fisher_samples, group_size=fisher_batch, damp=damp, block_size=block_size,
                             obs_update=obs_update, max_memory_gb=max_memory_gb, seed=seed)
    return None


def fisher_settings(method: PruneMethod, options: FisherOptions) -> dict | None:
    """The report's ``fisher`` entry (``seed``: the seed of the image path's gradient-sample draw)."""
    if not method.needs_labels:
        return None
    settings = {"samples": options.num_grads, "seed": options.seed + 1}
    if method is PruneMethod.WOODFISHER:
        settings.update(batch=options.group_size, damp=options.damp, block_size=options.block_size,
                        obs_update=options.obs_update)
    return settings
