"""``merge`` for HF models (``prune-repair merge hf:A hf:B --data tokens.jsonl``).

The checkpoints are HF directories of one architecture (``hf:DIR``, or files that load into
``--arch hf:DIR``); batches are dicts fed as ``model(**batch)`` with their padding masks;
causal LMs are scored by perplexity, classifiers by accuracy, at each alpha of the curve,
raw and repaired; ``--out`` is an HF directory. Alignment uses the head-aware groups of
:mod:`prune_repair.merge.attention_groups` (GPT-2, LLaMA); other models merge with
``--align none``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from rich.table import Table

from ..io import tokens as tok
from ..io.errors import CheckpointError, DataError
from ..io.hf import is_causal_lm, load_hf_model, save_hf_model
from ..merge import prepare_merge
from ..io.outputs import atomic_write, check_output_path
from ..merge.barrier import alpha_grid, plot_points, require_matplotlib
from . import hf_cmd
from .common import check_finite_models
from .data_loading import calib_size_for
from .output import out_console, print_repair_notes, progress, write_report, written


def _barrier(endpoints: list[dict], points: list[dict], key: str, higher_is_better: bool) -> float | None:
    """Largest gap of ``key`` below (accuracy) or above (ppl, loss) the line between the endpoints."""
    if any(p.get(key) is None for p in points):
        return None
    sign = -1.0 if higher_is_better else 1.0
    start, end = endpoints[0][key.removesuffix("_raw")], endpoints[-1][key.removesuffix("_raw")]
    if points and points[0]["alpha"] is None:  # a uniform merge of several models
        line = sum(e[key.removesuffix("_raw")] for e in endpoints) / len(endpoints)
        return sign * (points[0][key] - line)
    return max(sign * (p[key] - ((1 - p["alpha"]) * start + p["alpha"] * end)) for p in points)


def _align_data(model: Any, data: str, align: str, size: int | None, seed: int, dev: Any) -> list[dict] | None:
    """``--align-size`` sequences (or images) of ``--data`` for activation matching, drawn with ``--seed``, in
    batches of ``hf_cmd.EVAL_BATCH``; None without ``--align-size``."""
    if size is None:
        return None
    if align != "activation":
        raise CheckpointError(f"--align-size sets the samples of activation matching, but --align is {align}: "
                              "drop --align-size or use --align activation")
    inputs, _ = hf_cmd._load_split(data, model, is_causal_lm(model))
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    if "input_ids" in inputs:
        drawn = tok.draw(inputs, size, seed)
    else:
        (key, x), = inputs.items()
        if size > len(x):
            raise DataError(f"--align-size {size} exceeds the {len(x)} samples in --data: lower --align-size")
        drawn = {key: x[torch.randperm(len(x), generator=torch.Generator().manual_seed(int(seed)))[:size]]}
    drawn = {k: v.to(dev) for k, v in drawn.items()}
    return [{k: v[i:i + hf_cmd.EVAL_BATCH] for k, v in drawn.items()} for i in range(0, size, hf_cmd.EVAL_BATCH)]


def merge(*, checkpoints: list[str], arch, arch_kwargs, data, eval_data, calib_size, seed, dev, out, report, force,
          align, alpha, mode, variant, curve, plot, groups, include_classifier, align_size=None, **unused: Any) -> None:
    hf_cmd._check_options(unused)
    if plot is not None:
        if len(checkpoints) > 2:
            raise CheckpointError("--plot draws the path between two checkpoints: drop --plot or merge two")
        check_output_path(plot, checkpoints + [out] + ([report] if report else []), force, what="--plot")
        require_matplotlib()
        curve = 11 if curve is None else curve
    arch = hf_cmd.resolve_hf_arch(arch, checkpoints, arch_kwargs)
    hf_cmd._output_checks(out, report, checkpoints + [arch], force)
    models = [load_hf_model(c, arch).to(dev) for c in checkpoints]
    check_finite_models(dict(zip(checkpoints, models)))
    calib_size = calib_size_for(calib_size, mode)
    d = hf_cmd.load_hf_data(models[0], data, eval_data, calib_size, seed, dev)
    hf_cmd.check_hf_fits(models[0], d)
    plan = prepare_merge(models, d.calib, align=align, groups=groups, seed=seed,
                         include_classifier=include_classifier, names=checkpoints,
                         align_data=_align_data(models[0], data, align, align_size, seed, dev))
    two = len(models) == 2
    weights = [1 - alpha, alpha] if two else None
    start = time.perf_counter()
    merged, result = plan.merged(weights, repair=mode, variant=variant)
    seconds = {"align": plan.seconds["groups"] + plan.seconds["align"], "repair": time.perf_counter() - start}
    endpoints = [d.evaluate(m) for m in plan.models]
    grid = alpha_grid(curve) if curve is not None else [alpha if two else None]
    points = []
    with progress() as bar:
        task = bar.add_task("merge curve", total=len(grid))
        for a in grid:
            w = [1 - a, a] if a is not None else None
            raw = d.evaluate(plan.merged(w, repair="none")[0])
            fixed = (d.evaluate(merged) if a == grid[0] and curve is None else
                     d.evaluate(plan.merged(w, repair=mode, variant=variant)[0])) if mode != "none" else {}
            points.append({"alpha": a, **{f"{k}_raw": v for k, v in raw.items()},
                           **{k: fixed.get(k) for k in raw}})
            bar.advance(task)
    metric = d.metric
    barrier = {f"{k}{s}": _barrier(endpoints, points, f"{k}{s}", k == "acc") for k in (metric, "loss")
               for s in ("_raw", "")}
    if plot is not None:
        with atomic_write(plot) as tmp:
            plot_points(points, endpoints, metric, mode, tmp,
                        title=f"{checkpoints[0]} -> {checkpoints[1]} (align {align}, repair {mode})")
    save_hf_model(merged, out, force=force)
    write_report(report, {"endpoints": endpoints, "curve": points, "barrier": barrier, "seconds": seconds,
                          "align": align, "alpha": alpha if two else None, "repair": mode, "variant": variant,
                          "calib_size": calib_size, "align_size": align_size, "seed": seed, "eval_data": d.eval_name,
                          "arch": arch,
                          "task": d.task, "metric": metric, "include_classifier": include_classifier,
                          "groups": groups, "out_format": "hf",
                          "alignments": [al.to_dict() | {"perms": None} for al in plan.alignments[1:]]})
    _print(checkpoints, endpoints, points, barrier, metric, align, mode, out, d)
    written({"model": out, "report": report, "plot": plot})
    if result is not None:
        print_repair_notes(result)


def _print(checkpoints, endpoints, points, barrier, metric, align, mode, out, d) -> None:
    fmt = (lambda m: f"{m:.3f}") if metric == "ppl" else (lambda m: f"{100 * m:.2f}%")
    unit = "" if metric == "ppl" else " pts"
    scale = 1.0 if metric == "ppl" else 100.0
    gaps = [f"{what} {scale * barrier[metric + s]:.3f}{unit}" for what, s in (("raw", "_raw"), ("repaired", ""))
            if barrier[metric + s] is not None]
    table = Table(title=f"merge (align {align}, repair {mode})",
                  caption=f"{metric} barrier {', '.join(gaps)}; evaluated on {d.eval_name} ({d.eval_count} sequences); "
                          f"written to {out}")
    table.add_column("model")
    table.add_column("perplexity" if metric == "ppl" else "accuracy", justify="right")
    table.add_column("loss", justify="right")
    for name, e in zip(checkpoints, endpoints):
        table.add_row(name, fmt(e[metric]), f"{e['loss']:.4f}")
    for p in points:
        where = "uniform" if p["alpha"] is None else f"alpha {p['alpha']:.2f}"
        table.add_row(f"merged, raw, {where}", fmt(p[metric + "_raw"]), f"{p['loss_raw']:.4f}")
        if p.get(metric) is not None:
            table.add_row(f"merged + {mode}, {where}", fmt(p[metric]), f"{p['loss']:.4f}")
    out_console.print(table)
