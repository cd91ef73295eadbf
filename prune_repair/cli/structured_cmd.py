"""``prune-repair prune MODEL --structured RATIO``: a physically smaller model.

:mod:`prune_cmd` hands over here when ``--structured`` is given. The model loses ``RATIO``
of every MLP's hidden units (transformers) or of every channel group (CNNs), is corrected
with ``--repair`` (default ``reconstruct``), then optionally pruned further at ``--sparsity``
(unstructured, after the structured step). ``--structured-heads RATIO`` also removes whole
attention heads of HF LLaMA-style models (the config's head counts shrink). The result is written so that it loads as it
is: an HF directory (``from_pretrained``; the config carries the new MLP width) for
``hf:DIR`` models, otherwise a :func:`~prune_repair.prune.structured.save_structured` file
(``load_structured_`` into a fresh model of the same ``--arch``).
"""

from __future__ import annotations

import math
from typing import Any

import click
import torch  # noqa: F401  (the doctests use it)
from click.core import ParameterSource
from rich.table import Table

from ..engine.checks import check_finite
from ..engine.correct.modes import RepairMode
from ..engine.correct.settings import RepairSettings
from ..io import load_model, resolve_arch
from ..io.hf import load_hf_model, save_hf_model
from ..metrics import evaluate as classify
from ..prune.methods import PruneMethod
from ..prune.pipeline import PruneRun, parse_sparsities, prune_and_repair
from ..prune.settings import PruneSettings
from ..prune.structured import save_structured
from ..prune.structured_heads import find_heads, heads_to_remove
from ..prune.structured_run import StructuredResult, check_ratio, structured_kind
from ..prune.structured_run import structured_prune
from ..prune.targets import PruneError
from . import hf_cmd
from .common import check_outputs, resolve_device
from .data_loading import calib_size_for, check_fits, data_options, load_data
from .method_options import method_options
from .output import out_console, progress, write_report, written

HF_CALIB_BATCH = 32
UNSUPPORTED = {"goal_stats": "--goal-stats", "sparsity_config": "--sparsity-config", "prune_head": "--prune-head",
               "preprocess": "--preprocess", "batch_size": "--batch-size", "eval_size": "--eval-size",
               "workers": "--workers"}


def _refuse_unsupported(options: dict[str, Any]) -> None:
    for key, flag in UNSUPPORTED.items():
        if options.get(key) not in (None, False):
            raise PruneError(f"{flag} does not combine with --structured yet: drop one of them")


METHOD_FLAGS = ("fisher_samples", "fisher_batch", "damp", "block_size", "obs_update", "max_memory_gb", "allocation",
                "obs_candidates", "obs_steps", "no_row_floor")
"""prune's options of the --sparsity step (its method and thresholds)."""


def _method_settings(method: PruneMethod, sparsities: list, seed: int, damping: float, options: dict[str, Any]) -> Any:
    """The ``--sparsity`` step's method settings from the method flags (given without that step: refused)."""
    if not sparsities:
        ctx = click.get_current_context(silent=True)
        given = [n for n in METHOD_FLAGS if ctx is not None and ctx.get_parameter_source(n) is ParameterSource.COMMANDLINE]
        if given:
            raise PruneError(f"--{given[0].replace('_', '-')} applies to the --sparsity step of --structured: "
                             "add --sparsity S or drop it")
        return None
    return method_options(method, options["fisher_samples"], options["fisher_batch"], options["damp"],
                          options["block_size"], options["obs_update"], options["max_memory_gb"], seed,
                          options["allocation"], damping, options["obs_candidates"], options["obs_steps"])


def _rows(res: StructuredResult, run: PruneRun | None, metric: str) -> list[dict[str, Any]]:
    """``results`` of the report: one row for the structured step, or one per --sparsity."""
    if run is None:
        row = {"sparsity": 0.0, "achieved_sparsity": 0.0, **res.to_dict(),
               "seconds": {"prune": res.seconds.get("prune", 0.0),
                           "repair": res.seconds.get("repair", res.seconds.get("prune_and_repair", 0.0))}}
        for stage, metrics in (("pruned", res.before), ("repaired", res.after)):
            row.update({f"{k}_{stage}": v for k, v in metrics.items()})
        if res.correction.get("sites") is not None:
            row["sites"] = res.correction["sites"]
        return [row]
    rows = []
    for r in run.to_report()["results"]:
        r.update(res.to_dict())
        r.update({f"{k}_structured": v for k, v in res.after.items()})
        if metric == "ppl":
            for stage in ("pruned", "repaired"):
                r.pop(f"acc_{stage}", None)
                r[f"ppl_{stage}"] = hf_cmd._exp(r[f"loss_{stage}"])
        rows.append(r)
    return rows


def _table(res: StructuredResult, rows: list[dict[str, Any]], dense: dict[str, float], metric: str, caption: str) -> Table:
    table = Table(title=f"structured {res.kind} pruning, repair: {res.repair}; params {res.params_before:,} -> "
                        f"{res.params_after:,}", caption=caption)
    combined = any(r["sparsity"] for r in rows)
    names = ["removed"] + (["sparsity"] if combined else []) + ["params", "latency", "dense", "pruned", "repaired"]
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)

    def fmt(value: float) -> str:
        return f"{value:.3f}" if metric == "ppl" else f"{100 * value:.2f}%"
    for r in rows:
        asked = r["pattern"] if r.get("pattern", "unstructured") != "unstructured" else f"{r['sparsity']:g}"
        cells = [f"{res.ratio:g}" + (f", heads {res.heads:g}" if res.heads else "")] + ([asked] if combined else [])
        table.add_row(*cells, f"{r['params_ratio']:.3f}x", f"{r['latency_ratio']:.2f}x", fmt(dense[metric]),
                      fmt(r[f"{metric}_pruned"]), fmt(r[f"{metric}_repaired"]))
    return table


def calib_batches(calib: Any, size: int = HF_CALIB_BATCH) -> Any:
    """Token calibration data (a dict of equal-length tensors) as a list of batches of ``size``
    sequences, so no forward holds the activations of all of them; other data as it is.

    >>> [b["input_ids"].shape[0] for b in calib_batches({"input_ids": torch.zeros(5, 3)}, 2)]
    [2, 2, 1]
    """
    if not isinstance(calib, dict):
        return calib
    n = len(next(iter(calib.values())))
    return [{k: v[i:i + size] for k, v in calib.items()} for i in range(0, n, size)]


def run_structured(*, ckpt, arch, arch_kwargs, data, eval_data, calib_size, seed, device, out, report, force,
                   sparsity, method, mode, structured, structured_heads, skip_first, skip_classifier, layers,
                   include_classifier, damping, structured_select="energy", **options: Any) -> None:
    """The ``prune --structured`` command (see the module doc)."""
    _refuse_unsupported(options)
    ratio = check_ratio(structured or 0.0)
    heads = check_ratio(structured_heads or 0.0, "--structured-heads")
    mode = mode or RepairMode.RECONSTRUCT.value
    sparsities = parse_sparsities(sparsity) if sparsity is not None else []
    method = PruneMethod.parse(method, "pruning method")
    method_settings = _method_settings(method, sparsities, seed, damping, options)
    dev = resolve_device(device)
    calib_size = calib_size_for(calib_size, mode)
    if hf_cmd.wants_hf(arch, [ckpt]):
        hf_arch = hf_cmd.resolve_hf_arch(arch, [ckpt], arch_kwargs)
        hf_cmd._output_checks(out, report, [ckpt, hf_arch], force)
        model = load_hf_model(ckpt, hf_arch).to(dev)
        check_finite(model)
        structured_kind(model)
        if heads:  # uneven or missing heads are refused before any data is read
            heads_to_remove(find_heads(model), heads)
        d = hf_cmd.load_hf_data(model, data, eval_data, calib_size, seed, dev)
        hf_cmd.check_hf_fits(model, d)
        calib, evaluate, metric = d.calib, d.evaluate, d.metric
        eval_name, count, settings = d.eval_name, d.eval_count, {"arch": hf_arch, "task": d.task, "out_format": "hf"}
    else:
        check_outputs(out, report, [ckpt], force)
        arch, arch_kwargs = resolve_arch([ckpt], arch, arch_kwargs)
        model = load_model(ckpt, arch, arch_kwargs).to(dev)
        check_finite(model)
        structured_kind(model)
        d = load_data(data, eval_data, calib_size, seed, dev, **data_options(None, None, None, None))
        check_fits(model, d.calib_x)
        calib, metric = d.calib_x, "acc"
        evaluate = lambda m: classify(m, d.eval_x, d.eval_y)  # noqa: E731
        eval_name, count, settings = d.eval_name, len(d.eval_y), {"out_format": "save_structured"}
    dense = evaluate(model)
    with progress():
        res = structured_prune(model, calib_batches(calib), ratio, heads=heads, select=structured_select, repair=mode,
                               damping=damping, include_classifier=include_classifier, evaluate=evaluate)
        run = None
        if sparsities:
            calib_pair = (calib, None) if isinstance(calib, dict) else (calib, d.calib_y)
            run = prune_and_repair(
                res.model, calib_pair, sparsities, method=method, options=method_settings,
                repair=RepairSettings(mode, damping=damping, include_classifier=include_classifier),
                eval_data=(lambda m: {"acc": math.nan, **evaluate(m)}) if isinstance(calib, dict) else (d.eval_x, d.eval_y),
                prune=PruneSettings(select=list(layers) or None, skip_first=skip_first, skip_classifier=skip_classifier,
                                    floor=not options["no_row_floor"]))
    final = run.model if run is not None else res.model
    if settings["out_format"] == "hf":
        save_hf_model(final, out, force=force)
    else:
        save_structured(final, out, res.history, d.calib_x[:1].cpu())
    rows = _rows(res, run, metric)
    write_report(report, {"method": method.value if sparsities else "structured", "repair": mode,
                          "dense": dense, "results": rows, "structured": ratio, "structured_heads": heads,
                          "structured_select": structured_select, "metric": metric,
                          "calib_size": calib_size, "seed": seed, "eval_data": eval_name, "damping": damping,
                          "skip_first": skip_first, "skip_classifier": skip_classifier,
                          "include_classifier": include_classifier, **settings})
    what = "perplexity (lower is better)" if metric == "ppl" else "accuracy"
    caption = (f"{what} on {eval_name} ({count} samples); pruned = before the correction (units dropped; with "
               "--sparsity, the zeros too); latency = forward time on the calibration batch over the dense "
               f"model's; the last row is written to {out}")
    out_console.print(_table(res, rows, dense, metric, caption))
    written({"model": out, "report": report})
