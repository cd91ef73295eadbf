"""Transformers (issue 19): method x correction x sparsity on the zoo's ViT and byte-level LMs.

Every row is one run of the public CLI, ``prune-repair prune zoo:NAME --sparsity S --method M
--repair C --report FILE`` (one process per row, ``OMP_NUM_THREADS`` = ``--threads``), so the
figures are what a user gets. One run gives two columns: ``none`` (the pruned model before any
correction; for ``obs`` that already includes its own refit) and the correction's result.
``auto`` after ``obs`` applies nothing (the CLI says so), so ``obs`` is run with ``reconstruct``
only. ``obs-steps4`` is ``--method obs --obs-steps 4`` (gradual one-shot; not for N:M patterns). Seconds = the report's prune + correction time of that row (evaluation and loading
excluded); ``run s`` = the whole process.

- zoo:mnist-vit: accuracy on all 10,000 images of mnist:test, calibration 1,024 training images
  for every correction; 2:4 with ``--skip-first`` (the patch conv reads 49 inputs per row).
- zoo:py-gpt2, zoo:py-llama: perplexity on all of pysrc:eval, calibration 128 windows of
  pysrc:calib (``--calib-size 128``); the output head stays dense (the CLI default).

Rows are cached in benchmarks/cache/bench_transformers.json as they finish (a rerun continues);
RESULTS.md's section is rewritten after every row.

Usage: python benchmarks/bench_transformers.py [--models mnist-vit,py-gpt2] [--methods obs,wanda]
       [--corrections auto,reconstruct] [--sparsities 0.5,0.7] [--threads 2] [--write-only]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results_md import replace_section  # noqa: E402

CACHE = HERE / "cache"
RAW = CACHE / "bench_transformers.json"
RESULTS = HERE / "RESULTS.md"
START, END = "<!-- transformers:start -->", "<!-- transformers:end -->"
CLI = Path(sys.executable).with_name("prune-repair")
METHODS = ["global-magnitude", "wanda", "obs", "obs-steps4"]
# method names of the table that are CLI settings of another method (obs in 4 gradual steps; not for N:M)
VARIANTS = {"obs-steps4": ["--method", "obs", "--obs-steps", "4"]}
CORRECTIONS = ["auto", "reconstruct"]
SPARSITIES = {"mnist-vit": ["0.5", "0.7", "0.9", "2:4"], "py-gpt2": ["0.5", "0.6", "0.7", "2:4"],
              "py-llama": ["0.5", "0.6", "0.7", "2:4"]}
VIT_CALIB, LM_CALIB = 1024, 128
# issue 19's targets: (sparsity, allowed loss) in accuracy points (ViT) or % perplexity (LMs)
TARGETS = {"mnist-vit": [("0.7", 1.0), ("0.9", 10.0)], "lm": [("0.5", 1.0), ("0.7", 5.0), ("2:4", 3.0)]}


def command(model: str, method: str, correction: str, sparsity: str, out: Path, report: Path) -> list[str]:
    """The CLI call of one row."""
    args = [str(CLI), "prune", f"zoo:{model}", "--sparsity", sparsity, *VARIANTS.get(method, ["--method", method]),
            "--repair", correction, "--out", str(out), "--report", str(report), "--force"]
    if model == "mnist-vit":
        args += ["--data", "mnist", "--calib-size", str(VIT_CALIB)]
        if ":" in sparsity:
            args.append("--skip-first")
    else:
        args += ["--data", "pysrc", "--calib-size", str(LM_CALIB)]
    return args


def run_row(model: str, method: str, correction: str, sparsity: str, threads: int) -> dict:
    """Run the CLI once and keep the figures of its report."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        args = command(model, method, correction, sparsity, Path(tmp) / ("out.pt" if model == "mnist-vit" else "out"),
                       report)
        start = time.perf_counter()
        done = subprocess.run(args, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True, text=True)
        run_s = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        rep = json.loads(report.read_text())
    return from_report(model, method, correction, sparsity, rep, run_s)


def from_report(model: str, method: str, correction: str, sparsity: str, rep: dict, run_s: float) -> dict:
    """The figures of one row kept from the CLI's JSON report."""
    res = rep["results"][0]
    metric = "acc" if "acc_pruned" in res else "ppl"
    return {"model": model, "method": method, "correction": correction, "sparsity": sparsity, "metric": metric,
            "dense": rep["dense"][metric], "none": res[f"{metric}_pruned"], "corrected": res[f"{metric}_repaired"],
            "achieved": res["achieved_sparsity"], "prune_s": res["seconds"]["prune"],
            "correct_s": res["seconds"]["repair"], "run_s": run_s, "eval_samples": rep.get("eval_samples"),
            "calib_size": rep.get("calib_size"), "notes": rep.get("notes", [])}


def key(model: str, method: str, correction: str, sparsity: str) -> str:
    return f"{model}|{method}|{correction}|{sparsity}"


def gap(metric: str, dense: float, value: float) -> float:
    """How much worse than dense: accuracy points, or perplexity in % (positive = worse).

    >>> round(gap("ppl", 8.0, 8.4), 6), round(gap("acc", 0.98, 0.97), 6)
    (5.0, 1.0)
    """
    return (value / dense - 1) * 100 if metric == "ppl" else (dense - value) * 100


def fmt(metric: str, v: float) -> str:
    return f"{v:.3f}" if metric == "ppl" else f"{100 * v:.2f}"


def cells(raw: dict, model: str) -> dict:
    """(method, sparsity) -> {"none": .., "auto": .., "reconstruct": .., seconds per correction}."""
    out: dict = {}
    for r in raw.values():
        if r["model"] != model:
            continue
        c = out.setdefault((r["method"], r["sparsity"]), {"achieved": r["achieved"], "dense": r["dense"]})
        c["none"] = r["none"]
        c[r["correction"]] = r["corrected"]
        c[f"{r['correction']}_s"] = r["prune_s"] + r["correct_s"]
        c["none_s"] = r["prune_s"]
    return out


def best(table: dict, sparsity: str, metric: str) -> tuple[float, str] | None:
    """The best figure at one sparsity over methods and corrections, and where it comes from."""
    found = [(v, f"{m} + {k}") for (m, s), c in table.items() if s == sparsity
             for k, v in c.items() if k in ("none", "auto", "reconstruct")]
    if not found:
        return None
    return (min if metric == "ppl" else max)(found)


def model_lines(raw: dict, model: str) -> list[str]:
    table = cells(raw, model)
    if not table:
        return []
    metric = "ppl" if model != "mnist-vit" else "acc"
    dense = next(iter(table.values()))["dense"]
    unit = "% ppl" if metric == "ppl" else " pt"
    lines = [f"### zoo:{model}: dense {fmt(metric, dense)} {'ppl' if metric == 'ppl' else '%'}", "",
             "| sparsity | method | achieved | none | auto | reconstruct | best: loss vs dense | seconds none / auto / reconstruct |",
             "|---|---|---|---|---|---|---|---|"]
    order = SPARSITIES[model]
    for (method, sparsity), c in sorted(table.items(), key=lambda kv: (order.index(kv[0][1]), METHODS.index(kv[0][0]))):
        vals = [c.get(k) for k in ("none", "auto", "reconstruct")]
        got = [v for v in vals if v is not None]
        top = (min if metric == "ppl" else max)(got)
        secs = " / ".join(f"{c[k + '_s']:.1f}" if k + "_s" in c else "-" for k in ("none", "auto", "reconstruct"))
        lines.append(f"| {sparsity} | {method} | {100 * c['achieved']:.2f}% | "
                     + " | ".join(fmt(metric, v) if v is not None else "-" for v in vals)
                     + f" | {gap(metric, dense, top):+.2f}{unit} | {secs} |")
    return lines + [""]


def target_lines(raw: dict) -> list[str]:
    """Issue 19's targets, stated from the rows that exist."""
    lines = ["### Against issue 19's targets (computed from the rows above)", ""]
    for model in SPARSITIES:
        table = cells(raw, model)
        if not table:
            continue
        metric = "ppl" if model != "mnist-vit" else "acc"
        dense = next(iter(table.values()))["dense"]
        unit = "% ppl" if metric == "ppl" else " pt"
        for sparsity, allowed in TARGETS["mnist-vit" if model == "mnist-vit" else "lm"]:
            b = best(table, sparsity, metric)
            if b is None:
                lines.append(f"- zoo:{model} at {sparsity}: not measured yet.")
                continue
            loss = gap(metric, dense, b[0])
            lines.append(f"- zoo:{model} at {sparsity} (target: within {allowed:g}{unit}): best {fmt(metric, b[0])} "
                         f"({b[1]}), {loss:+.2f}{unit}: **{'met' if loss <= allowed else 'not met'}**.")
        for (method, sparsity), c in table.items():
            gm = table.get(("global-magnitude", sparsity), {}).get("reconstruct")
            if not method.startswith("obs") or gm is None or "reconstruct" not in c:
                continue
            obs = c["none"]
            better = obs <= gm if metric == "ppl" else obs >= gm
            name = "OBS" if method == "obs" else f"OBS ({' '.join(VARIANTS[method][2:])})"
            lines.append(f"- zoo:{model} at {sparsity}: {name} alone {fmt(metric, obs)} (+ reconstruct "
                         f"{fmt(metric, c['reconstruct'])}) vs global magnitude + reconstruct {fmt(metric, gm)} "
                         f"({name} alone {gap(metric, gm, obs):+.2f}{unit} against it): at least as good: "
                         f"**{'yes' if better else 'no'}**.")
    return lines + [""]


def write(raw: dict, threads: int) -> None:
    lines = [START, "## Transformers: method x correction x sparsity (issue 19, bench_transformers.py)", "",
             f"`python benchmarks/bench_transformers.py --threads {threads}` (CPU, shared 2-core machine). Each row "
             "pair is `prune-repair prune zoo:NAME --sparsity S --method M --repair auto|reconstruct --report F`. "
             f"ViT: accuracy (%) on all 10,000 images of mnist:test, `--calib-size {VIT_CALIB}`, 2:4 with "
             "`--skip-first`. LMs: "
             f"perplexity on all of pysrc:eval (lower is better), `--calib-size {LM_CALIB}` windows of 256 bytes, "
             "output head dense. Every layer is pruned (attention projections included). `none` = pruned, no "
             "correction (for `obs` this includes its own refit); `auto` after `obs` applies nothing, so it is not run. "
             "`obs` tries three masks per layer (`--obs-candidates obs,obs-damped,magnitude`, the default) and keeps "
             "the lowest refit error; `obs-steps4` = `--method obs --obs-steps 4` (gradual one-shot in 4 steps). "
             "Achieved = the report's sparsity over the pruned layers. Seconds = prune (+ correction), evaluation "
             "excluded; the machine was loaded by other jobs (load ~10 on 2 cores), so times are upper bounds.", ""]
    for model in SPARSITIES:
        lines += model_lines(raw, model)
    lines += target_lines(raw) + [END]
    replace_section(RESULTS, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(SPARSITIES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--corrections", default=",".join(CORRECTIONS))
    parser.add_argument("--sparsities", default=None, help="default: each model's own list")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write-only", action="store_true")
    args = parser.parse_args()
    CACHE.mkdir(exist_ok=True)
    raw = json.loads(RAW.read_text()) if RAW.is_file() else {}
    for model in [] if args.write_only else args.models.split(","):
        for sparsity in args.sparsities.split(",") if args.sparsities else SPARSITIES[model]:
            for method in args.methods.split(","):
                for correction in args.corrections.split(","):
                    k = key(model, method, correction, sparsity)
                    if k in raw or (method.startswith("obs") and correction == "auto") or (
                            method in VARIANTS and ":" in sparsity):
                        continue
                    raw[k] = run_row(model, method, correction, sparsity, args.threads)
                    print(json.dumps({n: v for n, v in raw[k].items() if n != "notes"}), flush=True)
                    RAW.write_text(json.dumps(raw, indent=1))
                    write(raw, args.threads)
    write(raw, args.threads)


if __name__ == "__main__":
    main()
