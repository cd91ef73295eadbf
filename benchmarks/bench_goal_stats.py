"""Data-independent goal statistics (rethinking-rebasin G.4) against data-based repair.

Each zoo model is pruned to 90% by global magnitude, then repaired toward goal statistics
from different sources; the test accuracy (mnist:test, 10k) is printed as a markdown table.

Goal sources:
- ``data-64``: ``collect_stats`` of the dense model on the 64-sample calibration batch;
- ``batchnorm``: :func:`~prune_repair.engine.stats.goal.batchnorm_goal` (BN net only; no data);
- ``rec-eval``: :class:`~prune_repair.engine.stats.goal.RecordStats` over ONE pass of the whole
  training set (60k, batches of 256) in eval mode, as one would run after training;
- ``rec-train``: RecordStats of training-mode forwards (gradients on, no optimizer step, so
  the weights stay those of the checkpoint) over the last 200 batches of 256 of one
  epoch: what the wrapper records at the end of training. For the BN net this is the
  training-mode distribution (BN normalizes with batch statistics).

Every repair still measures the PRUNED model on the same 64-sample batch (seed 0 from
mnist:train): only the goal changes. In ``auto`` mode BN sites are reset, which does not
use the goal, so the BN net's ``auto`` column is the same for every source.

Run from the repository root::

    .venv/bin/python benchmarks/bench_goal_stats.py
"""

from __future__ import annotations

import copy
import sys
import time
import warnings

import torch

from prune_repair import zoo
from prune_repair.engine import collect_stats, repair_
from prune_repair.metrics.classify import evaluate
from prune_repair.engine.stats.goal import RecordStats, batchnorm_goal
from prune_repair.io.data import calibration_batch, load_dataset
from prune_repair.prune import prune_

MODELS = ["mnist-cnn-bn", "mnist-cnn", "mnist-mlp"]
SPARSITY = 0.9
CALIB = 64
BATCH = 256
TRAIN_BATCHES = 200


def goals(model, train_x, calib_x):
    out = {"data-64": collect_stats(model, calib_x)}
    try:
        out["batchnorm"] = batchnorm_goal(model, calib_x[:2])
    except ValueError:
        pass
    with RecordStats(model, calib_x[:2], window=None, record="eval") as rec, torch.no_grad():
        model.eval()
        for i in range(0, len(train_x), BATCH):
            model(train_x[i:i + BATCH])
    out["rec-eval"] = rec.stats()
    trainee = copy.deepcopy(model).train()  # its BN running stats move in train mode: a copy
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(1))
    with RecordStats(trainee, calib_x[:2], window=TRAIN_BATCHES) as rec:
        for i in range(0, len(train_x), BATCH):
            trainee(train_x[perm[i:i + BATCH]]).sum()  # forward with grad, no step
    out["rec-train"] = rec.stats()
    return out


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train_x, train_y = load_dataset("mnist:train")
    test_x, test_y = load_dataset("mnist:test")
    calib_x, _ = calibration_batch(train_x, train_y, CALIB, 0)
    rows = []
    for name in MODELS:
        dense = zoo.load(name).eval()
        start = time.perf_counter()
        sources = goals(dense, train_x, calib_x)
        goal_s = time.perf_counter() - start
        pruned = copy.deepcopy(dense)
        prune_(pruned, SPARSITY, "global-magnitude")
        base = {"model": name, "dense": evaluate(dense, test_x, test_y)["acc"],
                "pruned": evaluate(pruned, test_x, test_y)["acc"]}
        for source, goal in sources.items():
            row = {**base, "goal": source}
            for mode in ("repair", "auto"):
                m = copy.deepcopy(pruned)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    repair_(m, goal, calib_x, repair=mode)
                row[mode] = evaluate(m, test_x, test_y)["acc"]
            rows.append(row)
        print(f"{name}: goal statistics in {goal_s:.1f} s", file=sys.stderr)
    print(f"90% global magnitude, test accuracy on mnist:test (10k); the pruned model is measured on "
          f"{CALIB} mnist:train samples (seed 0) in every row\n")
    print("| model | goal stats | dense | pruned | repair | auto |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['goal']} | {100 * r['dense']:.2f} | {100 * r['pruned']:.2f} | "
              f"{100 * r['repair']:.2f} | {100 * r['auto']:.2f} |")


if __name__ == "__main__":
    main()
