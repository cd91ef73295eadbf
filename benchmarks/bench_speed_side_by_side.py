"""collect / collect + repair + fold / reset of an older package and this one, side by side in ONE process.

Timings of separate runs on a shared machine move by 10-25% with its load; here the older package
(a tree holding ``prune_repair/``, e.g. ``git archive COMMIT prune_repair | tar -x -C OLD``) is loaded
beside this one under another name and the calls are interleaved, so both see the same machine.
Ratios are over one no-grad forward of the same batch, medians of ``--repeats`` rounds (after one
warm-up round; the two packages take turns going first); models and batches are those of
``bench_speed_targets.py``.

    python benchmarks/bench_speed_side_by_side.py --old OLD --models convnext_tiny,swin_t --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import prune_repair as new  # noqa: E402
from bench_speed_targets import CLOCK, build  # noqa: E402


def load_old(root: str):
    """The package under ``root/prune_repair`` as module ``old_prune_repair`` (its imports are relative)."""
    spec = importlib.util.spec_from_file_location("old_prune_repair", Path(root) / "prune_repair" / "__init__.py",
                                                  submodule_search_locations=[str(Path(root) / "prune_repair")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_prune_repair"] = module
    spec.loader.exec_module(module)
    return module


def side_by_side(name: str, old, repeats: int, clock) -> dict[str, float]:
    model, x = build(name)
    pruned = copy.deepcopy(model)
    new.prune_(pruned, 0.5)

    def forward(_):
        with torch.no_grad():
            model(x)

    ops = {"forward": (lambda: None, forward)}
    for tag, pr in (("old", old), ("new", new)):
        ops[f"collect {tag}"] = (lambda: None, lambda _, pr=pr: pr.collect_stats(model, x))
        ops[f"collect+repair+fold {tag}"] = (lambda: copy.deepcopy(pruned),
                                             lambda m, pr=pr: pr.repair_(m, pr.collect_stats(model, x), x))
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        ops["update_bn"] = (lambda: copy.deepcopy(model).train(),
                            lambda m: torch.optim.swa_utils.update_bn([x], m, device=x.device))
        for tag, pr in (("old", old), ("new", new)):
            goal = pr.collect_stats(model, x)
            ops[f"reset {tag}"] = (lambda: copy.deepcopy(model),
                                   lambda m, pr=pr, goal=goal: pr.repair_(m, goal, x, repair="reset"))
    times: dict[str, list[float]] = {k: [] for k in ops}
    for r in range(repeats + 1):  # old and new take turns going first (what ran just before matters)
        first, second = ("old", "new") if r % 2 else ("new", "old")
        order = sorted(ops, key=lambda k: (k.endswith(second), k.endswith(first)))
        for key in order:
            setup, fn = ops[key]
            arg = setup()
            start = clock()
            fn(arg)
            times[key].append(clock() - start)
    t = {k: statistics.median(v[1:]) for k, v in times.items()}
    out = {k: t[k] / t["forward"] for k in t if not k.startswith(("forward", "reset", "update_bn"))}
    out.update({f"reset/update_bn {tag}": t[f"reset {tag}"] / t["update_bn"] for tag in ("old", "new") if "update_bn" in t})
    return {"forward_ms": 1e3 * t["forward"], **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="a folder holding the older prune_repair/")
    parser.add_argument("--models", default="resnet18,convnext_tiny,swin_t,vit_b_16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCK), default="cpu")
    args = parser.parse_args()
    if not (Path(args.old) / "prune_repair" / "__init__.py").is_file():
        parser.error(f"--old {args.old} holds no prune_repair/__init__.py: extract one with "
                     "git archive COMMIT prune_repair | tar -x -C DIR")
    torch.set_num_threads(args.threads)
    old = load_old(args.old)
    for name in args.models.split(","):
        result = side_by_side(name, old, args.repeats, CLOCK[args.clock])
        print(name, {k: round(v, 3) for k, v in result.items()}, flush=True)


if __name__ == "__main__":
    main()
