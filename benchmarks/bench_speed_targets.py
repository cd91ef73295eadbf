"""Speed and memory targets of issue 11, each as a ratio measured side by side in one run.

Random-init torchvision models (no downloads). Times are medians of ``--repeats``
interleaved repeats; peak memory is the rise of the process's peak RSS (VmHWM, reset
before the call, glibc told to return large blocks) in a fresh subprocess per
measurement, or ``torch.cuda.max_memory_allocated`` on CUDA.

    python benchmarks/bench_speed_targets.py                 # print the table
    python benchmarks/bench_speed_targets.py --write         # and update RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import importlib
import time
import types
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, os.environ.get("BENCH_PACKAGE_ROOT") or str(Path(__file__).resolve().parents[1]))  # another tree's package
import prune_repair as pr  # noqa: E402
from prune_repair.merge.activation_matching import activation_matching  # noqa: E402
from prune_repair.merge.find_groups import find_groups  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
START, END = "<!-- speed-targets:start -->", "<!-- speed-targets:end -->"
TARGETS = {"collect": 1.15, "collect_mem": 1.3, "repair": 2.3, "reset": 1.0, "magnitude": 1.0, "magnitude_bytes": 5.0}
MATCH_TARGETS = {"resnet18": 1.5, "convnext_tiny": 4.0}
"""Activation matching over two forwards, per model (the other models have no target: value only)."""


def build(name: str, device: str = "cpu", seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    if name == "resnet18":
        model, x = torchvision.models.resnet18(num_classes=10), torch.randn(64, 3, 64, 64)
    elif name == "vit_b_16":
        model, x = torchvision.models.vit_b_16(num_classes=10), torch.randn(4, 3, 224, 224)
    else:
        model, x = getattr(torchvision.models, name)(num_classes=10), torch.randn(16, 3, 64, 64)
    return model.eval().to(device), x.to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def forward(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


def prune_copy(model: nn.Module, sparsity: float = 0.5) -> nn.Module:
    pruned = copy.deepcopy(model)
    pr.prune_(pruned, sparsity)
    return pruned


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def timed(ops: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each op; ops run interleaved; ``ops[k] = (setup, fn)``."""
    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(repeats + 1):  # the first round warms up
        for key, (setup, fn) in ops.items():
            arg = setup()
            sync(device)
            start = clock()
            fn(arg)
            sync(device)
            times[key].append(clock() - start)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def time_model(name: str, repeats: int, device: str) -> dict[str, float]:
    model, x = build(name, device)
    goal = pr.collect_stats(model, x)
    ops = {
        "forward": (lambda: None, lambda _: forward(model, x)),
        "collect": (lambda: None, lambda _: pr.collect_stats(model, x)),
        "collect_sites": (lambda: None, lambda _: pr.collect_stats(model, x, sites=goal.sites)),
        "repair": (lambda: prune_copy(model), lambda m: pr.repair_(m, pr.collect_stats(model, x), x)),
    }
    try:
        b = build(name, device, seed=1)[0]
        groups = find_groups(model, x[:2])
        ops["forward_ab"] = (lambda: None, lambda _: (forward(model, x), forward(b, x)))
        assigning: list[float] = []
        ops["match"] = (lambda: None, lambda _: assigning.append(activation_matching(model, b, x, groups).assign_seconds))
    except Exception as exc:  # an architecture find_groups does not handle
        print(f"  {name}: no activation matching ({type(exc).__name__}: {str(exc)[:80]})")
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        ops["reset"] = (lambda: copy.deepcopy(model), lambda m: pr.repair_(m, goal, x, repair="reset"))
        ops["update_bn"] = (lambda: copy.deepcopy(model).train(),
                            lambda m: torch.optim.swa_utils.update_bn([x], m, device=x.device))
    t = timed(ops, repeats, device)
    out = {"forward_ms": 1e3 * t["forward"], "collect": t["collect"] / t["forward"],
           "collect_sites": t["collect_sites"] / t["forward"], "repair": t["repair"] / t["forward"]}
    if "match" in t:
        out["match"] = t["match"] / t["forward_ab"]
        out["match_pass"] = (t["match"] - statistics.median(assigning[1:])) / t["forward_ab"]
    if "reset" in t:
        out["reset"] = t["reset"] / t["update_bn"]
        out["reset_vs_update_bn_max_rel"] = reset_agreement(model, goal, x)
    return out


def breakdown(name: str, repeats: int, device: str) -> dict[str, float]:
    """Where collect and collect + repair + fold spend their time, over one forward: the 2-sample trace
    (``find_sites``), collect with and without sites, ``repair_`` with the goal given, and both."""
    model, x = build(name, device)
    goal = pr.collect_stats(model, x)
    pruned = prune_copy(model)
    ops = {
        "forward": (lambda: None, lambda _: forward(model, x)),
        "trace": (lambda: None, lambda _: pr.find_sites(model, x[:2])),
        "collect": (lambda: None, lambda _: pr.collect_stats(model, x)),
        "collect_sites": (lambda: None, lambda _: pr.collect_stats(model, x, sites=goal.sites)),
        "repair_goal_given": (lambda: copy.deepcopy(pruned), lambda m: pr.repair_(m, goal, x)),
        "collect_repair": (lambda: copy.deepcopy(pruned), lambda m: pr.repair_(m, pr.collect_stats(model, x), x)),
    }
    t = timed(ops, repeats, device)
    return {k: v / t["forward"] for k, v in t.items() if k != "forward"}


def reset_agreement(model: nn.Module, goal, x: torch.Tensor) -> float:
    """Largest relative difference of the running statistics set by ``reset`` and by update_bn
    (update_bn keeps the unbiased batch variance: compared after the n/(n-1) factor)."""
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    pr.repair_(ours, goal, x, repair="reset")
    torch.optim.swa_utils.update_bn([x], theirs.train(), device=x.device)
    bns = [m for m in ours.modules() if isinstance(m, nn.BatchNorm2d)]
    counts: dict[nn.Module, int] = {}

    def count(module: nn.Module, inputs: tuple) -> None:
        counts[module] = inputs[0].numel() // inputs[0].shape[1]

    handles = [m.register_forward_pre_hook(count) for m in bns]
    forward(ours, x)
    for h in handles:
        h.remove()
    worst = 0.0
    for a, b in zip(ours.modules(), theirs.modules()):
        if isinstance(a, nn.BatchNorm2d):
            n = counts[a]
            var_b = b.running_var * (n - 1) / n
            worst = max(worst, float(((a.running_var - var_b).abs() / var_b.abs().clamp_min(1e-12)).max()),
                        float(((a.running_mean - b.running_mean).abs() / var_b.sqrt().clamp_min(1e-12)).max()))
    return worst


def magnitude_time(repeats: int, device: str) -> dict[str, float]:
    model = build("vit_b_16", device)[0]

    def ours(m):
        pr.prune_(m, 0.9, "global-magnitude")

    def theirs(m):
        params = [(t.module, t.name) for t in pr.find_targets(m)]
        torch.nn.utils.prune.global_unstructured(params, torch.nn.utils.prune.L1Unstructured, amount=0.9)

    t = timed({"ours": (lambda: copy.deepcopy(model), ours), "torch": (lambda: copy.deepcopy(model), theirs)},
              repeats, device)
    return {"magnitude": t["ours"] / t["torch"]}


# ---- peak memory: one fresh subprocess per measurement ---------------------------------------------

def _rss_kib() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmHWM", "VmRSS"))


def child(what: str, name: str, device: str, threads: int) -> None:
    """Run in a subprocess: print the peak extra bytes of one call (after one warm-up)."""
    torch.set_num_threads(threads)
    model, x = build(name, device)
    if what == "forward":
        fn = lambda: forward(model, x)  # noqa: E731
    elif what == "collect":
        fn = lambda: pr.collect_stats(model, x)  # noqa: E731
    else:
        weights = sum(t.numel for t in pr.find_targets(model))
        params = lambda m: [(t.module, t.name) for t in pr.find_targets(m)]  # noqa: E731
        fn = {"magnitude": lambda: pr.prune_(model, 0.9, "global-magnitude"),
              "torch_magnitude": lambda: torch.nn.utils.prune.global_unstructured(
                  params(model), torch.nn.utils.prune.L1Unstructured, amount=0.9)}[what]
    if what in ("forward", "collect"):
        fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
        base = _rss_kib()[1]
        fn()
        extra = 1024 * (_rss_kib()[0] - base)
    if what in ("magnitude", "torch_magnitude"):
        extra = extra / weights
    print(json.dumps({"value": extra}))


def peak(what: str, name: str, device: str, threads: int = 2) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--child", what, name, "--device", device, "--threads", str(threads)],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["value"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,convnext_tiny,swin_t,vit_b_16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCK), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (1 thread on the CPU: what "
                             "other tenants of a shared machine do not add)")
    parser.add_argument("--write", action="store_true", help="update the speed-targets section of RESULTS.md")
    parser.add_argument("--breakdown", action="store_true",
                        help="only print where collect and repair spend their time (BENCH_PACKAGE_ROOT=DIR "
                             "measures the package under DIR, e.g. an older commit's)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child, args.device, args.threads)
    torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures host CPU time: use it with --device cpu")
    global clock
    clock = CLOCK[args.clock]
    if args.clock == "cpu":  # the package times its assignments (Alignment.assign_seconds) by the same clock
        importlib.import_module("prune_repair.merge.activation_matching").time = types.SimpleNamespace(
            perf_counter=time.process_time)
    if args.breakdown:
        for name in args.models.split(","):
            print(name, {k: f"{v:.2f}x" for k, v in breakdown(name, args.repeats, args.device).items()}, flush=True)
        return None
    rows = {}
    for name in args.models.split(","):
        r = time_model(name, args.repeats, args.device)
        r["collect_mem"] = peak("collect", name, args.device, args.threads) / peak("forward", name, args.device, args.threads)
        rows[name] = r
        print(name, {k: round(v, 3) for k, v in r.items()}, flush=True)
    mag = magnitude_time(args.repeats, args.device)
    mag["magnitude_bytes"] = peak("magnitude", "vit_b_16", args.device, args.threads)
    mag["torch_bytes"] = peak("torch_magnitude", "vit_b_16", args.device, args.threads)
    print("global magnitude (vit_b_16)", {k: round(v, 3) for k, v in mag.items()})
    lines = table(rows, mag, args)
    print("\n".join(lines))
    if args.write:
        from results_md import replace_section
        replace_section(RESULTS, "\n".join([START, *lines, END]))


def table(rows: dict, mag: dict, args) -> list[str]:
    def cell(value, key, target=None):
        target = TARGETS.get(key) if target is None else target
        if value is None:
            return "n/a"
        if key == "match" and target is None:
            return f"{value:.2f}x"
        return f"{value:.2f}x {'ok' if value <= target else '**missed**'}"

    lines = [
        "## Speed and memory targets (issue 11)",
        "",
        f"Ratios measured side by side in one run, medians of {args.repeats} interleaved repeats, float32, "
        f"{args.device}, {args.threads} thread(s), "
        + ("process CPU time" if args.clock == "cpu" else "wall-clock time")
        + ". Batches: resnet18 64 x 64x64, convnext_tiny / swin_t 16 x 64x64, "
        "vit_b_16 4 x 224x224; random init. `collect` is a plain `collect_stats(model, x)` (one pass that "
        "finds the sites as it measures); `collect, sites given` measures given sites. Peak memory: rise of "
        "peak RSS in a fresh process (after one warm-up call) of the plain `collect`. `reset` is `repair_(..., repair='reset')` "
        "over `torch.optim.swa_utils.update_bn` on the same batch. Activation matching is 2 forwards, the "
        "paired moments (proportional to the data) and one assignment problem per group (scipy's "
        "`linear_sum_assignment`, O(width^3), independent of the data): 'without the assignment' is the first "
        "two, the part the calibration size scales.",
        "",
        f"Reproduce: `python benchmarks/bench_speed_targets.py --repeats {args.repeats} --threads {args.threads} "
        + (f"--clock {args.clock} " if args.clock != "wall" else "") + "--write`",
        "",
        "| model | forward | collect (<= 1.15x) | collect, sites given | collect peak mem (<= 1.3x) "
        "| collect + repair + fold (<= 2.3x) | activation matching (x 2 forwards; resnet18 <= 1.5x, convnext_tiny <= 4x) | "
        "matching without the assignment | reset / update_bn (<= 1.0x) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        match_pass = f"{r['match_pass']:.2f}x" if r.get("match_pass") is not None else "n/a"
        lines.append(f"| {name} | {r['forward_ms']:.1f} ms | {cell(r['collect'], 'collect')} | "
                     f"{r['collect_sites']:.2f}x | {cell(r['collect_mem'], 'collect_mem')} | "
                     f"{cell(r['repair'], 'repair')} | {cell(r.get('match'), 'match', MATCH_TARGETS.get(name))} | "
                     f"{match_pass} | {cell(r.get('reset'), 'reset')} |")
    lines += ["", f"Global magnitude pruning of vit_b_16 to 90% ({'cuda' if args.device == 'cuda' else 'CPU'}): "
              f"time {cell(mag['magnitude'], 'magnitude')} of `torch.nn.utils.prune.global_unstructured` "
              f"(<= 1.0x); extra memory {mag['magnitude_bytes']:.2f} bytes per weight "
              f"({'ok' if mag['magnitude_bytes'] <= TARGETS['magnitude_bytes'] else '**missed**'}, <= 5; "
              f"torch's: {mag['torch_bytes']:.2f})."]
    resets = [r["reset_vs_update_bn_max_rel"] for r in rows.values() if "reset_vs_update_bn_max_rel" in r]
    if resets:
        lines.append(f"Reset agrees with update_bn: running statistics differ by at most {max(resets):.1e} "
                     "(relative; update_bn's unbiased variance rescaled to the population variance).")
    return lines


if __name__ == "__main__":
    main()
