"""Per-architecture cost of the engine on torchvision classifiers (issue 9).

For each architecture (random init, eval mode, small input, as in tests/test_architectures.py):
the number of sites, the prunable share of the parameters (``find_targets`` numel / all
parameters), and the time and peak CPU memory of collect + repair (``collect_stats`` of the
dense model, then an exact ``repair_`` of a copy pruned to 50%) as ratios to ONE plain forward
pass (``torch.no_grad``) of the same batch. Medians of ``--repeats`` runs.

Peak memory is measured with the torch profiler (``profile_memory=True``): the running sum of
the CPU allocator's allocation/free events, maximum minus the level at the start, so it counts
tensor memory the operation allocates (tracemalloc would not see torch's allocator).

    python benchmarks/bench_architectures.py                     # float32, batch 32
    python benchmarks/bench_architectures.py --dtype float64 --batch 8 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

import prune_repair as pr

ARCHS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 32),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 64),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), 32),
    "convnext-tiny": (lambda: ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10), 32),
    "vit-tiny": (lambda: VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32,
                                           mlp_dim=64, num_classes=10), 32),
    "swin-tiny": (lambda: SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                          window_size=[2, 2], num_classes=10), 32),
    "densenet-tiny": (lambda: torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16,
                                                          num_classes=10), 32),
    "googlenet": (lambda: torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=False), 32),
}


def measured(fn: Callable[[], object]) -> tuple[float, int]:
    """(seconds, peak bytes above the starting level) of ``fn()`` (memory from the profiler's
    allocator events; the time from a separate, unprofiled call)."""
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        level += e.nbytes()
        peak = max(peak, level)
    return seconds, peak


def bench(name: str, dtype: torch.dtype, batch: int, repeats: int) -> dict[str, float]:
    build, size = ARCHS[name]
    torch.manual_seed(0)
    dense = build().to(dtype).eval()
    x = torch.randn(batch, 3, size, size, dtype=dtype)
    sites = pr.find_sites(dense, x)
    targets = pr.find_targets(dense)
    share = sum(t.numel for t in targets) / sum(p.numel() for p in dense.parameters())

    def forward():
        with torch.no_grad():
            dense(x)

    forward()  # warm-up
    fwd = [measured(forward) for _ in range(repeats)]
    work = []
    for _ in range(repeats):
        pruned = [copy.deepcopy(dense) for _ in range(2)]  # measured() runs its function twice
        for m in pruned:
            pr.prune_(m, 0.5)

        def collect_and_repair(pruned=pruned):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                goal = pr.collect_stats(dense, x, sites=sites)
                pr.repair_(pruned.pop(), goal, x, repair="repair", variant="exact")

        work.append(measured(collect_and_repair))
    t_fwd, m_fwd = statistics.median(t for t, _ in fwd), statistics.median(m for _, m in fwd)
    t_work, m_work = statistics.median(t for t, _ in work), statistics.median(m for _, m in work)
    return {"sites": len(sites), "share": share, "fwd_ms": 1e3 * t_fwd, "time_x": t_work / t_fwd,
            "fwd_mib": m_fwd / 2**20, "mem_x": m_work / max(m_fwd, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--only", nargs="*", default=None, help="architectures to run (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"collect + exact repair vs one no_grad forward; {args.dtype}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}; peak memory: torch profiler CPU "
          "allocator events\n")
    for name in args.only or ARCHS:
        r = bench(name, dtype, args.batch, args.repeats)
        print(f"### {name} ({ARCHS[name][1]}x{ARCHS[name][1]} input)\n")
        print("| sites | prunable share of params | forward | collect+repair time | forward peak mem | "
              "collect+repair peak mem |")
        print("|---:|---:|---:|---:|---:|---:|")
        print(f"| {r['sites']} | {100 * r['share']:.1f}% | {r['fwd_ms']:.1f} ms | {r['time_x']:.2f}x | "
              f"{r['fwd_mib']:.2f} MiB | {r['mem_x']:.2f}x |\n", flush=True)


if __name__ == "__main__":
    main()
