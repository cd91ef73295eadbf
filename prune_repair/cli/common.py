"""What every command shares: its options, the device, the checks of inputs and outputs.

How a command ends on a mistake is :mod:`.errors`; what it prints is :mod:`.output`; what
it loads from ``--data`` is :mod:`.data_loading`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click
import torch

from ..engine.checks import check_finite
from ..engine.run.lockstep import Passes
from ..io import check_output_path
from .data_loading import BATCH_SIZE, CALIB_SIZE, RECONSTRUCT_CALIB_SIZE


def parse_arch_kwargs(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise click.BadParameter(f"not valid JSON ({err.msg}): e.g. '{{\"num_classes\": 10}}'") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return parsed


def common_options(command: Callable) -> Callable:
    """Options shared by all commands (the CLI contract in ARCHITECTURE.md)."""
    options = [
        click.option("--arch", default=None, help="torchvision model name (resnet18) or package.module:Factory; "
                     "implied by a zoo:NAME checkpoint."),
        click.option("--arch-kwargs", default=None, callback=parse_arch_kwargs,
                     help="JSON keyword arguments for the architecture, e.g. '{\"num_classes\": 10}'."),
        click.option("--data", required=True, help="calibration data: mnist, mnist:train, mnist:test, x.pt "
                     "({'x','y'}), x.npz (arrays x, y) or an ImageFolder directory; for HF models also tokens "
                     "(.jsonl, .pt/.npz with input_ids) or pysrc[:calib|eval|train] (Python's own sources as "
                     "bytes, for the zoo's byte-level LMs)."),
        click.option("--eval-data", default=None, help="evaluation data (same forms); default: mnist:test when "
                     "--data is MNIST train, pysrc:eval when it is pysrc, else all of --data."),
        click.option("--calib-size", default=None, type=click.IntRange(min=1),
                     help=f"calibration samples drawn from --data [default: {CALIB_SIZE}; {RECONSTRUCT_CALIB_SIZE} "
                          "for --repair reconstruct / reconstruct+repair and --method obs, which solve d_in "
                          "unknowns per row]."),
        click.option("--seed", default=0, show_default=True, type=int, help="seed of the calibration draw."),
        click.option("--preprocess", default=None, help="ImageFolder data: a torchvision weights name whose "
                     "transforms() to apply (ResNet50_Weights.IMAGENET1K_V2), or resize=256,crop=224,"
                     "mean=0.485/0.456/0.406,std=0.229/0.224/0.225 (any of them). Not for tensor data."),
        click.option("--batch-size", default=None, type=click.IntRange(min=1),
                     help=f"samples per batch in evaluation [default: {BATCH_SIZE}] and in calibration [default: "
                          "all --calib-size samples in one batch]; the exact repair and reconstruction still run "
                          "one forward per calibration batch (the batches meet at every site)."),
        click.option("--eval-size", default=None, type=click.IntRange(min=1),
                     help="evaluate on this many samples of --eval-data (a subset drawn with --seed) "
                          "[default: all]."),
        click.option("--workers", default=None, type=click.IntRange(min=0),
                     help="ImageFolder data: processes reading images [default: min(4, CPU count)]."),
        click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
                     help="where to run; auto picks cuda when available."),
        click.option("--out", required=True, type=click.Path(),
                     help="output checkpoint (state_dict); .safetensors writes safetensors (optional extra); "
                          "for --arch hf:DIR an HF model directory (save_pretrained)."),
        click.option("--report", default=None, type=click.Path(dir_okay=False), help="write a JSON report here."),
        click.option("--force", is_flag=True, help="overwrite an existing --out / --report (never an input)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def check_finite_models(models: Mapping[str, torch.nn.Module]) -> None:
    """:func:`~prune_repair.engine.checks.check_finite` on each model, the error naming which one."""
    for name, model in models.items():
        try:
            check_finite(model)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available: use --device cpu")
    return torch.device(name)


def check_outputs(out: str, report: str | None, inputs: list[str], force: bool) -> None:
    """Validate --out and --report before any work is done."""
    check_output_path(out, inputs, force)
    if report is not None:
        check_output_path(report, inputs + [out], force, what="--report")


def passes_option(command: Callable) -> Callable:
    """``--passes`` and ``--offload``: how the exact repair and reconstruction go over the calibration batches."""
    command = click.option("--offload", default=None, metavar="cpu|DIR",
                           help="with --passes blockwise: keep the block inputs in host memory (cpu) or in files "
                                "under DIR (removed afterwards) instead of on the device.")(command)
    return click.option("--passes", default=Passes.LOCKSTEP.value, show_default=True, type=click.Choice(Passes.choices()),
                        help="how the exact repair and reconstruction go over the calibration batches "
                             "(--batch-size splits them): " + Passes.describe() + ".")(command)


def check_passes(passes: str, offload: str | None) -> None:
    """Refuse an ``--offload`` that would be ignored or fail late.

    >>> check_passes("blockwise", "cpu")
    >>> check_passes("lockstep", "cpu")
    Traceback (most recent call last):
    ...
    click.exceptions.UsageError: --offload applies to --passes blockwise only: add --passes blockwise or drop --offload
    """
    if offload is not None and passes != Passes.BLOCKWISE.value:
        raise click.UsageError("--offload applies to --passes blockwise only: add --passes blockwise or drop --offload")
    if offload not in (None, "cpu"):
        folder = Path(offload).expanduser()
        if folder.exists() and not folder.is_dir():
            raise click.UsageError(f"--offload {offload} is a file: give a folder (it is created if missing) or cpu")


def damping_option(command: Callable) -> Callable:
    """``--damping`` of the reconstruct modes."""
    return click.option("--damping", default=1e-2, show_default=True, type=click.FloatRange(min=0),
                        help="reconstruct: ridge damping, relative to the mean diagonal of each layer's Gram "
                             "matrix (raised tenfold where a system is singular; the report says where).")(command)
