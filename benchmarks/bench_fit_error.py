"""CPU seconds of the per-layer relative errors (before and after a refit) over resnet18's layer shapes.

For each conv/linear of torchvision resnet18 (``n = d_in + 1`` columns, ``out`` rows): a random
Gram matrix, two weights at 90% sparsity on the same support (before and after a refit: zeros stay
zeros), and the residual terms formed the way ``Gram.relative_error`` did before (one dense ``W G``
product per weight), by block products over the upper triangle of ``G`` (both weights stacked) and
by :func:`prune_repair.engine.refit.fit_error.relative_errors` as it chooses (block products, or over
each row's support for sparse wide layers). Process CPU time, 1 thread.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_fit_error.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from prune_repair.engine.refit.fit_error import quadratic_forms, relative_errors

RESNET18 = ([(148, 64)] + [(577, 64)] * 4 + [(577, 128), (1153, 128), (65, 128), (1153, 128), (1153, 128)]
            + [(1153, 256), (2305, 256), (129, 256), (2305, 256), (2305, 256)]
            + [(2305, 512), (4609, 512), (257, 512), (4609, 512), (4609, 512), (513, 1000)])


def one_run(sparsity: float) -> tuple[float, float, float, float]:
    """Seconds (one product each, block products, as chosen) and the largest relative gap to the first."""
    old_s = block_s = new_s = gap = 0.0
    for n, out in RESNET18:
        X = torch.randn(n + 50, n, dtype=torch.float64)
        G, C = (X.T @ X)[None], torch.randn(1, n, out, dtype=torch.float64)
        yy = (X @ torch.randn(n, out, dtype=torch.float64)).square().sum(0) * 2
        w = torch.randn(2, 1, out, n, dtype=torch.float64) * (torch.rand(1, 1, out, n) >= sparsity)
        t = time.process_time()
        old = torch.stack([((yy.sum() - 2 * (w[k] * C.transpose(1, 2)).sum() + (torch.bmm(w[k], G) * w[k]).sum())
                            / yy.sum()).clamp_min(0).sqrt() for k in range(2)])
        old_s += time.process_time() - t
        t = time.process_time()
        quad = quadratic_forms(w, G, by_rows=False)
        block_s += time.process_time() - t
        t = time.process_time()
        new = relative_errors(w, G, C, yy)
        new_s += time.process_time() - t
        gap = max(gap, float(((new - old).abs() / old).max()), float(((quad - quadratic_forms(w, G)) / quad).abs().max()))
    return old_s, block_s, new_s, gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for r in range(args.repeats):
        old_s, block_s, new_s, gap = one_run(args.sparsity)
        print(f"repeat {r}: one product per weight {old_s:.2f} s, block products {block_s:.2f} s, as chosen "
              f"{new_s:.2f} s ({old_s / new_s:.2f}x), largest relative gap {gap:.1e}")


if __name__ == "__main__":
    main()
