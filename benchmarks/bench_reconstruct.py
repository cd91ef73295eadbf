"""Speed and effect of reconstruction (engine/reconstruct.py) and the OBS pruner (prune/obs.py).

Prints, not a test:
1. the masked solve of a Conv2d(512, 512, 3) layer (512 rows x 4608 weights) at 50/90/95%
   global-magnitude-like sparsity (random weights, a Gram matrix of 6000 random patch rows),
   by the default path choice and, side by side, by one Cholesky factorization per row,
   and the Gram accumulation of that layer on a (16, 512, 14, 14) input;
2. zoo models (mnist-cnn, mnist-cnn-bn, mnist-mlp) at 95% global magnitude sparsity with
   1024 calibration samples: accuracy on mnist:test of dense / pruned / reconstructed /
   obs_prune_(global), and the seconds reconstruct_ and obs_prune_ take.

Usage: .venv/bin/python benchmarks/bench_reconstruct.py [--threads 2] [--sparsities 0.5,0.9,0.95]
       [--skip-solve] [--skip-zoo]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn


def bench_solve(sparsities: list[float]) -> None:
    from prune_repair.engine.refit.gram import Gram
    from prune_repair.engine.refit.ridge import masked_ridge

    torch.manual_seed(0)
    conv = nn.Conv2d(512, 512, 3, padding=1)
    x = torch.randn(16, 512, 14, 14)
    gram = Gram.for_layer(conv)
    t = time.perf_counter()
    with torch.no_grad():
        gram.add(x, conv(x))
    print(f"Gram accumulation, Conv2d(512, 512, 3) on {tuple(x.shape)} ({gram.rows} rows): "
          f"{time.perf_counter() - t:.2f} s", flush=True)
    d, m = 4608, 512
    X = torch.randn(6000, d + 1, dtype=torch.float64)
    X[:, -1] = 1.0
    G = (X.T @ X)[None]
    C = (X.T @ torch.randn(6000, m, dtype=torch.float64))[None]
    for sparsity in sparsities:
        w = torch.randn(m, d)
        k = int(sparsity * w.numel())
        mask = (w.abs() > w.abs().flatten().kthvalue(k).values)[None] if k else torch.ones(1, m, d, dtype=torch.bool)
        t = time.perf_counter()
        direct = masked_ridge(G, C, mask, method="direct")
        t_direct = time.perf_counter() - t
        t = time.perf_counter()
        sol = masked_ridge(G, C, mask)
        t_auto = time.perf_counter() - t
        gap = float((sol.weight - direct.weight).norm() / direct.weight.norm())
        print(f"masked solve 512 x 4608 at {sparsity:.0%} sparsity: {t_auto:.2f} s, one Cholesky per row "
              f"{t_direct:.2f} s ({t_direct / t_auto:.1f}x), relative difference {gap:.1e} "
              f"(complement rows {sol.complement_rows}, iterative rows {sol.iterative_rows} in {sol.iterations} iterations, damping {sol.damping:g})", flush=True)


def bench_zoo(calib: int = 1024, sparsity: float = 0.95) -> None:
    from prune_repair import zoo
    from prune_repair.metrics.classify import evaluate
    from prune_repair.engine.refit.reconstruct import reconstruct_
    from prune_repair.io.data import calibration_batch, load_dataset
    from prune_repair.prune import prune_
    from prune_repair.prune.obs import obs_prune_

    xtr, ytr = load_dataset("mnist:train")
    xte, yte = load_dataset("mnist:test")
    xb = calibration_batch(xtr, ytr, calib, seed=0)[0]
    print(f"\nzoo at {sparsity:.0%} global magnitude sparsity, {calib} calibration samples, mnist:test accuracy")
    print(f"{'model':14s} {'dense':>7s} {'pruned':>7s} {'recon':>7s} {'t_recon':>8s} {'obs':>7s} {'t_obs':>7s}")
    for name in ("mnist-cnn", "mnist-cnn-bn", "mnist-mlp"):
        reference = zoo.load(name)
        model = copy.deepcopy(reference)
        prune_(model, sparsity, method="global-magnitude")
        dense, pruned = evaluate(reference, xte, yte)["acc"], evaluate(model, xte, yte)["acc"]
        t = time.perf_counter()
        reconstruct_(model, reference, xb)
        t_recon = time.perf_counter() - t
        recon = evaluate(model, xte, yte)["acc"]
        obs_model = copy.deepcopy(reference)
        t = time.perf_counter()
        obs_prune_(obs_model, xb, sparsity, allocation="global")
        t_obs = time.perf_counter() - t
        obs = evaluate(obs_model, xte, yte)["acc"]
        print(f"{name:14s} {dense:7.4f} {pruned:7.4f} {recon:7.4f} {t_recon:7.2f}s {obs:7.4f} {t_obs:6.2f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sparsities", default="0.5,0.9,0.95")
    parser.add_argument("--skip-solve", action="store_true")
    parser.add_argument("--skip-zoo", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_solve:
        bench_solve([float(s) for s in args.sparsities.split(",")])
    if not args.skip_zoo:
        bench_zoo()


if __name__ == "__main__":
    main()
