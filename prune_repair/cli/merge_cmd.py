"""``prune-repair merge``: align checkpoints, interpolate, repair; optionally a barrier curve."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import click
import torch

from .. import zoo
from ..metrics.classify import evaluate
from ..merge.groups import GroupError
from ..io import ZOO_PREFIX, atomic_write, check_output_path, load_model, load_state_dict, resolve_arch, save_state_dict
from ..merge import Align, barrier_curve, check_alpha, check_same_architecture, prepare_merge
from ..merge.barrier import BarrierCurve, CurvePoint, alpha_grid, plot_curve, require_matplotlib
from ..engine.correct.modes import RepairMode, Variant
from . import hf_cmd, hf_merge
from .main import main
from .common import check_outputs, common_options, resolve_device
from .data_loading import BATCH_SIZE, calib_size_for, check_fits, data_options, load_data
from .errors import handle_errors
from .output import metrics_table, out_console, print_repair_notes, progress, write_report, written
from ..engine.run.distributed import shard
from ..io.sources import draw_indices

MERGE_REPAIRS = [m.value for m in (RepairMode.AUTO, RepairMode.REPAIR, RepairMode.RESCALE, RepairMode.RESCALE_LAYER,
                                   RepairMode.RESHIFT, RepairMode.RESET, RepairMode.NONE)]


def _raw_state(ckpt: str) -> dict[str, torch.Tensor]:
    if ckpt.startswith(ZOO_PREFIX):
        name = ckpt[len(ZOO_PREFIX):]
        zoo.entry(name)
        return torch.load(zoo.weights_path(name), map_location="cpu", weights_only=True)
    return load_state_dict(ckpt)


def _groups_spec(path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise GroupError(f"cannot read --groups {path} ({err}): give a JSON file "
                         "{\"name\": [\"key:dim[:block]\", ...]}") from None
    if not isinstance(spec, dict):
        raise GroupError(f"--groups {path} must hold a JSON object {{\"name\": [\"key:dim[:block]\", ...]}}")
    return spec


@main.command("merge")
@click.argument("checkpoints", nargs=-1, required=True)
@common_options
@click.option("--align", default="activation", show_default=True, type=click.Choice(Align.choices()),
              help="activation: correlation of paired units on --data; weight: git re-basin weight matching.")
@click.option("--alpha", default=0.5, show_default=True, type=float,
              help="interpolation weight of the second checkpoint (0 = first, 1 = second).")
@click.option("--repair", "mode", default="auto", show_default=True, type=click.Choice(MERGE_REPAIRS),
              help="correction toward the interpolated endpoint statistics (auto: reset BN sites, repair others).")
@click.option("--variant", default="exact", show_default=True, type=click.Choice(Variant.choices()),
              help="exact: one pass over the merged net; closed-form: predicted from endpoint covariances.")
@click.option("--curve", default=None, type=int, help="also evaluate N evenly spaced alphas (e.g. 11), raw and "
              "repaired, and report the barriers.")
@click.option("--plot", default=None, type=click.Path(dir_okay=False), help="draw the curve into this PNG "
              "(needs matplotlib; implies --curve 11 unless given).")
@click.option("--groups", "groups_file", default=None, help="JSON file of hand-written permutation groups "
              "{\"name\": [\"key:dim[:block]\", ...]} replacing the automatic ones.")
@click.option("--include-classifier", is_flag=True, help="also correct the final classifier's logits.")
@click.option("--align-size", default=None, type=click.IntRange(min=2),
              help="activation matching: samples of --data (drawn with --seed, read in --batch-size batches; "
                   "memory does not grow with it) [default: the --calib-size calibration samples, which repair uses].")
@handle_errors
def merge_command(checkpoints, arch, arch_kwargs, data, eval_data, calib_size, seed, device, out, report, force,
                  align, alpha, mode, variant, curve, plot, groups_file, include_classifier, align_size=None,
                  preprocess=None, batch_size=None, eval_size=None, workers=None) -> None:
    """Merge CHECKPOINTS (two or more, same architecture): align all to the first,
    interpolate, repair, write the merged state_dict.

    With two checkpoints the merge is (1 - alpha) * A + alpha * P(B); with more, the
    uniform average. --curve N evaluates the aligned path with and without repair.

    \b
    Example:
      prune-repair merge a.pt b.pt --arch prune_repair.zoo.models:MLP --data mnist --curve 11 \\
          --out merged.pt --report merge.json --plot curve.png
    """
    checkpoints = list(checkpoints)
    if len(checkpoints) < 2:
        raise ValueError("merge needs at least two checkpoints: prune-repair merge A.pt B.pt ...")
    alpha = check_alpha(alpha)
    if len(checkpoints) > 2 and (alpha != 0.5 or curve is not None):
        raise ValueError("--alpha and --curve apply to two checkpoints; more checkpoints are merged uniformly")
    if hf_cmd.wants_hf(arch, checkpoints):  # HF directories, dict batches, perplexity
        return hf_merge.merge(checkpoints=checkpoints, arch=arch, arch_kwargs=arch_kwargs, data=data,
                              eval_data=eval_data, calib_size=calib_size, seed=seed, dev=resolve_device(device),
                              out=out, report=report, force=force, align=align, alpha=alpha, mode=mode,
                              variant=variant, curve=curve, plot=plot, groups=_groups_spec(groups_file),
                              include_classifier=include_classifier, align_size=align_size, preprocess=preprocess,
                              batch_size=batch_size, eval_size=eval_size, workers=workers)
    if plot is not None and curve is None:
        curve = 11
    if len(checkpoints) > 2 and (alpha != 0.5 or curve is not None):
        raise ValueError("--alpha and --curve apply to two checkpoints; more checkpoints are merged uniformly")
    grid = alpha_grid(curve) if curve is not None else [alpha]
    if align_size is not None and align != "activation":
        raise ValueError(f"--align-size sets the samples of activation matching, but --align is {align}: "
                         "drop --align-size or use --align activation")
    check_outputs(out, report, checkpoints, force)
    if plot is not None:
        check_output_path(plot, checkpoints + [out] + ([report] if report else []), force)
        require_matplotlib()
    groups = _groups_spec(groups_file)
    dev = resolve_device(device)
    check_same_architecture([_raw_state(c) for c in checkpoints], checkpoints)
    arch, arch_kwargs = resolve_arch(checkpoints, arch, arch_kwargs)
    models = [load_model(c, arch, arch_kwargs).to(dev) for c in checkpoints]
    calib_size = calib_size_for(calib_size, mode)
    d = load_data(data, eval_data, calib_size, seed, dev, **data_options(preprocess, batch_size, eval_size, workers))
    check_fits(models[0], d.calib_x)
    plan = prepare_merge(models, d.calib_batches, align=align, groups=groups, seed=seed,
                         include_classifier=include_classifier, names=checkpoints,
                         align_data=_align_batches(d, align_size, seed, batch_size))
    weights = [1 - alpha, alpha] if len(models) == 2 else None
    start = time.perf_counter()
    merged, result = plan.merged(weights, repair=mode, variant=variant)
    seconds = {"align": plan.seconds["groups"] + plan.seconds["align"], "repair": time.perf_counter() - start}
    point = _point(plan, merged, weights, mode, d)
    path = _path(plan, point, d, grid if curve is not None else None, mode, variant)
    path.seconds = seconds
    payload = {**path.to_dict(), "align": align, "alpha": alpha if len(models) == 2 else None, "repair": mode,
               "variant": variant, "calib_size": calib_size, "align_size": align_size if align_size is not None
               else calib_size, "seed": seed, "eval_data": d.eval_name, "include_classifier": include_classifier,
               "groups": groups_file, **d.settings}

    if plot is not None:
        with atomic_write(plot) as tmp:
            plot_curve(path, tmp, title=f"{Path(checkpoints[0]).name} -> {Path(checkpoints[1]).name} "
                                        f"(align {align}, repair {mode})")
    save_state_dict(merged, out)
    write_report(report, payload)
    _print(checkpoints, payload, point, align, mode, out, d.eval_name, len(d.eval_y))
    written({"checkpoint": out, "report": report, "plot": plot})
    if result is not None:
        print_repair_notes(result)


def _align_batches(d, align_size: int | None, seed: int, batch_size: int | None):
    """``--align-size`` samples, streamed batch by batch to activation matching (None: the calibration set)."""
    if align_size is None:
        return None
    index = draw_indices(len(d.source), align_size, seed)
    index = index[shard(len(index))]  # this rank's share (all of it in one process)
    return d.source.batches(index, batch_size or BATCH_SIZE, d.settings["workers"])


def _path(plan, point: CurvePoint, d, grid: list[float] | None, mode: str, variant: str) -> BarrierCurve:
    """The barrier curve over ``grid`` (with a progress bar), or just the endpoints and the written point."""
    if grid is None:
        return BarrierCurve([evaluate(m, d.eval_x, d.eval_y) for m in plan.models], [point], mode)
    with progress() as bar:
        task = bar.add_task("barrier curve", total=len(grid))
        return barrier_curve(None, None, None, d.eval_x, d.eval_y, alphas=grid, repair=mode, variant=variant,
                             plan=plan, on_point=lambda p: bar.advance(task))


def _point(plan, merged, weights, mode: str, d) -> CurvePoint:
    """Metrics of the written model and of its raw (unrepaired) counterpart."""
    raw, _ = plan.merged(weights, repair="none")
    raw_m = evaluate(raw, d.eval_x, d.eval_y)
    fixed = evaluate(merged, d.eval_x, d.eval_y) if mode != "none" else {"acc": None, "loss": None}
    return CurvePoint(None if weights is None else weights[1], raw_m["acc"], raw_m["loss"], fixed["acc"],
                      fixed["loss"])


def _print(checkpoints, payload, point: CurvePoint, align, mode, out, eval_name, n_eval) -> None:
    rows = [(Path(c).name if not c.startswith(ZOO_PREFIX) else c, e) for c, e in zip(checkpoints, payload["endpoints"])]
    point = asdict(point)
    where = "uniform average" if point["alpha"] is None else f"alpha {point['alpha']:.2f}"
    rows.append((f"aligned ({align}), raw, {where}", {"acc": point["acc_raw"], "loss": point["loss_raw"]}))
    if point["acc"] is not None:
        rows.append((f"aligned + {mode}, {where}", {"acc": point["acc"], "loss": point["loss"]}))
    b = payload["barrier"]
    caption = f"barrier raw {100 * b['acc_raw']:.2f} pts" + (
        f", repaired {100 * b['acc']:.2f} pts" if b["acc"] is not None else "")
    out_console.print(metrics_table("merge", rows, caption=f"{caption}; evaluated on {eval_name} ({n_eval} samples); "
                                                       f"written to {out}"))
