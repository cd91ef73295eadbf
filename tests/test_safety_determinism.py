"""The same command with the same --seed writes a byte-identical checkpoint (issue 5).

Every command registered on the CLI at run time is covered: each has cases below,
and a command without cases fails ``test_every_command_has_a_determinism_case``.
The runs happen in two separate processes with different ``PYTHONHASHSEED``s, so
iteration order of sets/dicts of strings cannot leak into the result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prune_repair.cli import main
from safety_helpers import ARCH, digest, make_world

try:
    import safetensors  # noqa: F401

    HAS_SAFETENSORS = True
except ImportError:
    HAS_SAFETENSORS = False


pytestmark = pytest.mark.slow  # runs the CLI in subprocesses


def command_cases(world) -> dict[str, tuple[str, list, str]]:
    """id -> (command, arguments before --out, output suffix)."""
    common = [*ARCH, "--data", world.data, "--calib-size", 16, "--seed", 3]
    cases = {
        "repair": ("repair", [world.pruned, "--reference", world.reference, *common], ".pt"),
        "repair-all-at-once": ("repair", [world.pruned, "--reference", world.reference, *common,
                                          "--variant", "all-at-once"], ".pt"),
        "prune-magnitude": ("prune", [world.reference, *common, "--sparsity", "0.5,0.8"], ".pt"),
        "prune-fisher": ("prune", [world.reference, *common, "--sparsity", "0.5", "--method", "fisher",
                                   "--fisher-samples", 24], ".pt"),
        "prune-woodfisher": ("prune", [world.reference, *common, "--sparsity", "0.5", "--method", "woodfisher",
                                       "--fisher-samples", 24, "--block-size", 8, "--obs-update"], ".pt"),
        "merge-activation": ("merge", [world.reference, world.other, *common], ".pt"),
        "merge-weight": ("merge", [world.reference, world.other, *common, "--align", "weight", "--alpha", 0.3], ".pt"),
    }
    if HAS_SAFETENSORS:
        cases["repair-safetensors"] = ("repair", cases["repair"][1], ".safetensors")
    return cases


DRIVER = """
import json, sys
from prune_repair.cli import main
for argv in json.loads(sys.argv[1]):
    main(argv)
"""


def start(cases: dict, outdir: Path, hash_seed: str) -> subprocess.Popen:
    """Run every case in ONE fresh process (started, not awaited)."""
    outdir.mkdir()
    argvs = [[command, *map(str, args), "--out", str(outdir / f"{name}{suffix}")]
             for name, (command, args, suffix) in cases.items()]
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    return subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(argvs)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_same_command_same_seed_gives_identical_bytes(tmp_path):
    world = make_world(tmp_path / "inputs")
    cases = command_cases(world)
    runs = {seed: start(cases, tmp_path / f"run{seed}", hash_seed=seed) for seed in ("1", "2")}
    for proc in runs.values():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    outputs = {seed: {name: digest(tmp_path / f"run{seed}" / f"{name}{suffix}")
                      for name, (_, _, suffix) in cases.items()} for seed in runs}
    differing = [name for name in cases if outputs["1"][name] != outputs["2"][name]]
    assert not differing, f"outputs differ between identical runs: {differing}"


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_has_a_determinism_case(command, tmp_path):
    covered = {c for c, _, _ in command_cases(make_world(tmp_path)).values()}
    assert command in covered, f"add a case for `prune-repair {command}` to command_cases() in {Path(__file__).name}"
