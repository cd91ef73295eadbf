"""A tiny, fast world for the safety tests: a 4-feature MLP, its checkpoints and data.

Every CLI run on it takes milliseconds after the imports, so the safety tests can run
the real commands many times.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from click.testing import CliRunner

from prune_repair.cli import main
from prune_repair.zoo.models import MLP

ARCH_KWARGS = {"widths": [8], "in_features": 4, "num_classes": 3}
ARCH = ["--arch", "prune_repair.zoo.models:MLP", "--arch-kwargs", json.dumps(ARCH_KWARGS)]


def tiny_model(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(widths=(8,), in_features=4, num_classes=3)


@dataclass
class World:
    """Input files of the tiny world, all in ``root``."""

    root: Path
    reference: Path  # dense checkpoint
    pruned: Path  # half of its weights zeroed
    other: Path  # a second dense checkpoint (merge endpoint)
    data: Path  # {"x": (40, 4), "y": labels 0..2}


def make_world(root: Path) -> World:
    root.mkdir(parents=True, exist_ok=True)
    reference = tiny_model(0)
    torch.save(reference.state_dict(), root / "reference.pt")
    pruned = {k: v.clone() for k, v in reference.state_dict().items()}
    for key in ("features.fc1.weight", "classifier.weight"):
        w = pruned[key]
        w[w.abs() < w.abs().median()] = 0
    torch.save(pruned, root / "pruned.pt")
    torch.save(tiny_model(1).state_dict(), root / "other.pt")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=generator)
    torch.save({"x": x, "y": torch.randint(0, 3, (40,), generator=generator)}, root / "data.pt")
    return World(root, root / "reference.pt", root / "pruned.pt", root / "other.pt", root / "data.pt")


def repair_args(world: World, out: Path, pruned: Path | None = None, data: Path | None = None) -> list:
    return ["repair", pruned or world.pruned, "--reference", world.reference, *ARCH,
            "--data", data or world.data, "--calib-size", 16, "--out", out]


def run_cli(*args):
    """Run ``prune-repair ARGS`` in-process; ``result.output`` holds stdout and stderr."""
    return CliRunner().invoke(main, [str(a) for a in args])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder`` (hidden ones too) with its content hash and mtime."""
    return {str(p.relative_to(folder)): (digest(p), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """Hash of a state_dict: keys, dtypes, shapes and bytes of every tensor."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
