"""Exact repair over several calibration batches: lockstep passes vs per-site passes (issue 9).

Times, side by side in one run, in units of one plain forward of the whole calibration set
(64 samples; the same set as 4 plain forwards of 16 is shown too): the exact repair (measure + correct + fold; the goal statistics are collected
beforehand and not timed) with one batch of 64, with 4 batches of 16 in lockstep (one pass
per batch, the default) and with 4 batches of 16 per site (one prefix pass per site and
batch). Medians over ``--repeats``, the cases interleaved within each repeat.

    python benchmarks/bench_multibatch.py
    python benchmarks/bench_multibatch.py --repeats 7 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision
from torch import nn

import prune_repair as pr
from prune_repair import zoo


def models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    return {
        "resnet18 (64x64, random init)": (resnet, torch.randn(64, 3, 64, 64)),
        "zoo mnist-cnn-bn (28x28)": (zoo.load("mnist-cnn-bn").eval(), torch.randn(64, 1, 28, 28)),
    }


def pruned(model: nn.Module, sparsity: float = 0.9) -> nn.Module:
    out = copy.deepcopy(model)
    layers = [m for m in out.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    scores = torch.cat([m.weight.detach().abs().flatten() for m in layers])
    threshold = scores.kthvalue(int(sparsity * scores.numel())).values
    with torch.no_grad():
        for m in layers:
            m.weight.mul_(m.weight.abs() > threshold)
    return out


def run_case(model: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, tuple[float, int]]:
    goal = pr.collect_stats(model, x)
    operated = pruned(model)
    quarters = list(x.split(16))
    runs = {
        "repair 1x64": lambda m: pr.repair_(m, goal, x),
        "repair 4x16 lockstep": lambda m: pr.repair_(m, goal, quarters, passes="lockstep"),
        "repair 4x16 per-site": lambda m: pr.repair_(m, goal, quarters, passes="per-site"),
    }
    times: dict[str, list[float]] = {"forward 64": [], "forward 4x16": []}
    passes: dict[str, int] = {"forward 64": 1, "forward 4x16": 1}
    with torch.no_grad():
        model(x)  # warm-up
    for _ in range(repeats):
        for name, parts in (("forward 64", [x]), ("forward 4x16", quarters)):
            start = time.perf_counter()
            with torch.no_grad():
                for part in parts:
                    model(part)
            times[name].append(time.perf_counter() - start)
        for name, fn in runs.items():
            m = copy.deepcopy(operated)
            start = time.perf_counter()
            report = fn(m)
            times.setdefault(name, []).append(time.perf_counter() - start)
            passes[name] = report.passes
    return {name: (statistics.median(t), passes[name]) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'model':32} {'run':22} {'ms':>9} {'x forward':>10} {'passes':>7}")
    for label, (model, x) in models().items():
        results = run_case(model, x, args.repeats)
        base = results["forward 64"][0]
        for name, (seconds, passes) in results.items():
            print(f"{label:32} {name:22} {1e3 * seconds:9.1f} {seconds / base:10.2f} {passes:7d}")


if __name__ == "__main__":
    main()
