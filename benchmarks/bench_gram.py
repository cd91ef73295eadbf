"""Reconstruction cost over one forward, by how the Gram statistics are formed (issue 21, item 1).

torchvision resnet18 (random init) at 112x112, pruned to --sparsity by global magnitude, reconstructed
toward the dense model (`reconstruct_`) on --calib MNIST digits upsampled to 3x112x112. Each repeat
times one plain forward of the calibration batch through the dense model, then the reconstruction of
a fresh copy of the pruned model under each Gram setting, side by side (interleaved repeats; the
medians are reported):

- ``float64 im2col``: float64 products of the unfolded patches (the path before issue 21);
- ``float32 im2col``: the same patches, float32 products per chunk summed in float64;
- ``float32 auto``: float32, and the correlation Gram for the stride-1 convs it pays for.

Also printed: the share of the time spent accumulating Gram statistics (the same settings over the
dense model's layer inputs, timed apart), and how far each setting's reconstructed weights and
final outputs are from the float64 path's.

Times are the process's CPU seconds by default (``--clock cpu``): with one thread that is the time on a
quiet core, whatever the other tenants of a shared machine do; ``--clock wall`` for wall-clock seconds.

``--profile``: instead, one reconstruction with ``float32 auto`` under cProfile (CPU clock), and the
seconds of its parts (Gram accumulation, masked ridge solves, relative errors, the rest: the model and
reference passes, the trace, the checks) over one plain forward.

Usage: python benchmarks/bench_gram.py [--sparsity 0.9] [--calib 128] [--size 112] [--threads 1]
       [--clock cpu] [--repeats 3] [--write] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import replace_section  # noqa: E402

import prune_repair as pr  # noqa: E402
from prune_repair.engine.refit.gram import Gram  # noqa: E402
from prune_repair.engine.refit.gram_options import gram_options  # noqa: E402
from prune_repair.io.data import calibration_batch, load_dataset  # noqa: E402
from prune_repair.prune import prune_  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SETTINGS = {"float64 im2col": ("float64", "im2col"), "float32 im2col": ("float32", "im2col"),
            "float32 auto": ("float32", "auto")}


CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}
clock = time.process_time


def gram_seconds(model: nn.Module, calib: torch.Tensor, precision: str, method: str) -> float:
    """Seconds to accumulate the Gram statistics of every conv/linear layer on its dense input."""
    inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, (a[0], o)))
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(calib)
    for h in hooks:
        h.remove()
    modules = dict(model.named_modules())
    start = clock()
    for name, (x, y) in inputs.items():
        Gram.for_layer(modules[name], precision=precision, method=method).add(x, y)
    return clock() - start


def rounding_table(model: nn.Module, calib: torch.Tensor) -> list[str]:
    """Relative distance of float32 Grams to the float64 im2col Gram on the dense model's layer inputs."""
    inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, (a[0].clone(), o)))
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(calib)
    for h in hooks:
        h.remove()
    modules = dict(model.named_modules())
    rows = ["| layer | input | setting | G (Frobenius) | G (largest entry) | C (Frobenius) |", "|---|---|---|---:|---:|---:|"]
    for name, (x, y) in inputs.items():
        ref = Gram.for_layer(modules[name], precision="float64", method="im2col")
        ref.add(x, y)
        for precision, method in (("float32", "im2col"), ("float32", "auto")):
            gram = Gram.for_layer(modules[name], precision=precision, method=method)
            gram.add(x, y)
            g_rel = float((gram.G - ref.G).norm() / ref.G.norm())
            g_max = float((gram.G - ref.G).abs().max() / ref.G.abs().max())
            c_rel = float((gram.C - ref.C).norm() / ref.C.norm())
            rows.append(f"| {name} | {list(x.shape)} | {precision} {method} | {g_rel:.1e} | {g_max:.1e} | {c_rel:.1e} |")
    return rows


PARTS = {"Gram accumulation": ("refit/gram.py", "add"), "masked ridge solves": ("refit/ridge.py", "masked_ridge"),
         "relative errors (before, after)": ("refit/fit_error.py", "relative_errors")}


def profile_parts(pruned: nn.Module, dense: nn.Module, calib: torch.Tensor) -> list[str]:
    """CPU seconds of the parts of one ``float32 auto`` reconstruction (cProfile cumulative times)."""
    start = time.process_time()
    with torch.no_grad():
        dense(calib)
    forward = time.process_time() - start
    model, prof = copy.deepcopy(pruned), cProfile.Profile(time.process_time)
    with gram_options(precision="float32", method="auto"):
        start = time.process_time()
        prof.enable()
        pr.reconstruct_(model, dense, calib)
        prof.disable()
        total = time.process_time() - start
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows, rest = ["| part | CPU s | x forward |", "|---|---:|---:|"], total
    for label, (file, func) in PARTS.items():
        secs = sum(v[3] for (f, _, name), v in stats.items() if f.endswith(file) and name == func)
        rest -= secs
        rows.append(f"| {label} | {secs:.1f} | {secs / forward:.1f}x |")
    rows += [f"| the rest (passes, trace, checks) | {rest:.1f} | {rest / forward:.1f}x |",
             f"| reconstruction (under cProfile) | {total:.1f} | {total / forward:.1f}x |",
             f"| one plain forward | {forward:.2f} | 1.0x |"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCK), default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--profile", action="store_true", help="only the parts of one float32 auto reconstruction")
    parser.add_argument("--rounding", action="store_true",
                        help="only the rounding of float32 Grams vs float64 im2col, on every conv of the dense model")
    args = parser.parse_args()
    global clock
    clock = CLOCK[args.clock]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = load_dataset("mnist:train")
    digits, _ = calibration_batch(x, y, args.calib, seed=0)
    calib = F.interpolate(digits, size=args.size, mode="bilinear").expand(-1, 3, -1, -1).contiguous()
    calib = (calib - calib.mean()) / calib.std()
    dense = torchvision.models.resnet18().eval()
    if args.rounding:
        table = rounding_table(dense, calib)
        print("\n".join(table))
        if args.write:
            replace_section(RESULTS, "\n".join([
                "<!-- gram-rounding:start -->",
                "### Rounding of float32 Gram products (issue 21)", "",
                f"Each conv of torchvision resnet18 (random init) on its input from {args.calib} MNIST digits at "
                f"{args.size}x{args.size}: distance of the float32 statistics (products per chunk in float32, sums "
                "across chunks in float64; `auto` uses the correlation Gram where it applies) to the float64 im2col "
                "ones, relative to the latter's norm or largest entry. The ridge damping is 1e-2 of the mean diagonal.",
                "", f"Reproduce: `python benchmarks/bench_gram.py --rounding --calib {args.calib} --size {args.size} "
                "--write`", "", *table, "<!-- gram-rounding:end -->"]))
        return
    pruned = copy.deepcopy(dense)
    prune_(pruned, args.sparsity, method="global-magnitude")
    if args.profile:
        with torch.no_grad():
            dense(calib)  # warm-up
        print("\n".join(profile_parts(pruned, dense, calib)))
        return

    with torch.no_grad():
        dense(calib)  # warm-up: the first forward pays one-time costs
    forwards, times, grams = [], {k: [] for k in SETTINGS}, {k: [] for k in SETTINGS}
    results: dict[str, nn.Module] = {}
    for r in range(args.repeats):
        start = clock()
        with torch.no_grad():
            dense(calib)
        forwards.append(clock() - start)
        for name, (precision, method) in SETTINGS.items():
            model = copy.deepcopy(pruned)
            with gram_options(precision=precision, method=method):
                start = clock()
                pr.reconstruct_(model, dense, calib)
                times[name].append(clock() - start)
            grams[name].append(gram_seconds(dense, calib, precision, method))
            results[name] = model
            print(f"repeat {r}: forward {forwards[-1]:.2f} s, {name}: reconstruct {times[name][-1]:.1f} s, "
                  f"Gram pass alone {grams[name][-1]:.1f} s", file=sys.stderr, flush=True)
    fwd = statistics.median(forwards)
    base = results["float64 im2col"]
    with torch.no_grad():
        out_base = base(calib)
        out_dense = dense(calib)
    rows = []
    torch.set_grad_enabled(False)
    for name in SETTINGS:
        t, g = statistics.median(times[name]), statistics.median(grams[name])
        params = dict(results[name].named_parameters())
        weight_gap = max(float((p - params[k]).norm() / p.norm().clamp_min(1e-30))
                         for k, p in base.named_parameters())
        with torch.no_grad():
            out = results[name](calib)
        rows.append(f"| {name} | {fwd:.2f} | {t:.1f} | {t / fwd:.1f}x | {g:.1f} ({g / fwd:.1f}x) | {weight_gap:.1e} | "
                    f"{float((out - out_base).norm() / out_base.norm()):.1e} | "
                    f"{float((out - out_dense).norm() / out_dense.norm()):.3f} |")
    table = ["| Gram setting | forward s | reconstruct s | x forward | Gram pass alone s (x fwd) | max weight gap vs "
             "float64 | output gap vs float64 | output error vs dense |", "|---|---:|---:|---:|---:|---:|---:|---:|"] + rows
    print("\n".join(table))
    if args.write:
        replace_section(RESULTS, "\n".join([
            "<!-- gram-speed:start -->",
            "## Gram statistics at matrix-product speed (issue 21)", "",
            f"torchvision resnet18 (random init) at {args.size}x{args.size}, global magnitude to {args.sparsity:.0%}, "
            f"`reconstruct_` toward the dense model on {args.calib} MNIST digits upsampled to 3x{args.size}x{args.size}; "
            f"cpu, {args.threads} thread(s) on 2 shared cores, {args.clock} seconds"
            f"{' (CPU time of the process: robust to the other tenants)' if args.clock == 'cpu' else ''}, "
            f"medians of {args.repeats} interleaved repeats. "
            "`float64 im2col` is the path before issue 21. `Gram pass alone`: the same statistics accumulated for "
            "every layer on the dense model's inputs, timed apart from the passes and solves. Gaps: relative "
            "(largest over the parameters / of the final outputs) to the float64 path's result.", "",
            f"Reproduce: `python benchmarks/bench_gram.py --sparsity {args.sparsity} --calib {args.calib} "
            f"--size {args.size} --threads {args.threads} --clock {args.clock} --repeats {args.repeats} --write`", "",
            *table, "<!-- gram-speed:end -->"]))


if __name__ == "__main__":
    main()
