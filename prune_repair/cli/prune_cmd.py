"""``prune-repair prune``: one-shot pruning at one or more sparsities, then repair."""

from __future__ import annotations

import click
import torch
from rich.table import Table

from ..io.sources import draw_indices
from ..io import load_model, resolve_arch, save_state_dict
from ..prune.pipeline import PruneRun, parse_sparsities, prune_and_repair
from ..prune.methods import DEFAULT_FISHER_SAMPLES, PruneMethod
from ..engine.correct.modes import RepairMode
from ..engine.checks import check_finite
from ..engine.run.distributed import shard
from .main import main
from . import hf_cmd, structured_cmd
from ..prune.targets import PruneError
from .prune_notes import print_prune_notes
from .method_options import OBS_CANDIDATES_HELP, OBS_STEPS_HELP, fisher_settings, method_options, run_settings
from ..prune.obs_layer import DEFAULT_CANDIDATES
from ..prune.sparsity_config import load_sparsity_config
from .goal_option import goal_inputs, goal_note, goal_stats_option, load_goal
from .common import check_passes, damping_option, passes_option, check_outputs, common_options, resolve_device
from .data_loading import calib_size_for, check_fits, data_options, load_data
from .errors import handle_errors
from .output import console, out_console, written, write_report


@main.command("prune")
@click.argument("ckpt")
@common_options
@click.option("--sparsity", "sparsity", default=None, help="fraction of conv/linear weights to zero, in [0, 1); "
              "several as 0.5,0.8,0.9 (--out gets the last); or one N:M pattern such as 2:4 (N of every M inputs of "
              "each output row stay).")
@click.option("--sparsity-config", "sparsity_config", default=None,
              help="JSON or YAML file of layer FQN or re:PATTERN -> sparsity; the layers it names get their own "
                   "sparsity, the others --sparsity.")
@click.option("--prune-head", is_flag=True, help="also prune a language model's output head (lm_head; dense by "
              "default).")
@click.option("--include-tied", "include_tied", is_flag=True, help="also prune weights tied to another module "
              "(GPT-2's lm_head is the token embedding: --prune-head --include-tied prunes both; left out by default).")
@click.option("--no-row-floor", "no_row_floor", is_flag=True, help="global thresholds may empty output rows and "
              "layers (by default every output row keeps its best weight).")
@click.option("--method", default=PruneMethod.GLOBAL_MAGNITUDE.value, show_default=True,
              type=click.Choice(PruneMethod.choices()), help=f"how weights are scored. {PruneMethod.describe()}.")
@click.option("--repair", "mode", default=None, type=click.Choice(RepairMode.choices()),
              help=f"correction after pruning (default: auto; reconstruct with --structured). {RepairMode.describe()}.")
@click.option("--skip-first", is_flag=True, help="leave the first conv/linear layer dense.")
@click.option("--skip-classifier", is_flag=True, help="leave the last conv/linear layer (the classifier) dense.")
@click.option("--layers", multiple=True, help="prune only these layers: FQN or re:REGEX (repeatable).")
@click.option("--include-classifier", is_flag=True, help="also correct the classifier's logits.")
@click.option("--fisher-samples", default=None, type=click.IntRange(min=1),
              help=f"fisher/woodfisher: gradients used (fisher subsample size); default {DEFAULT_FISHER_SAMPLES}, "
                   "or every calibration sample when there are fewer.")
@click.option("--fisher-batch", default=1, show_default=True, type=click.IntRange(min=1),
              help="woodfisher: samples averaged per gradient (fisher mini-batch size).")
@click.option("--damp", default=1e-5, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="woodfisher: damping of the Fisher diagonal.")
@click.option("--block-size", default=128, show_default=True, type=click.IntRange(min=1),
              help="woodfisher: weights per inverse-Fisher block (memory: block-size floats per weight); "
                   "obs: columns per lazy-update block.")
@click.option("--obs-update", is_flag=True, help="woodfisher: move the kept weights by the OBS update.")
@click.option("--max-memory-gb", default=4.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="woodfisher: refuse block sizes needing more memory than this.")
@click.option("--allocation", default="global", show_default=True, type=click.Choice(["global", "uniform"]),
              help="obs: per-layer sparsities from one global magnitude threshold, or the same in every layer.")
@click.option("--obs-candidates", default=",".join(c.value for c in DEFAULT_CANDIDATES), show_default=True,
              help=OBS_CANDIDATES_HELP)
@click.option("--obs-steps", default=1, show_default=True, type=click.IntRange(min=1), help=OBS_STEPS_HELP)
@click.option("--structured", "structured", default=None, type=float,
              help="remove this fraction, in [0, 1), of every transformer MLP's hidden units (CNNs: of every "
                   "channel group) before any --sparsity: a physically smaller model (hf:DIR -> an HF directory, "
                   "else a save_structured file that load_structured_ reads).")
@click.option("--structured-heads", "structured_heads", default=None, type=float,
              help="also remove this fraction of every attention's heads (HF LLaMA-style attention; with grouped "
                   "queries, whole key/value groups); it must give a whole number per layer.")
@click.option("--structured-select", "structured_select", default="energy", show_default=True,
              type=click.Choice(["energy", "obs"]),
              help="how transformer units are chosen: energy = activation energy x outgoing weight norm; obs = greedy "
                   "least-squares elimination (removes the unit whose loss the refit recovers best, one at a time).")
@damping_option
@passes_option
@goal_stats_option
@handle_errors
def prune_command(ckpt, arch, arch_kwargs, data, eval_data, calib_size, seed, device, out, report, force, sparsity,
                  method, mode, skip_first, skip_classifier, layers, include_classifier, fisher_samples,
                  fisher_batch, damp, block_size, obs_update, max_memory_gb, allocation, damping,
                  sparsity_config=None, prune_head=False, no_row_floor=False,
                  structured=None, structured_heads=None, structured_select="energy", goal_stats=None,
                  preprocess=None, batch_size=None, eval_size=None, workers=None, passes="lockstep", offload=None,
                  include_tied=False, obs_candidates="obs,obs-damped,magnitude", obs_steps=1) -> None:
    """Prune CKPT (a path or zoo:NAME) at each --sparsity, repair toward its statistics, evaluate.

    \b
    Examples:
      prune-repair prune zoo:mnist-cnn --data mnist --sparsity 0.9 --out pruned.pt
      prune-repair prune zoo:mnist-mlp --data mnist --sparsity 0.5,0.8,0.9,0.95 \\
          --method woodfisher --report report.json --out pruned.pt
      prune-repair prune zoo:mnist-cnn --data mnist --sparsity 2:4 --skip-first --method wanda --out pruned.pt
      prune-repair prune zoo:mnist-cnn --data mnist --structured 0.25 --out smaller.pt

    --passes, --offload and --batch-size go over the calibration data as in repair (the
    statistics, obs and the repair or reconstruction), e.g. --passes blockwise --offload cpu.
    """
    check_passes(passes, offload)
    if structured is not None or structured_heads is not None:  # physically smaller, first (structured_cmd)
        _check_structured(passes, offload, include_tied)
        return structured_cmd.run_structured(**locals())
    if sparsity is None:
        raise PruneError("--sparsity is missing: give e.g. --sparsity 0.9 (or --structured RATIO)")
    mode = mode or RepairMode.AUTO.value
    sparsities = parse_sparsities(sparsity)
    config = load_sparsity_config(sparsity_config) if sparsity_config else None
    if hf_cmd.wants_hf(arch, [ckpt]):  # --arch hf:DIR: HF directories, dict batches, perplexity
        return hf_cmd.prune(**locals(), dev=resolve_device(device))
    check_outputs(out, report, [ckpt, *goal_inputs(goal_stats)], force)
    dev = resolve_device(device)
    arch, arch_kwargs = resolve_arch([ckpt], arch, arch_kwargs)
    model = load_model(ckpt, arch, arch_kwargs).to(dev)
    check_finite(model)
    method = PruneMethod.parse(method, "pruning method")
    calib_size = calib_size_for(calib_size, "reconstruct" if method.reconstructs else mode)
    d = load_data(data, eval_data, calib_size, seed, dev, **data_options(preprocess, batch_size, eval_size, workers))
    check_fits(model, d.calib_x)
    goal, goal_info = load_goal(goal_stats, model, d.calib_x, mode, include_classifier) if goal_stats else (None, None)
    options = method_options(method, fisher_samples, fisher_batch, damp, block_size, obs_update, max_memory_gb, seed,
                             allocation, damping, obs_candidates, obs_steps)
    fisher_data = _fisher_data(d, options, fisher_batch, seed, dev) if method.needs_labels else None
    prune_settings, repair_settings = run_settings(**locals())
    run = prune_and_repair(
        model, (d.calib_x, d.calib_y), sparsities, method=method, options=options,
        prune=prune_settings, repair=repair_settings,
        eval_data=(d.eval_x, d.eval_y), fisher_data=fisher_data,
    )
    save_state_dict(run.model, out)
    settings = {"calib_size": calib_size, "seed": seed, "eval_data": d.eval_name, "skip_first": skip_first,
                "skip_classifier": skip_classifier, "include_classifier": include_classifier,
                "layers": list(layers) or None, "goal_stats": goal_info, "sparsity_config": config,
                "prune_head": prune_head, "include_tied": include_tied, "row_floor": not no_row_floor, "passes": passes,
                "offload": offload,
                **d.settings}
    if method.reconstructs or RepairMode.parse(mode, "correction").reconstructs:
        settings["damping"] = damping
    if method.reconstructs:
        settings.update(allocation=allocation, block_size=block_size, obs_steps=obs_steps,
                        obs_candidates=[str(c) for c in options.candidates])
    write_report(report, {**run.to_report(), **settings, "fisher": fisher_settings(method, options)})
    out_console.print(_table(run, d.eval_name, len(d.eval_y), out))
    written({"checkpoint": out, "report": report})
    print_prune_notes(run)
    note = goal_note([s["mode"] for s in run.rows[-1].correction.get("sites", [])]) if goal_stats else None
    if note:
        console.print(note)


def _check_structured(passes: str, offload: str | None, include_tied: bool) -> None:
    if passes != "lockstep" or offload is not None:
        raise PruneError("--passes and --offload do not combine with --structured: drop them (the structured "
                         "step measures its units in one pass)")
    if include_tied:
        raise PruneError("--include-tied does not combine with --structured: drop it (tied weights are whole "
                         "units of the structured step's choice)")


def _fisher_data(d, options, fisher_batch: int, seed: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the labelled samples the gradient scorers use (drawn with ``seed + 1``)."""
    options.num_grads = options.gradients_for(len(d.source))  # resolve the default once, for the report too
    fx, fy = d.source.load(draw_indices(len(d.source), options.num_grads * fisher_batch, seed + 1), d.settings["workers"])
    fx, fy = fx[shard(len(fx))], fy[shard(len(fy))]  # this rank's share (all of it in one process)
    return fx.to(dev), fy.to(dev)


def _table(run: PruneRun, eval_name: str, eval_count: int, out: str) -> Table:
    table = Table(title=f"prune: {run.method}, repair: {run.repair}",
                  caption=f"accuracy on {eval_name} ({eval_count} samples); the last row is written to {out}")
    for name in ("sparsity", "achieved", "dense", "pruned", "repaired", "prune s", "repair s"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in run.rows:
        asked = r.pattern if r.pattern != "unstructured" else f"{r.sparsity:g}"
        table.add_row(asked, f"{100 * r.achieved_sparsity:.2f}%", f"{100 * run.dense['acc']:.2f}%",
                      f"{100 * r.acc_pruned:.2f}%", f"{100 * r.acc_repaired:.2f}%",
                      f"{r.seconds['prune']:.2f}", f"{r.seconds['repair']:.2f}")
    return table
