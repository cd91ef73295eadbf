"""``prune-repair repair``: the post-step for checkpoints pruned by any other tool."""

from __future__ import annotations

import time

import click

from ..metrics.classify import evaluate
from ..io import load_model, resolve_arch, save_state_dict
from ..engine.correct.modes import RepairMode, Variant
from ..engine.correct.settings import RepairSettings
from .main import main
from . import hf_cmd
from .goal_option import goal_inputs, goal_note, goal_stats_option, load_goal
from .common import (check_finite_models, check_passes, damping_option, passes_option, check_outputs, common_options,
                     resolve_device)
from .data_loading import calib_size_for, check_fits, data_options, load_data
from .errors import handle_errors
from .output import print_repair_notes, repair_title, console, out_console, written, metrics_table, write_report

REPAIR_CHOICES = [m.value for m in RepairMode if m is not RepairMode.NONE]


@main.command("repair")
@click.argument("pruned")
@click.option("--reference", required=True, help="the unoperated checkpoint (path or zoo:NAME) whose "
              "statistics are the goal.")
@common_options
@click.option("--repair", "mode", default="auto", show_default=True, type=click.Choice(REPAIR_CHOICES),
              help="correction: auto = reset BatchNorm sites, repair the others.")
@click.option("--variant", default="exact", show_default=True, type=click.Choice([Variant.EXACT.value, Variant.ALL_AT_ONCE.value]),
              help="exact: each site measured with upstream corrections applied (one pass).")
@click.option("--include-classifier", is_flag=True, help="also correct the final classifier's logits.")
@damping_option
@passes_option
@goal_stats_option
@handle_errors
def repair_command(pruned, reference, arch, arch_kwargs, data, eval_data, calib_size, seed, device, out, report,
                   force, mode, variant, include_classifier, damping, passes="lockstep", offload=None, goal_stats=None,
                   preprocess=None, batch_size=None, eval_size=None, workers=None) -> None:
    """Repair PRUNED (a checkpoint pruned elsewhere) toward the statistics of --reference.

    Checkpoints saved with torch.nn.utils.prune masks (weight_orig/weight_mask) are
    read as masked weights. The output is a plain state_dict of the same architecture.

    \b
    Example:
      prune-repair repair pruned.pt --reference zoo:mnist-cnn --data mnist --out repaired.pt

    A model whose activations do not fit at once: --passes blockwise --batch-size 32
    runs it one block at a time (add --offload cpu or --offload DIR to move the block
    inputs off the device).
    """
    check_passes(passes, offload)
    if hf_cmd.wants_hf(arch, [reference, pruned]):  # --arch hf:DIR: HF directories, dict batches, perplexity
        return hf_cmd.repair(**locals(), dev=resolve_device(device))
    check_outputs(out, report, [pruned, reference, *goal_inputs(goal_stats)], force)
    dev = resolve_device(device)
    arch, arch_kwargs = resolve_arch([reference, pruned], arch, arch_kwargs)
    ref_model = load_model(reference, arch, arch_kwargs).to(dev)
    model = load_model(pruned, arch, arch_kwargs).to(dev)
    check_finite_models({"--reference": ref_model, "PRUNED": model})
    calib_size = calib_size_for(calib_size, mode)
    reconstructs = RepairMode.parse(mode, "correction").reconstructs
    d = load_data(data, eval_data, calib_size, seed, dev, **data_options(preprocess, batch_size, eval_size, workers))
    check_fits(ref_model, d.calib_x)
    goal, goal_info = load_goal(goal_stats, ref_model, d.calib_x, mode, include_classifier) if goal_stats else (None, None)

    metrics = {"reference": evaluate(ref_model, d.eval_x, d.eval_y), "before": evaluate(model, d.eval_x, d.eval_y)}
    start = time.perf_counter()
    settings = RepairSettings(mode, variant, passes=passes, offload=offload, progress=True,
                              include_classifier=include_classifier, goal=goal, damping=damping)
    # reconstruct: the layers refitted to the reference's outputs (its zeros kept); else toward its statistics
    result = settings.repair_(model, settings.reference(ref_model, d.calib_batches), d.calib_batches)
    seconds = time.perf_counter() - start
    metrics["after"] = evaluate(model, d.eval_x, d.eval_y)

    save_state_dict(model, out)
    details = result.to_dict()
    write_report(report, {**metrics, "seconds": {"repair": seconds}, "sites": details["sites"],
                          **({"reconstruct": details["reconstruct"], "damping": damping} if reconstructs else {}),
                          "repair": mode, "variant": variant, "passes": passes, "include_classifier": include_classifier,
                          "calib_size": calib_size, "seed": seed, "eval_data": d.eval_name, "goal_stats": goal_info,
                          **d.settings})
    out_console.print(metrics_table(
        repair_title(mode, result, seconds),
        [("reference", metrics["reference"]), ("before repair", metrics["before"]), ("after repair", metrics["after"])],
        caption=f"evaluated on {d.eval_name} ({len(d.eval_y)} samples); written to {out}",
    ))
    written({"checkpoint": out, "report": report})
    print_repair_notes(result)
    if goal_stats and goal_note([s.mode for s in result.sites]):
        console.print(goal_note([s.mode for s in result.sites]))
