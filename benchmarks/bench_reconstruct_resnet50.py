"""ResNet-50 at 224x224: reconstruct the whole network from 256 calibration samples (issue 8).

Target: under 10 minutes on 2 cores. torchvision's resnet50 (random init: no pretrained weights
can be downloaded here; the cost does not depend on the weights' values, except for the number
of CG iterations of the wide rows), pruned to --sparsity by global magnitude, reconstructed
toward the dense model on 256 MNIST digits upsampled to 3x224x224. Prints one plain forward of
the calibration batch, the reconstruction time (and its ratio to the forward), the passes made,
the solve paths used, and the peak resident memory of the process; --write puts the row into
benchmarks/RESULTS.md.

Times are wall-clock seconds by default; ``--clock cpu`` gives the process's CPU seconds (all its
threads), which the other tenants of a shared machine disturb much less.

Usage: python benchmarks/bench_reconstruct_resnet50.py [--sparsity 0.9] [--calib 256] [--threads 2]
       [--clock wall|cpu] [--write]
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import replace_section  # noqa: E402

import prune_repair as pr  # noqa: E402
from prune_repair.io.data import calibration_batch, load_dataset  # noqa: E402
from prune_repair.prune import prune_  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = load_dataset("mnist:train")
    digits, _ = calibration_batch(x, y, args.calib, seed=0)
    calib = F.interpolate(digits, size=224, mode="bilinear").expand(-1, 3, -1, -1).contiguous()
    calib = (calib - calib.mean()) / calib.std()
    dense = torchvision.models.resnet50().eval()
    model = copy.deepcopy(dense)
    prune_(model, args.sparsity, method="global-magnitude")

    start = clock()
    with torch.no_grad():
        dense(calib)
    forward = clock() - start
    rss_forward = peak_rss_gb()
    done = [0]

    def progress(i: int, total: int) -> None:
        done[0] = i
        print(f"  layer {i}/{total} at {clock() - start:.0f} s", file=sys.stderr, flush=True)

    start = clock()
    report = pr.reconstruct_(model, dense, calib, progress=progress)
    seconds = clock() - start
    worst = max(report.layers, key=lambda layer: layer.max_support)
    line = (f"| resnet50 224x224 | {args.sparsity:.2f} | {args.calib} | {forward:.1f} | {seconds:.0f} "
            f"({seconds / forward:.1f}x) | {len(report.layers)} | {report.passes} | {rss_forward:.1f} / {peak_rss_gb():.1f} |")
    print(f"forward {forward:.1f} s, reconstruct {seconds:.1f} s ({seconds / forward:.1f}x), passes {report.passes}, "
          f"widest row {worst.fqn} {worst.max_support}/{worst.d_in}, peak RSS {peak_rss_gb():.1f} GB")
    print(line)
    if args.write:
        replace_section(RESULTS, "\n".join([
            "<!-- reconstruct-resnet50:start -->",
            "### ResNet-50 at 224x224 (issue 8 speed target: under 10 minutes on 2 cores)", "",
            "torchvision resnet50 (random init), global magnitude, `reconstruct_` toward the dense model on "
            f"MNIST digits upsampled to 3x224x224; one process, {args.threads} thread(s), 2 shared cores, "
            f"{args.clock} seconds{' (of all its threads)' if args.clock == 'cpu' else ''}. Peak RSS: after the "
            "plain forward / after reconstruction.", "",
            f"Reproduce: `python benchmarks/bench_reconstruct_resnet50.py --sparsity {args.sparsity} "
            f"--calib {args.calib} --threads {args.threads} --clock {args.clock} --write`", "",
            "| model | sparsity | calib | forward s | reconstruct s (x fwd) | layers | passes | peak RSS GB |",
            "|---|---:|---:|---:|---:|---:|---|---:|", line,
            "<!-- reconstruct-resnet50:end -->"]))


if __name__ == "__main__":
    main()
