"""Activation matching against two plain forwards, with where its time goes (issue 21, item 3).

Random-init torchvision models (no downloads), the batches of bench_speed_targets.py: resnet18
64 x 3x64x64, convnext_tiny 16 x 3x64x64; B is the same architecture with another seed.
``activation_matching(A, B, x, groups)`` and ``(A(x), B(x))`` run interleaved, ``--repeats``
times after one warm-up; the table gives medians. The breakdown times the matching's own steps
by wrapping them (one extra call layer each; a step called inside another counts in its own part only):

- forwards + capture: both models' forward passes with the probes' hooks (``capture``);
- copies: each probed tensor as a (samples, units) block (``_samples``);
- paired moments: the float32 GEMM per probe and its float64 accumulation (``CrossMoments.add_pair``), or
  for a probe's only batch with fewer samples than units its product widened into the correlation
  (``CrossMoments.scale_only_pair_into_``);
- correlations: co-moments to correlations, probes weighted (``_correlations``);
- assignment: one linear assignment per group (``assign``), also listed by width;
- other: the rest (probe lists, checks).

``--package-root DIR`` imports ``prune_repair`` from another checkout (e.g. ``git archive`` of
an older commit) with the same names, so the same script measures before and after.

    python benchmarks/bench_matching.py --repeats 3 --threads 1 --cpu-time
    python benchmarks/bench_matching.py --repeats 3 --threads 1 --cpu-time --write
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torchvision
from torch import nn

RESULTS = Path(__file__).with_name("RESULTS.md")
START, END = "<!-- matching-speed:start -->", "<!-- matching-speed:end -->"
TARGETS = {"resnet18": 1.5, "convnext_tiny": 4.0}
PARTS = ("forwards + capture", "copies", "paired moments", "correlations", "assignment")


def build(name: str, seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    if name == "resnet18":
        return torchvision.models.resnet18(num_classes=10).eval(), torch.randn(64, 3, 64, 64)
    return getattr(torchvision.models, name)(num_classes=10).eval(), torch.randn(16, 3, 64, 64)


class Breakdown:
    """Wraps the matching's steps in its module to add up their time (``clock``) per part."""

    def __init__(self, module, clock):
        self.module, self.clock = module, clock
        self.seconds: dict[str, float] = defaultdict(float)
        self.by_width: dict[int, list[float]] = defaultdict(list)
        self.nested: list[float] = []
        self._wrap(module, "capture", "forwards + capture")
        self._wrap(module, "_samples", "copies")
        self._wrap(module, "_correlations", "correlations")
        self._wrap(module, "assign", "assignment", width=True)
        cross = getattr(module, "CrossMoments", None) or module._Cross
        self._wrap(cross, "add_pair", "paired moments")
        if hasattr(cross, "scale_only_pair_into_"):  # (a one-batch probe read at once: product and its widening)
            self._wrap(cross, "scale_only_pair_into_", "paired moments")

    def _wrap(self, owner, name: str, part: str, width: bool = False) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            self.nested.append(0.0)  # time of wrapped steps called inside this one (counted there)
            start = self.clock()
            try:
                out = inner(*args, **kwargs)
            finally:
                spent = self.clock() - start
                inside = self.nested.pop()
                if self.nested:
                    self.nested[-1] += spent
            self.seconds[part] += spent - inside
            if width:
                self.by_width[int(args[0].shape[0])].append(spent - inside)
            return out
        setattr(owner, name, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.by_width.clear()


def measure(name: str, repeats: int, clock, matching, find_groups, module, batches: int = 1) -> dict:
    """Medians over ``repeats`` of two forwards, the matching and its parts (seconds); the matching
    gets ``x`` as ``batches`` batches (the forwards the whole ``x``)."""
    a, x = build(name, 0)
    b = build(name, 1)[0]
    groups = find_groups(a, x[:2])
    breakdown = Breakdown(module, clock)
    data = x if batches == 1 else list(x.chunk(batches))
    runs: dict[str, list[float]] = defaultdict(list)
    widths: dict[int, list[float]] = defaultdict(list)
    for r in range(repeats + 1):  # the first round warms up
        start = clock()
        with torch.no_grad():
            a(x)
            b(x)
        forwards = clock() - start
        breakdown.reset()
        start = clock()
        perms = matching(a, b, data, groups).perms
        total = clock() - start
        if r == 0:
            continue
        runs["two forwards"].append(forwards)
        runs["matching"].append(total)
        for part in PARTS:
            runs[part].append(breakdown.seconds[part])
        runs["other"].append(total - sum(breakdown.seconds[p] for p in PARTS))
        for w, spent in breakdown.by_width.items():
            widths[w].append(sum(spent))
    out = {k: statistics.median(v) for k, v in runs.items()}
    out["no tie-breaks"] = without_tie_breaks(module, matching, a, b, data, groups, repeats, clock)
    out["widths"] = {w: (sum(1 for g in groups if g.size == w), statistics.median(v)) for w, v in sorted(widths.items())}
    out["perms"] = perms
    return out


def without_tie_breaks(module, matching, a, b, x, groups, repeats: int, clock) -> float:
    """Median seconds of the matching with the producers' tie-breaking probes left out (not a
    mode of the package: what they cost, measured by filtering ``probes_of``)."""
    probes_of = module.probes_of
    module.probes_of = lambda model, g, **kw: ([p for p in probes_of(model, g, **kw) if p.weight == 1.0]
                                               or probes_of(model, g, **kw))
    try:
        times = []
        for _ in range(repeats):
            start = clock()
            matching(a, b, x, groups)
            times.append(clock() - start)
    finally:
        module.probes_of = probes_of
    return statistics.median(times)


def table(rows: dict, args) -> list[str]:
    clock = "CPU time (process)" if args.cpu_time else "wall time"
    lines = [
        "## Activation matching speed (issue 21, item 3)",
        "",
        (f"Medians of {args.repeats} interleaved repeats, {clock}, float32, cpu, {args.threads} thread(s); the matching "
         f"reads the batch as {args.batches} batch(es); random-init "
        "torchvision models, B another seed; resnet18 64 x 3x64x64, convnext_tiny 16 x 3x64x64. Ratios are of two plain "
        "forwards (A(x), B(x)) in the same run. Parts: forwards + capture (both passes with the probes' hooks), copies "
        "(probed tensors as sample blocks), paired moments (one float32 GEMM per probe, float64 accumulation), "
        "correlations, assignment (one exact linear assignment per group). The last column runs the matching with the "
        "producers' tie-breaking probes (weight 1e-6) filtered out of `probes_of`, to show what they cost; it is not a "
        "mode of the package."),
        "",
        (f"Reproduce: `python benchmarks/bench_matching.py --repeats {args.repeats} --threads {args.threads}"
         f"{' --cpu-time' if args.cpu_time else ''}{f' --batches {args.batches}' if args.batches > 1 else ''} --write`"),
        "",
        ("| model | two forwards | matching (x two forwards) | target | forwards + capture | copies | paired moments "
         "| correlations | assignment | other | assignment by width (groups x seconds each) | without tie-break probes |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, r in rows.items():
        base = r["two forwards"]
        ratio = r["matching"] / base
        target = TARGETS.get(name)
        verdict = "" if target is None else f"<= {target}x {'ok' if ratio <= target else '**missed**'}"
        parts = " | ".join(f"{r[p]:.3f} s ({r[p] / base:.2f}x)" for p in (*PARTS, "other"))
        widths = ", ".join(f"{w}: {n} x {s / n:.3f}" for w, (n, s) in r["widths"].items())
        lines.append(f"| {name} | {base:.3f} s | {r['matching']:.3f} s ({ratio:.2f}x) | {verdict} | {parts} | {widths} "
                     f"| {r['no tie-breaks']:.3f} s ({r['no tie-breaks'] / base:.2f}x) |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,convnext_tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, default=1, help="give the matching the batch as this many batches")
    parser.add_argument("--cpu-time", action="store_true", help="time by the process's CPU time (busy shared machines)")
    parser.add_argument("--package-root", default=str(Path(__file__).resolve().parents[1]),
                        help="the checkout whose prune_repair is measured")
    parser.add_argument("--save-perms", help="save each model's permutations to this file (torch.save)")
    parser.add_argument("--write", action="store_true", help="update the matching-speed section of RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, args.package_root)
    module = importlib.import_module("prune_repair.merge.activation_matching")
    print("measuring", module.__file__, flush=True)
    find_groups = importlib.import_module("prune_repair.merge.find_groups").find_groups
    clock = time.process_time if args.cpu_time else time.perf_counter
    rows = {}
    for name in args.models.split(","):
        rows[name] = measure(name, args.repeats, clock, module.activation_matching, find_groups, module, args.batches)
        print(name, {k: v for k, v in rows[name].items() if k != "perms"}, flush=True)
    if args.save_perms:
        torch.save({name: r["perms"] for name, r in rows.items()}, args.save_perms)
    lines = table(rows, args)
    print("\n".join(lines))
    if args.write:
        from results_md import replace_section
        replace_section(RESULTS, "\n".join([START, *lines, END]))


if __name__ == "__main__":
    main()
