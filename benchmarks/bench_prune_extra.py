"""Timings for bench_prune.py: our pruner and reset against torch's own tools, WoodFisher cost.

- global magnitude at 90%: :func:`prune_repair.prune.prune_` vs
  ``torch.nn.utils.prune.global_unstructured(L1Unstructured)`` on copies of the same model;
- reset vs ``torch.optim.swa_utils.update_bn`` on the same calibration batch (time and accuracy);
- WoodFisher on the ResNet-20 (0.27M weights, 400 per-sample gradients): seconds and peak
  memory, measured in a fresh subprocess so the peak RSS is its own.

Run alone (from the repository root) to print the WoodFisher probe::

    python benchmarks/bench_prune_extra.py probe 128
"""

from __future__ import annotations

import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn
from torch.optim.swa_utils import update_bn

from prune_repair import collect_stats, repair_
from prune_repair.metrics.classify import evaluate
from prune_repair.prune import find_targets, measure_sparsity, prune_

HERE = Path(__file__).resolve().parent
REPS = 7


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _torch_global(model: nn.Module) -> None:
    params = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=0.9)


def magnitude_speed(model: nn.Module) -> dict:
    """Median seconds of our global magnitude prune vs torch's global_unstructured (interleaved)."""
    ours, ours_torch_style, theirs, zeros = [], [], [], set()
    for _ in range(REPS):
        a, b, c = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
        ours.append(_timed(lambda: prune_(a, 0.9, "global-magnitude")))
        ours_torch_style.append(_timed(lambda: prune_(b, 0.9, "global-magnitude", style="torch")))
        theirs.append(_timed(lambda: _torch_global(c)))
        zeros |= {measure_sparsity(find_targets(m)).zeros for m in (a, b, c)}
    med = {k: statistics.median(v) for k, v in (("ours", ours), ("ours_torch_style", ours_torch_style),
                                                 ("torch", theirs))}
    return {"median_s": med, "ratio_torch_over_ours": med["torch"] / med["ours"],
            "ratio_torch_over_ours_torch_style": med["torch"] / med["ours_torch_style"],
            "same_zero_count": len(zeros) == 1, "zeros": sorted(zeros), "reps": REPS}


def reset_speed(model: nn.Module, calib: tuple, test: tuple) -> dict:
    """Median seconds of reset (repair_ mode='reset') vs update_bn on a 90%-pruned copy."""
    pruned = copy.deepcopy(model)
    prune_(pruned, 0.9, "global-magnitude")
    x = calib[0]
    stats_s = _timed(lambda: collect_stats(model, x))
    reference = collect_stats(model, x)
    ours, theirs, accs = [], [], {}
    for _ in range(REPS):
        a, b = copy.deepcopy(pruned), copy.deepcopy(pruned)
        ours.append(_timed(lambda: repair_(a, reference, x, repair="reset")))
        theirs.append(_timed(lambda: update_bn([x], b)))
        accs = {"reset": evaluate(a, *test)["acc"], "update_bn": evaluate(b, *test)["acc"]}
    med = {"reset": statistics.median(ours), "update_bn": statistics.median(theirs)}
    return {"median_s": med, "ratio_update_bn_over_reset": med["update_bn"] / med["reset"],
            "reference_stats_s": stats_s, "acc": accs, "acc_pruned": evaluate(pruned, *test)["acc"],
            "calib_size": len(x), "reps": REPS}


def speed_comparisons(resnet: nn.Module, cnn_bn: nn.Module, calib: tuple, test: tuple) -> dict:
    resnet_test = (test[0][:2000], test[1][:2000])
    return {
        "magnitude": {"resnet20-bn": magnitude_speed(resnet), "mnist-cnn-bn": magnitude_speed(cnn_bn)},
        "reset": {"resnet20-bn": reset_speed(resnet, calib, resnet_test), "mnist-cnn-bn": reset_speed(cnn_bn, calib, test)},
    }


def woodfisher_cost(fisher: tuple, block_sizes: tuple[int, ...] = (128, 512)) -> list[dict]:
    """Run :func:`probe` in a subprocess per block size; returns its JSON records."""
    records = []
    for block in block_sizes:
        out = subprocess.run([sys.executable, __file__, "probe", str(block)], capture_output=True, text=True, check=True)
        records.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  woodfisher probe: {records[-1]}", flush=True)
    return records


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; return the current RSS in MiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def probe(block: int) -> dict:
    """WoodFisher scoring of the cached ResNet-20 (BN) with 400 per-sample gradients."""
    from prune_repair.io.data import calibration_batch, load_dataset
    from prune_repair.zoo.models import ResNetMini
    from prune_repair.prune import inverse_fisher, woodfisher_memory, woodfisher_scores

    torch.set_num_threads(2)
    x, y = load_dataset("mnist:train")
    fisher = calibration_batch(x, y, 400, 1)
    del x, y
    model = ResNetMini(width=16, blocks_per_stage=(3, 3, 3), norm="bn")
    cached = HERE / "cache" / "resnet20-bn.pt"
    if cached.is_file():
        model.load_state_dict(torch.load(cached, weights_only=True))
    model.eval()
    targets = find_targets(model)
    rss_before = _reset_peak_rss()  # so the peak below is WoodFisher's, not the MNIST loading's
    start = time.perf_counter()
    inv = inverse_fisher(model, targets, fisher, num_grads=400, block_size=block)
    woodfisher_scores(inv, targets)
    seconds = time.perf_counter() - start
    rss_after = _status_mib("VmHWM")
    return {"block_size": block, "weights": sum(t.numel for t in targets), "num_grads": 400, "seconds": seconds,
            "blocks_mib": woodfisher_memory(targets, block) / 2**20, "peak_rss_mib": rss_after,
            "rss_at_start_mib": rss_before, "loadavg_1min": os.getloadavg()[0]}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "probe":
        print(json.dumps(probe(int(sys.argv[2]))))
    else:
        sys.exit("usage: python benchmarks/bench_prune_extra.py probe BLOCK_SIZE")
