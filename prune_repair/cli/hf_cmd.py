"""``prune`` and ``repair`` for HF models (``--arch hf:DIR`` or a checkpoint ``hf:DIR``).

The commands in :mod:`prune_cmd` / :mod:`repair_cmd` hand over here when the model is an
HF directory: data may be tokenized (:mod:`prune_repair.io.tokens`) or images (``x``/``y``,
fed as the model's ``pixel_values``); batches are dicts fed as ``model(**batch)``; causal
LMs are evaluated by perplexity (``{"ppl", "loss"}``), classifiers by accuracy; ``--out``
is an HF directory written with ``save_pretrained`` (safetensors), atomically.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from rich.table import Table

from ..engine.run import distributed
from ..engine.checks import check_finite
from ..io.errors import DataError
from ..metrics.lm import accuracy, logits_of, perplexity
from ..engine.run.forward import default_forward, eval_mode, head
from ..io import tokens as tok
from ..io.pysrc import default_eval_spec
from ..io.data import calibration_batch, load_dataset
from ..io.errors import CheckpointError, _first_line
from ..io.hf import (check_hf_output, hf_settings, is_causal_lm, is_hf_spec, load_hf_model, model_inputs_name,
                     save_hf_model)
from ..io.outputs import check_output_path
from ..prune.methods import PruneMethod
from ..engine.correct.settings import RepairSettings
from .prune_notes import print_prune_notes
from ..prune.pipeline import prune_and_repair
from .goal_option import goal_inputs, goal_note, load_goal
from .method_options import fisher_settings, method_options, run_settings
from .common import check_finite_models
from .data_loading import calib_size_for
from .output import console, print_repair_notes, repair_title, write_report

EVAL_BATCH = 32


def wants_hf(arch: str | None, checkpoints: list[str]) -> bool:
    """Whether a command runs on an HF model: ``--arch hf:DIR``, or (no --arch) a checkpoint ``hf:DIR``."""
    return is_hf_spec(arch) if arch else any(is_hf_spec(c) for c in checkpoints)


def resolve_hf_arch(arch: str | None, checkpoints: list[str], arch_kwargs: Any) -> str:
    hf_settings(arch_kwargs)
    if arch:
        return arch
    return next(c for c in checkpoints if is_hf_spec(c))


@dataclass
class HFData:
    """Calibration batch (model inputs) and evaluation set of an HF command."""

    calib: dict[str, torch.Tensor]
    calib_labels: torch.Tensor | None  # class labels of the calibration sequences (classifiers)
    eval_batches: list[dict[str, torch.Tensor]]
    eval_labels: list[torch.Tensor] | None  # class labels per batch (classifiers)
    eval_name: str
    eval_count: int
    task: str  # "lm" or "classifier"

    @property
    def metric(self) -> str:
        return "ppl" if self.task == "lm" else "acc"

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        if self.task == "lm":
            return perplexity(model, self.eval_batches)
        return accuracy(model, self.eval_batches, self.eval_labels)


def _load_split(spec: str, model: torch.nn.Module, lm: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """(inputs incl. optional token labels, class labels or None) of a data spec."""
    name = model_inputs_name(model)
    if tok.is_token_data(spec):
        data = tok.load_tokens(spec)
        if name != "input_ids":
            raise DataError(f"{spec} holds token ids but the model takes {name}: give data of the model's kind")
        labels = data.get("labels")
        if labels is not None and labels.dim() == 1:
            data = {k: v for k, v in data.items() if k != "labels"}
            return data, labels
        return data, None
    if name == "input_ids":
        raise DataError(f"{spec} holds no 'input_ids' but the model reads token ids: give a .pt/.npz with "
                        "input_ids (and attention_mask) or a .jsonl with one {\"input_ids\": [...]} per line")
    x, y = load_dataset(spec)
    return {name: x}, y


def load_hf_data(model: torch.nn.Module, data: str, eval_data: str | None, calib_size: int, seed: int,
                 device: torch.device, shard_calib: bool = False) -> HFData:
    """Calibration draw and evaluation set; ``shard_calib``: under torchrun each rank keeps its share of the
    calibration sequences (the engine pools every statistic across ranks), evaluation stays whole."""
    if calib_size < 2:
        raise DataError(f"--calib-size {calib_size} is too small: statistics need at least 2 samples")
    lm = is_causal_lm(model)
    eval_data = eval_data or default_eval_spec(data) or data  # pysrc -> pysrc:eval
    inputs, labels = _load_split(data, model, lm)
    calib_labels = None
    if "input_ids" in inputs:
        calib = tok.draw(inputs, calib_size, seed)
        if labels is not None:  # the same draw as tok.draw
            calib_labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(int(seed)))
                                  [:calib_size]]
    else:  # images: the draw of calibration_batch
        (key, x), = inputs.items()
        calib_x, calib_labels = calibration_batch(x, labels, calib_size, seed)
        calib = {key: calib_x}
    calib = {k: v for k, v in calib.items() if k != "labels"}  # token targets only score the evaluation
    ev_inputs, ev_labels = (inputs, labels) if eval_data == data else _load_split(eval_data, model, lm)
    if not lm and ev_labels is None:
        raise DataError(f"--eval-data {eval_data} has no labels, which accuracy needs: add 'labels' (one class "
                        "per sequence) or give x/y data")
    batches, label_batches = [], []
    n = tok.num_sequences(ev_inputs)
    for start in range(0, n, EVAL_BATCH):
        part = slice(start, start + EVAL_BATCH)
        batches.append(tok.select(ev_inputs, part) if "input_ids" in ev_inputs else
                       {k: v[part] for k, v in ev_inputs.items()})
        if ev_labels is not None:
            label_batches.append(ev_labels[part])
    if shard_calib and distributed.is_distributed():
        if calib_size < 2 * distributed.world_size():
            raise DataError(f"--calib-size {calib_size} leaves a rank fewer than 2 sequences: raise it to at least "
                            f"{2 * distributed.world_size()}")
        part = distributed.shard(calib_size)
        calib = {k: v[part] for k, v in calib.items()}
        calib_labels = None if calib_labels is None else calib_labels[part]
    return HFData({k: v.to(device) for k, v in calib.items()},
                  None if lm or calib_labels is None else calib_labels.to(device), batches, label_batches if not lm else None,
                  eval_data, n, "lm" if lm else "classifier")


def check_hf_fits(model: torch.nn.Module, d: HFData) -> None:
    """Run two calibration samples through the model: failures become one line."""
    try:
        with eval_mode(model), torch.no_grad():
            out = logits_of(default_forward(model, head(d.calib, 2)))
    except DataError:
        raise
    except Exception as err:  # token id beyond the vocabulary, wrong image size, ...
        raise DataError(f"--data does not fit the model ({_first_line(err)}): check --data and --arch "
                        "(token ids below vocab_size, image size of the config)") from None
    if out.is_floating_point() and not bool(torch.isfinite(out).all()):
        raise DataError("the model outputs NaN/Inf on --data: check the data and the checkpoint")


IMAGE_ONLY = {"preprocess": "it sets the transforms of ImageFolder images", "workers": "it sets the processes that "
              "read ImageFolder images", "eval_size": "the HF path evaluates every --eval-data sequence"}


def _check_options(unused: dict[str, Any], takes: tuple[str, ...] = (), ranks: bool = False) -> None:
    """Refuse the options that do not apply to HF models, saying why (never ignore them)."""
    for option, why in IMAGE_ONLY.items():
        if unused.get(option) is not None:
            raise CheckpointError(f"--{option.replace('_', '-')} does not apply to hf models: {why}; drop it")
    for option in ("goal_stats", "batch_size"):
        if unused.get(option) is not None and option not in takes:
            raise CheckpointError(f"--{option.replace('_', '-')} does not apply to this hf command: drop it")
    if distributed.is_distributed() and not ranks:
        raise CheckpointError("torchrun does not apply to this hf command: it does not split its calibration sequences "
                              "across ranks (prune and repair do); launch it as one process")


def _output_checks(out: str, report: str | None, inputs: list[str], force: bool) -> None:
    check_hf_output(out, inputs, force)
    if report is not None:
        check_output_path(report, inputs + [out], force, what="--report")


# --- prune --------------------------------------------------------------------------


def prune(*, ckpt, arch, arch_kwargs, data, eval_data, calib_size, seed, dev, out, report, force, sparsities,
          method, mode, skip_first, skip_classifier, layers, include_classifier, damping, config=None,
          prune_head=False, no_row_floor=False, allocation="global", block_size=128, fisher_samples=None,
          fisher_batch=1, damp=1e-5, obs_update=False, max_memory_gb=4.0, passes="lockstep", offload=None,
          batch_size=None, goal_stats=None, include_tied=False, obs_candidates="obs,obs-damped,magnitude", obs_steps=1,
          **_: Any) -> None:
    _check_options(_, ranks=True)
    arch = resolve_hf_arch(arch, [ckpt], arch_kwargs)
    method = PruneMethod.parse(method, "pruning method")
    _output_checks(out, report, [ckpt, arch, *goal_inputs(goal_stats)], force)
    model = load_hf_model(ckpt, arch).to(dev)
    check_finite(model)
    calib_size = calib_size_for(calib_size, "reconstruct" if method.reconstructs else mode)
    d = load_hf_data(model, data, eval_data, calib_size, seed, dev, shard_calib=True)
    check_hf_fits(model, d)
    goal, goal_info = load_goal(goal_stats, model, d.calib, mode, include_classifier) if goal_stats else (None, None)
    options = method_options(method, fisher_samples, fisher_batch, damp, block_size, obs_update, max_memory_gb, seed,
                             allocation, damping, obs_candidates, obs_steps)
    if method.needs_labels:  # a causal LM's own next-token loss; a classifier's loss on its labels
        if d.task == "classifier" and d.calib_labels is None:
            raise DataError(f"--method {method.value} on a classifier needs one class label per calibration "
                            "sequence: add 'labels' to --data")
        options.num_grads = options.gradients_for(calib_size)  # every rank's share together
    prune_settings, repair_settings = run_settings(**locals())
    run = prune_and_repair(
        model, (d.calib, d.calib_labels), sparsities, method=method, options=options,
        prune=prune_settings, repair=repair_settings,
        eval_data=lambda m: {"acc": math.nan, **d.evaluate(m)},
    )
    if distributed.is_main_process():  # one directory, from rank 0 (every rank holds the same weights)
        save_hf_model(run.model, out, force=force)
    rep = run.to_report()
    if d.task == "lm":
        rep["dense"] = {k: v for k, v in run.dense.items() if k in ("ppl", "loss")}
        for row in rep["results"]:
            for stage in ("pruned", "repaired"):
                row.pop(f"acc_{stage}", None)
                row[f"ppl_{stage}"] = _exp(row[f"loss_{stage}"])
    settings = {"arch": arch, "task": d.task, "metric": d.metric, "calib_size": calib_size, "seed": seed,
                "eval_data": d.eval_name, "skip_first": skip_first, "skip_classifier": skip_classifier,
                "include_classifier": include_classifier, "layers": list(layers) or None, "out_format": "hf",
                "sparsity_config": config, "prune_head": prune_head, "include_tied": include_tied,
                "row_floor": not no_row_floor, "passes": passes, "offload": offload, "batch_size": batch_size, "goal_stats": goal_info}
    if method.reconstructs:
        settings.update(allocation=allocation, obs_candidates=[str(c) for c in options.candidates], obs_steps=obs_steps)
    fisher = fisher_settings(method, options) if method.needs_labels else None
    write_report(report, {**rep, **settings, "fisher": fisher and {**fisher, "seed": seed}})
    console.print(_prune_table(run, d, out))
    print_prune_notes(run)
    note = goal_note([s["mode"] for s in run.rows[-1].correction.get("sites", [])]) if goal_stats else None
    if note:
        console.print(note)


def _exp(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def _prune_table(run, d: HFData, out: str) -> Table:
    lm = d.task == "lm"
    what = "perplexity (lower is better)" if lm else "accuracy"
    table = Table(title=f"prune: {run.method}, repair: {run.repair}",
                  caption=f"{what} on {d.eval_name} ({d.eval_count} sequences); the last row is written to {out}")
    for name in ("sparsity", "achieved", "dense", "pruned", "repaired", "prune s", "repair s"):
        table.add_column(name, justify="right", no_wrap=True)
    fmt = (lambda loss, acc: f"{_exp(loss):.3f}") if lm else (lambda loss, acc: f"{100 * acc:.2f}%")
    for r in run.rows:
        asked = r.pattern if r.pattern != "unstructured" else f"{r.sparsity:g}"
        table.add_row(asked, f"{100 * r.achieved_sparsity:.2f}%", fmt(run.dense["loss"], run.dense["acc"]),
                      fmt(r.loss_pruned, r.acc_pruned), fmt(r.loss_repaired, r.acc_repaired),
                      f"{r.seconds['prune']:.2f}", f"{r.seconds['repair']:.2f}")
    return table


# --- repair -------------------------------------------------------------------------


def repair(*, pruned, reference, arch, arch_kwargs, data, eval_data, calib_size, seed, dev, out, report, force,
           mode, variant, include_classifier, damping, passes="lockstep", offload=None, batch_size=None,
           goal_stats=None, **_: Any) -> None:
    _check_options(_, ranks=True)
    arch = resolve_hf_arch(arch, [reference, pruned], arch_kwargs)
    _output_checks(out, report, [pruned, reference, arch, *goal_inputs(goal_stats)], force)
    ref_model = load_hf_model(reference, arch).to(dev)
    model = load_hf_model(pruned, arch).to(dev)
    check_finite_models({"--reference": ref_model, "PRUNED": model})
    calib_size = calib_size_for(calib_size, mode)
    d = load_hf_data(ref_model, data, eval_data, calib_size, seed, dev, shard_calib=True)
    check_hf_fits(ref_model, d)
    goal, goal_info = load_goal(goal_stats, ref_model, d.calib, mode, include_classifier) if goal_stats else (None, None)
    settings = RepairSettings(mode, variant, passes=passes, offload=offload, batch_size=batch_size, progress=True,
                              include_classifier=include_classifier, goal=goal, damping=damping)
    metrics = {"reference": d.evaluate(ref_model), "before": d.evaluate(model)}
    start = time.perf_counter()
    result = settings.repair_(model, settings.reference(ref_model, d.calib), d.calib)
    seconds = time.perf_counter() - start
    metrics["after"] = d.evaluate(model)
    if distributed.is_main_process():
        save_hf_model(model, out, force=force)
    details = result.to_dict()
    write_report(report, {**metrics, "seconds": {"repair": seconds}, "sites": details["sites"],
                          **({"reconstruct": details["reconstruct"], "damping": damping} if "reconstruct" in details else {}),
                          "repair": mode,
                          "variant": variant, "passes": passes, "include_classifier": include_classifier,
                          "calib_size": calib_size,
                          "seed": seed, "eval_data": d.eval_name, "arch": arch, "task": d.task, "metric": d.metric,
                          "out_format": "hf", "batch_size": batch_size, "goal_stats": goal_info})
    lm = d.task == "lm"
    table = Table(title=repair_title(mode, result, seconds),
                  caption=f"evaluated on {d.eval_name} ({d.eval_count} sequences); written to {out}")
    table.add_column("model")
    table.add_column("perplexity" if lm else "accuracy", justify="right")
    table.add_column("loss", justify="right")
    for name, key in (("reference", "reference"), ("before repair", "before"), ("after repair", "after")):
        m = metrics[key]
        table.add_row(name, f"{m['ppl']:.3f}" if lm else f"{100 * m['acc']:.2f}%", f"{m['loss']:.4f}")
    console.print(table)
    print_repair_notes(result)
    if goal_stats and goal_note([s.mode for s in result.sites]):
        console.print(goal_note([s.mode for s in result.sites]))
