"""How low collect + exact repair + fold can go: the same call with parts of its work taken out.

``bench_speed_targets.py`` times ``repair_(pruned, collect_stats(model, x), x)`` over one forward.
Here the same call (medians of ``--repeats`` interleaved rounds, CPU time, 1 thread) runs as it is
and with a part replaced, to see what the rest costs, a floor for anything that keeps that part:

- ``no-moments``: the per-channel moments (``stats/channel.py``) return constants; all the rest of
  both passes, the decisions, corrections and fold still run (the weights come out wrong);
- ``no-moments-no-fold``: the fold after the pass skipped as well;
- ``bn-stats``: the moments taken by ``torch.batch_norm_update_stats`` (one fused kernel, float32
  accumulation): what a fast but not float64-grade kernel would give (it fails the precision tests
  of ``tests/test_stats.py``: a what-if, not an option).

``--batch N --size S`` changes the batch (default: the batches of ``bench_speed_targets.py``), which
shows how much of the ratio is fixed per model and per site rather than per sample.

    python benchmarks/bench_repair_floor.py --models convnext_tiny,swin_t --repeats 7
    python benchmarks/bench_repair_floor.py --models convnext_tiny --batch 64 --size 64 --only now
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import prune_repair as pr  # noqa: E402
from bench_speed_targets import build, forward, prune_copy  # noqa: E402

channel = importlib.import_module("prune_repair.engine.stats.channel")
repair_module = importlib.import_module("prune_repair.engine.correct.repair")
MOMENTS, FOLD = channel._shifted_moments, repair_module.fold_correction_


def constant_moments(x: torch.Tensor, rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ones = torch.ones(x.shape[1], dtype=torch.float64, device=x.device)
    return ones, ones.clone()


def bn_moments(x: torch.Tensor, rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
    mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    return mean.to(torch.float64), var.to(torch.float64) * (x.numel() // x.shape[1])


CONFIGS = {"now": (MOMENTS, FOLD), "no-moments": (constant_moments, FOLD),
           "no-moments-no-fold": (constant_moments, lambda *args: None), "bn-stats": (bn_moments, FOLD)}


def floor(name: str, repeats: int, configs: list[str], batch: int | None, size: int | None) -> dict[str, float]:
    model, x = build(name)
    if batch or size:
        x = torch.randn(batch or x.shape[0], 3, size or x.shape[2], size or x.shape[3])
    times: dict[str, list[float]] = {k: [] for k in ["forward", *configs]}
    for round_ in range(repeats + 1):  # the first round warms up
        start = time.process_time()
        forward(model, x)
        times["forward"].append(time.process_time() - start)
        for key in configs:
            channel._shifted_moments, repair_module.fold_correction_ = CONFIGS[key]
            pruned = prune_copy(model)
            try:
                start = time.process_time()
                pr.repair_(pruned, pr.collect_stats(model, x), x)
                times[key].append(time.process_time() - start)
            finally:
                channel._shifted_moments, repair_module.fold_correction_ = MOMENTS, FOLD
    f = statistics.median(times["forward"][1:])
    return {"forward_ms": 1e3 * f, "batch": "x".join(map(str, x.shape)),
            **{k: statistics.median(times[k][1:]) / f for k in configs}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="convnext_tiny,swin_t")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default=",".join(CONFIGS), help=f"configurations, of {', '.join(CONFIGS)}")
    parser.add_argument("--batch", type=int, help="samples per batch (default: bench_speed_targets.py's)")
    parser.add_argument("--size", type=int, help="image side (default: bench_speed_targets.py's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.models.split(","):
        r = floor(name, args.repeats, args.only.split(","), args.batch, args.size)
        print(name, r["batch"], f"forward {r['forward_ms']:.0f} ms",
              {k: f"{v:.2f}x" for k, v in r.items() if k not in ("forward_ms", "batch")}, flush=True)


if __name__ == "__main__":
    main()
