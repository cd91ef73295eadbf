"""Reconstruction sweep (issue 8): zoo models and ResNet-20s x sparsity x calibration size.

For every model (the zoo and the two ResNet-20s of bench_prune.py, BatchNorm and channel
LayerNorm, trained once and cached in benchmarks/cache/), sparsity (0.9, 0.95, 0.98) and
calibration size (256, 1024, 4096 samples of mnist:train, seed 0): global-magnitude pruning,
then `reconstruct` and `reconstruct+repair`; and the OBS pruner (global allocation, no
correction after it). The `auto` correction (64 samples, the CLI default) is the baseline.
Accuracy on mnist:test (all 10,000 for the zoo, the first 2,000 for the ResNets, as in
bench_prune.py) and the seconds each took.

Speed target: reconstruction of the whole network at most 3x one REPAIR (collect_stats of the
dense model + exact repair_) plus one Gram accumulation pass (every layer's Gram statistics
in one pass, no solve), all on the same 1,024 samples, measured side by side (median of
--repeats).

Usage (from the repository root):
    python benchmarks/bench_reconstruct_sweep.py                  # prints rows as they finish
    python benchmarks/bench_reconstruct_sweep.py --write          # and its section of RESULTS.md
    python benchmarks/bench_reconstruct_sweep.py --write-only     # re-render it from benchmarks/cache/
    python benchmarks/bench_reconstruct_sweep.py --models mnist-mlp --calib 1024 --sparsities 0.95
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune import CACHE, build_models  # noqa: E402
from results_md import replace_section  # noqa: E402

import prune_repair as pr  # noqa: E402
from prune_repair.engine.refit.layerwise import layerwise_  # noqa: E402
from prune_repair.metrics.classify import evaluate  # noqa: E402
from prune_repair.engine.refit.gram import GRAM_TYPES  # noqa: E402
from prune_repair.io.data import calibration_batch, load_dataset  # noqa: E402
from prune_repair.prune import prune_  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
RAW = CACHE / "bench_reconstruct_sweep.json"
START, END = "<!-- reconstruct-sweep:start -->", "<!-- reconstruct-sweep:end -->"
MODELS = ["mnist-mlp", "mnist-cnn", "mnist-cnn-bn", "resnet20-bn", "resnet20-ln"]


def seconds(fn) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def sweep(name: str, entry: dict, data, sparsities, calibs) -> list[dict]:
    x, y, xt, yt = data
    dense = entry["model"]
    if entry["eval_size"]:
        xt, yt = xt[: entry["eval_size"]], yt[: entry["eval_size"]]
    acc = lambda m: evaluate(m, xt, yt)["acc"]  # noqa: E731
    dense_acc, rows = acc(dense), []
    c64, _ = calibration_batch(x, y, 64, seed=0)
    for sparsity in sparsities:
        pruned = copy.deepcopy(dense)
        prune_(pruned, sparsity, method="global-magnitude")
        auto = copy.deepcopy(pruned)
        pr.repair_(auto, pr.collect_stats(dense, c64), c64, repair="auto")
        base = {"model": name, "sparsity": sparsity, "dense": dense_acc, "pruned": acc(pruned), "auto": acc(auto)}
        for calib_size in calibs:
            calib, _ = calibration_batch(x, y, calib_size, seed=0)
            row = dict(base, calib=calib_size)
            for repair in ("reconstruct", "reconstruct+repair"):
                model = copy.deepcopy(pruned)
                _, row[f"{repair}_s"] = seconds(lambda: pr.repair_(model, dense, calib, repair=repair))
                row[repair] = acc(model)
            model = copy.deepcopy(dense)
            _, row["obs_s"] = seconds(lambda: prune_(model, sparsity, method="obs", data=calib))
            row["obs"] = acc(model)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def speed(name: str, entry: dict, x, y, repeats: int, sparsity: float = 0.95, calib_size: int = 1024) -> dict:
    """reconstruct vs (one REPAIR + one Gram accumulation pass), side by side, medians."""
    dense = entry["model"]
    calib, _ = calibration_batch(x, y, calib_size, seed=0)
    pruned = copy.deepcopy(dense)
    prune_(pruned, sparsity, method="global-magnitude")

    def repair():
        pr.repair_(copy.deepcopy(pruned), pr.collect_stats(dense, calib), calib, repair="auto")

    def gram_pass():
        model = copy.deepcopy(pruned)
        layers = [(f, m) for f, m in model.named_modules() if isinstance(m, GRAM_TYPES)]
        layerwise_(model, [calib], layers, step=lambda i, gram: None)

    def reconstruct():
        pr.repair_(copy.deepcopy(pruned), dense, calib, repair="reconstruct")

    def forward():
        with torch.no_grad():
            dense(calib)

    times: dict[str, list[float]] = {k: [] for k in ("forward", "repair", "gram", "reconstruct")}
    for _ in range(repeats):  # interleaved, so load changes hit all four alike
        for key, fn in (("forward", forward), ("repair", repair), ("gram", gram_pass), ("reconstruct", reconstruct)):
            times[key].append(seconds(fn)[1])
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["reconstruct"] / (med["repair"] + med["gram"])
    return {"model": name, **{f"{k}_s": v for k, v in med.items()}, "ratio": ratio}


def write(rows: list[dict], speeds: list[dict], args) -> None:
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    lines = [START, "## Reconstruction sweep: sparsity x calibration size (issue 8)", "",
             "Global magnitude pruning, then `reconstruct` / `reconstruct+repair`, and the OBS pruner (`obs`, "
             "global allocation, nothing after it), each with the calibration size of the row; `auto` (64 "
             "samples) for comparison. Accuracy (%) on mnist:test (zoo: all 10,000; ResNet-20s: the first 2,000). "
             "`gap` = dense minus the best column. Seconds on 2 shared cores.", "",
             f"Reproduce: `python benchmarks/bench_reconstruct_sweep.py --write --repeats {args.repeats}`", "",
             "| model | sparsity | calib | dense | pruned | auto | reconstruct | rec+repair | obs | gap | "
             "reconstruct s | obs s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        best = max(r["reconstruct"], r["reconstruct+repair"], r["obs"])
        lines.append(f"| {r['model']} | {r['sparsity']:.2f} | {r['calib']} | {pct(r['dense'])} | {pct(r['pruned'])} | "
                     f"{pct(r['auto'])} | {pct(r['reconstruct'])} | {pct(r['reconstruct+repair'])} | {pct(r['obs'])} | "
                     f"{100 * (r['dense'] - best):.2f} | {r['reconstruct_s']:.1f} | {r['obs_s']:.1f} |")
    lines += ["", "Targets (gap = dense minus the best method and calibration size of that model and sparsity):", "",
              "| model | 0.90 (target <= 0.5) | 0.95 (target <= 2) | 0.98 (target <= 10) |", "|---|---:|---:|---:|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        cells = []
        for sparsity, target in ((0.9, 0.5), (0.95, 2.0), (0.98, 10.0)):
            sel = [r for r in rows if r["model"] == model and r["sparsity"] == sparsity]
            if not sel:
                cells.append("-")
                continue
            gap = round(min(100 * (r["dense"] - max(r["reconstruct"], r["reconstruct+repair"], r["obs"])) for r in sel), 2)
            cells.append(f"{gap:.2f} {'met' if gap <= target else 'MISSED'}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if speeds:
        lines += ["", f"Cost at 95%, 1,024 samples, median of {args.repeats} interleaved runs: reconstruct over "
                  "(one REPAIR = collect_stats of the dense model + exact repair_, plus one pass accumulating every "
                  "layer's Gram statistics). Target <= 3x.", "",
                  "| model | forward s | REPAIR s | Gram pass s | reconstruct s | ratio |", "|---|---:|---:|---:|---:|---:|"]
        for s in speeds:
            lines.append(f"| {s['model']} | {s['forward_s']:.3f} | {s['repair_s']:.3f} | {s['gram_s']:.3f} | "
                         f"{s['reconstruct_s']:.3f} | {s['ratio']:.2f}x |")
    lines.append(END)
    replace_section(RESULTS, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--sparsities", default="0.9,0.95,0.98")
    parser.add_argument("--calib", default="256,1024,4096")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="for the speed table")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md and the raw JSON")
    parser.add_argument("--write-only", action="store_true", help="re-render RESULTS.md from the cached raw JSON")
    args = parser.parse_args()
    if args.write_only:
        raw = json.loads(RAW.read_text())
        write(raw["rows"], raw["speed"], args)
        return
    torch.set_num_threads(args.threads)
    names = args.models.split(",")
    x, y = load_dataset("mnist:train")
    xt, yt = load_dataset("mnist:test")
    models = build_models(x, y, names)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    calibs = [int(c) for c in args.calib.split(",")]
    rows, speeds = [], []
    for name in names:
        rows += sweep(name, models[name], (x, y, xt, yt), sparsities, calibs)
    if not args.skip_speed:
        for name in names:
            speeds.append(speed(name, models[name], x, y, args.repeats))
            print(json.dumps(speeds[-1]), flush=True)
    if args.write:
        RAW.parent.mkdir(parents=True, exist_ok=True)
        RAW.write_text(json.dumps({"rows": rows, "speed": speeds}, indent=1))
        write(rows, speeds, args)


if __name__ == "__main__":
    main()
