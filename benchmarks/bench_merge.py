"""Merging benchmark: midpoint accuracy of aligned + repaired MNIST model pairs, barrier
curves, and the cost of weight and activation matching.

For every pair (two models of one architecture trained from seeds 0 and 1 on MNIST, cached
in ``benchmarks/cache/``) it measures on all of ``mnist:test``:

- the endpoints, the naive midpoint (no alignment), and for weight matching (WM) and
  activation matching (AM) the aligned midpoint raw / + reset / + repair / + rescale
  (exact one-pass variant) and AM + repair in the closed-form variant;
- a barrier curve (AM, raw and ``auto`` repair) drawn to ``benchmarks/merge_curve_NAME.png``;
- the time of WM and AM (median of 3 runs) and, for AM, the ratio to one plain forward
  pass of both models over the same calibration data.

Calibration: 1,000 training images drawn with seed 0, in 4 batches of 250. Budget (stated
plainly): MLPs train 3 epochs on all 60k images with He initialization; the CNNs 2 epochs;
the ResNet-20 layout runs at width 8 (half of the standard 16) for 3 epochs on 20k images.

Run from the repository root (the package importable)::

    python benchmarks/bench_merge.py                 # all pairs; writes RESULTS.md section
    python benchmarks/bench_merge.py mlp-8x128       # some pairs (results cached per pair)
    python benchmarks/bench_merge.py mlp-4x128 --epochs 12   # extra row: longer training
    python benchmarks/bench_merge.py --report-only   # rebuild the RESULTS.md section from the cache
    python benchmarks/bench_merge.py py-gpt2         # the zoo's two byte-level GPT-2s: perplexity at alpha 0.5
    python benchmarks/bench_merge.py vit             # two MNIST ViTs (zoo:mnist-vit + zoo:mnist-vit-b when
                                                     # installed, else two tiny ones trained here): own section
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from results_md import replace_section
from torch import nn

from prune_repair.io.data import calibration_batch, load_dataset
from prune_repair.metrics.classify import evaluate
from prune_repair.merge import (
    activation_matching,
    barrier_curve,
    plot_curve,
    prepare_merge,
    weight_matching,
)
from prune_repair import zoo
from prune_repair.zoo.models import MLP, PlainCNN, ResNetMini
from prune_repair.zoo.vit import mnist_vit
from training import load_or_train

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
RESULTS = HERE / "RESULTS.md"
START, END = "<!-- merge:start -->", "<!-- merge:end -->"

MLP_TRAIN = {"epochs": 3, "lr": 0.05, "batch_size": 128, "samples": 60000}
PAIRS: dict[str, dict] = {
    **{f"mlp-{d}x{w}": {"build": (lambda d=d, w=w: MLP(widths=(w,) * d)), "he_init": True, "train": MLP_TRAIN}
       for w in (128, 512) for d in (4, 8, 12)},
    "vgg-bn": {"build": lambda: PlainCNN(channels=(16, 32, 64), batch_norm=True),
               "train": {"epochs": 2, "lr": 0.05, "batch_size": 128, "samples": 60000}},
    "vgg": {"build": lambda: PlainCNN(channels=(16, 32, 64)),
            "train": {"epochs": 2, "lr": 0.05, "batch_size": 128, "samples": 60000}},
    "resnet20-bn": {"build": lambda: ResNetMini(width=8, blocks_per_stage=(3, 3, 3), norm="bn"),
                    "train": {"epochs": 3, "lr": 0.1, "batch_size": 128, "samples": 20000}},
    "resnet20-ln": {"build": lambda: ResNetMini(width=8, blocks_per_stage=(3, 3, 3), norm="ln"),
                    "train": {"epochs": 3, "lr": 0.1, "batch_size": 128, "samples": 20000}},
}

VIT_OWN = {"num_layers": 2, "hidden_dim": 32, "num_heads": 4, "mlp_dim": 64}
TRANSFORMER_PAIRS: dict[str, dict] = {
    # the zoo's two MNIST ViTs when their weights are installed, else two tiny ones trained here
    "vit": {"build": lambda: mnist_vit(**VIT_OWN), "zoo": ("mnist-vit", "mnist-vit-b"),
            "train": {"epochs": 5, "lr": 0.05, "batch_size": 128, "samples": 60000}},
}
LM_PAIRS = {"py-gpt2": ("py-gpt2", "py-gpt2-b")}  # the zoo's byte-level GPT-2s from two seeds (HF directories)
LM_CALIB, LM_EVAL = "pysrc:calib", "pysrc:eval"
PAIRS.update(TRANSFORMER_PAIRS)
VIT_START, VIT_END = "<!-- merge-vit:start -->", "<!-- merge-vit:end -->"


def he_init_(model: nn.Module) -> None:
    """He (Kaiming normal, fan-in) weights and zero biases: deep ReLU MLPs train from it."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)


def run_key(name: str, epochs: int | None) -> str:
    """Cache/result key of a pair; ``@eN`` marks a run with the training epochs overridden."""
    return name if epochs is None else f"{name}@e{epochs}"


def trained_pair(name: str, x: torch.Tensor, y: torch.Tensor, epochs: int | None = None) -> list[nn.Module]:
    spec, models = PAIRS[name], []
    if "zoo" in spec and epochs is None and all(zoo.weights_path(n).is_file() for n in spec["zoo"]):
        return [zoo.load(f"zoo:{n}").eval() for n in spec["zoo"]]
    t = {**spec["train"], **({} if epochs is None else {"epochs": epochs})}
    key = run_key(name, epochs)
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = spec["build"]()
        if spec.get("he_init"):
            he_init_(model)
        n = t["samples"]
        models.append(load_or_train(CACHE / f"merge-{key}-s{seed}.pt", model, x[:n], y[:n], t["epochs"], t["lr"],
                                    seed, t["batch_size"], log=lambda line: print(f"  {name} s{seed} {line}",
                                                                                   flush=True)))
    return models


def median_seconds(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_both(models: list[nn.Module], batches: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for m in models:
            for b in batches:
                m(b)


def source_of(name: str, epochs: int | None) -> str:
    """Where a pair's models come from (zoo weights, or trained here with which budget)."""
    spec = PAIRS[name]
    if "zoo" in spec and epochs is None and all(zoo.weights_path(n).is_file() for n in spec["zoo"]):
        return " + ".join(f"zoo:{n}" for n in spec["zoo"])
    t = {**spec["train"], **({} if epochs is None else {"epochs": epochs})}
    return f"trained here, seeds 0/1, {t['epochs']} epochs on {t['samples']} images"


def run_pair(name: str, x, y, x_test, y_test, curve_points: int, epochs: int | None = None) -> dict:
    models = trained_pair(name, x, y, epochs)
    calib_x, _ = calibration_batch(x, y, 1000, seed=0)
    calib = list(calib_x.split(250))
    acc = lambda m: evaluate(m, x_test, y_test)["acc"]  # noqa: E731
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in models[0].modules())
    row: dict = {"endpoints": [acc(m) for m in models], "source": source_of(name, epochs)}
    row["naive"] = acc(prepare_merge(models, calib, align="none").merged([0.5, 0.5], repair="none")[0])
    plans = {}
    for method in ("weight", "activation"):
        plan = plans[method] = prepare_merge(models, calib, align=method)
        short = "wm" if method == "weight" else "am"
        for mode in ("none", "reset", "repair", "rescale"):
            if mode == "reset" and not has_bn:
                row[f"{short}_{mode}"] = None
                continue
            row[f"{short}_{mode}"] = acc(plan.merged([0.5, 0.5], repair=mode)[0])
        row[f"{short}_sweeps"] = plan.alignments[1].sweeps
    row["am_closed_form"] = acc(plans["activation"].merged([0.5, 0.5], repair="repair", variant="closed-form")[0])
    groups = plans["weight"].groups
    row["seconds"] = {
        "wm": median_seconds(lambda: weight_matching(models[0], models[1], groups)),
        "am": median_seconds(lambda: activation_matching(models[0], models[1], calib, groups)),
        "forward": median_seconds(lambda: forward_both(models, calib)),
    }
    curve = barrier_curve(None, None, None, x_test, y_test, alphas=curve_points, repair="auto",
                          plan=plans["activation"])
    row["curve"] = curve.to_dict()
    key = run_key(name, epochs)
    plot_curve(curve, HERE / f"merge_curve_{key}.png", title=f"{key}: activation matching, raw vs auto repair")
    return row


def run_lm_pair(name: str, calib_size: int = 64) -> dict:
    """Perplexity at alpha 0.5 of two zoo LMs: naive, WM and AM, raw and repaired (padding-aware)."""
    from prune_repair.cli.hf_cmd import load_hf_data
    from prune_repair.io.hf import load_hf_dir

    models = [load_hf_dir(f"zoo:{n}") for n in LM_PAIRS[name]]
    d = load_hf_data(models[0], LM_CALIB, LM_EVAL, calib_size, 0, torch.device("cpu"))
    row: dict = {"endpoints": [d.evaluate(m)["ppl"] for m in models], "calib_size": calib_size,
                 "source": " + ".join(f"zoo:{n}" for n in LM_PAIRS[name]), "eval": f"{LM_EVAL} ({d.eval_count})"}
    row["naive"] = d.evaluate(prepare_merge(models, d.calib, align="none").merged([0.5, 0.5], repair="none")[0])["ppl"]
    for method, short in (("weight", "wm"), ("activation", "am")):
        plan = prepare_merge(models, d.calib, align=method)
        for mode in ("none", "repair"):
            row[f"{short}_{mode}"] = d.evaluate(plan.merged([0.5, 0.5], repair=mode)[0])["ppl"]
    return row


def lm_lines(results: dict[str, dict]) -> list[str]:
    """Rows of the LM table: perplexity at alpha 0.5 and its increase over the endpoints' mean."""
    lines = ["", f"Byte-level LMs: perplexity on {LM_EVAL} at alpha 0.5 (calibration: sequences of {LM_CALIB}); "
             "in brackets the increase over the endpoints' mean perplexity (target: aligned + repair under half "
             "of naive's increase).", "",
             "| pair | models | A | B | naive | WM | WM+repair | AM | AM+repair | best aligned+repair / naive |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        mean = sum(r["endpoints"]) / 2
        inc = {k: r[k] - mean for k in ("naive", "wm_none", "wm_repair", "am_none", "am_repair")}
        cells = [f"{v:.3f}" for v in r["endpoints"]] + [f"{r[k]:.3f} ({inc[k]:+.3f})" for k in inc]
        best = min(inc["wm_repair"], inc["am_repair"]) / inc["naive"]
        lines.append(f"| {name} | {r['source']} | " + " | ".join(cells) + f" | {best:.2f} |")
    return lines


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def section(results: dict[str, dict], meta: dict) -> str:
    lines = [START, "## Merging (bench_merge.py)", "",
             f"Measured {meta['date']} with torch {meta['torch']}, {meta['threads']} CPU thread(s) on a shared "
             "2-core machine. Reproduce: `python benchmarks/bench_merge.py` (trained pairs cached in "
             "benchmarks/cache/). Reduced budget: MLPs 3 epochs (He init), CNNs (channels 16/32/64) 2 epochs, "
             "ResNet-20 layout at width 8 for 3 epochs on 20k images; calibration 1,000 training images; "
             "accuracy on all 10,000 test images (%). Exact one-pass repair unless noted; `reset` only applies "
             "to BatchNorm nets. Rows `PAIR@eN` were trained for N epochs instead (`--epochs N`).", "",
             "| pair | A | B | naive | WM | WM+reset | WM+repair | WM+rescale | AM | AM+reset | AM+repair | "
             "AM+rescale | AM+repair closed-form |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        cells = [pct(r["endpoints"][0]), pct(r["endpoints"][1]), pct(r["naive"])]
        cells += [pct(r[f"{m}_{k}"]) for m in ("wm", "am") for k in ("none", "reset", "repair", "rescale")]
        cells.append(pct(r["am_closed_form"]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Barriers along the AM-aligned path (11 alphas; accuracy barrier = largest drop below the line "
              "between the endpoints, in points; `auto` = reset at BatchNorm sites, repair elsewhere):", "",
              "| pair | acc barrier raw | acc barrier auto | loss barrier raw | loss barrier auto | plot |",
              "|---|---|---|---|---|---|"]
    for name, r in results.items():
        b = r["curve"]["barrier"]
        lines.append(f"| {name} | {pct(b['acc_raw'])} | {pct(b['acc'])} | {b['loss_raw']:.3f} | {b['loss']:.3f} | "
                     f"[png](merge_curve_{name}.png) |")
    lines += ["", "Alignment cost, median of 3 runs on the 1,000 calibration images. `forward` = one plain "
              "no-grad pass of BOTH models over the same data (the floor for activation matching).", "",
              "| pair | WM s | WM sweeps | AM s | forward s | AM / forward |", "|---|---|---|---|---|---|"]
    ratios = []
    for name, r in results.items():
        s = r["seconds"]
        ratios.append(s["am"] / s["forward"])
        lines.append(f"| {name} | {s['wm']:.3f} | {r['wm_sweeps']} | {s['am']:.3f} | {s['forward']:.3f} | "
                     f"{ratios[-1]:.1f}x |")
    lines += ["", f"Median AM / forward ratio over the pairs: {statistics.median(ratios):.1f}x; median WM time "
              f"{statistics.median(r['seconds']['wm'] for r in results.values()):.3f} s, median AM time "
              f"{statistics.median(r['seconds']['am'] for r in results.values()):.3f} s.", END]
    return "\n".join(lines)


def gap(r: dict, key: str) -> float | None:
    """Barrier at alpha 0.5: the endpoints' mean accuracy minus the merged model's, in points."""
    return None if r.get(key) is None else 100 * (sum(r["endpoints"]) / 2 - r[key])


def vit_section(results: dict[str, dict], meta: dict) -> str:
    """RESULTS.md section of the transformer pairs: midpoint accuracy and barriers."""
    lines = [VIT_START, "## Merging transformers (bench_merge.py vit)", "",
             f"Measured {meta['date']} with torch {meta['torch']}, {meta['threads']} CPU thread(s) on a shared "
             "2-core machine. Reproduce: `python benchmarks/bench_merge.py vit` (models trained here are cached "
             "in benchmarks/cache/, git-ignored). Head-aware permutation groups (heads as units, dims inside "
             "heads, residual stream, MLP units); calibration 1,000 training images; accuracy on all 10,000 "
             "test images (%). Exact one-pass repair.", "",
             "| pair | models | A | B | naive | WM | WM+repair | WM+rescale | AM | AM+repair | AM+rescale |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        cells = [pct(r["endpoints"][0]), pct(r["endpoints"][1]), pct(r["naive"])]
        cells += [pct(r[k]) for k in ("wm_none", "wm_repair", "wm_rescale", "am_none", "am_repair", "am_rescale")]
        lines.append(f"| {name} | {r.get('source', '?')} | " + " | ".join(cells) + " |")
    lines += ["", "Barrier at alpha 0.5 (mean endpoint accuracy minus the merged model's, points; target: aligned + "
              "repair under half of naive), and over the whole AM path (`--curve` alphas, raw and `auto` repair):", "",
              "| pair | naive | WM | WM+repair | AM | AM+repair | best aligned+repair / naive | AM path raw | "
              "AM path repaired | plot |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        g = {k: gap(r, k) for k in ("naive", "wm_none", "wm_repair", "am_none", "am_repair")}
        best = min(g["wm_repair"], g["am_repair"])
        b = r["curve"]["barrier"]
        lines.append(f"| {name} | " + " | ".join(f"{g[k]:.1f}" for k in g) +
                     f" | {best / g['naive']:.2f} | {pct(b['acc_raw'])} | {pct(b['acc'])} | "
                     f"[png](merge_curve_{name}.png) |")
    lm = {f.stem[len("merge-lm-"):]: json.loads(f.read_text()) for f in sorted(CACHE.glob("merge-lm-*.json"))}
    if lm:
        lines += lm_lines(lm) + ["", "Reproduce the LM row: `python benchmarks/bench_merge.py py-gpt2` (needs the zoo's "
                                 "HF directories)."]
    lines.append(VIT_END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="*", help=f"pairs to run (default: all of {', '.join(PAIRS)})")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    parser.add_argument("--curve", type=int, default=11, help="alphas on each barrier curve")
    parser.add_argument("--epochs", type=int, default=None, help="override the training epochs (extra rows "
                        "named PAIR@eN, e.g. to see how weight matching depends on training length)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild RESULTS.md from cached results")
    args = parser.parse_args()
    unknown = [p for p in args.pairs if p not in PAIRS and p not in LM_PAIRS]
    if unknown:
        parser.error(f"unknown pair(s) {', '.join(unknown)}: choose from {', '.join([*PAIRS, *LM_PAIRS])}")
    torch.set_num_threads(args.threads)
    CACHE.mkdir(exist_ok=True)
    for name in [p for p in args.pairs if p in LM_PAIRS and not args.report_only]:
        row = run_lm_pair(name)
        (CACHE / f"merge-lm-{name}.json").write_text(json.dumps(row, indent=1))
        print(f"{name}: {json.dumps(row)}", flush=True)
    args.pairs = [p for p in args.pairs if p not in LM_PAIRS]
    if not args.pairs and any(p in LM_PAIRS for p in sys.argv[1:]):
        args.pairs = list(TRANSFORMER_PAIRS)  # the section holds both: rebuild it from the cache
        args.report_only = True
    if not args.report_only:
        x, y = load_dataset("mnist:train")
        x_test, y_test = load_dataset("mnist:test")
        for name in args.pairs or PAIRS:
            start = time.perf_counter()
            row = run_pair(name, x, y, x_test, y_test, args.curve, args.epochs)
            row["meta"] = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": args.threads}
            key = run_key(name, args.epochs)
            (CACHE / f"merge-results-{key}.json").write_text(json.dumps(row, indent=1))
            print(f"{key}: {json.dumps({k: v for k, v in row.items() if k not in ('curve', 'meta')})} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    files = sorted(CACHE.glob("merge-results-*.json"), key=lambda f: (
        list(PAIRS).index(f.stem[len("merge-results-"):].split("@")[0]), f.stem))
    results = {f.stem[len("merge-results-"):]: json.loads(f.read_text()) for f in files
               if f.stem[len("merge-results-"):].split("@")[0] in PAIRS}
    plain = {k: v for k, v in results.items() if k.split("@")[0] not in TRANSFORMER_PAIRS}
    transformers = {k: v for k, v in results.items() if k.split("@")[0] in TRANSFORMER_PAIRS}
    if plain:  # a section is rebuilt only from its own cached results (never emptied)
        replace_section(RESULTS, section(plain, next(iter(plain.values()))["meta"]))
        print(f"wrote the merge section of {RESULTS} ({len(plain)} pairs)")
    if transformers:
        replace_section(RESULTS, vit_section(transformers, next(iter(transformers.values()))["meta"]))
        print(f"wrote the merge-vit section of {RESULTS} ({len(transformers)} pairs)")


if __name__ == "__main__":
    sys.exit(main())
