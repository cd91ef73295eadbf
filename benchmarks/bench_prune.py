"""Pruning benchmark: one-shot pruners x sparsities x corrections on real MNIST models.

Models: the zoo (mnist-mlp, mnist-cnn, mnist-cnn-bn) and two ResNet-20s
(``ResNetMini(width=16, blocks_per_stage=(3, 3, 3))``, 0.27M conv/linear weights)
with BatchNorm and with channel LayerNorm, trained here for one epoch on a 30k
subset of mnist:train and cached in benchmarks/cache/. For every model, method
(global/layer magnitude, diagonal Fisher, WoodFisher) and sparsity
(0.5 ... 0.98), the test accuracy without correction and after reset (BN nets),
repair and rescale; a calibration-size sweep; timings of our pruner and reset
against torch's own tools; WoodFisher time and memory on the ResNet-20.

Writes its section of benchmarks/RESULTS.md (between the prune markers), the
plot benchmarks/prune_accuracy.png and the raw numbers to
benchmarks/cache/bench_prune.json. Run from the repository root::

    python benchmarks/bench_prune.py                 # everything (about an hour on 2 shared cores the first
                                                     # time, most of it training the ResNets; cached after)
    python benchmarks/bench_prune.py --write-only    # re-render from the cached JSON
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune_extra import speed_comparisons, woodfisher_cost  # noqa: E402
from bench_prune_report import write_outputs  # noqa: E402

from prune_repair import collect_stats, repair_, zoo  # noqa: E402
from prune_repair.io.data import calibration_batch, load_dataset  # noqa: E402
from prune_repair.metrics.classify import evaluate  # noqa: E402
from prune_repair.zoo.models import ResNetMini  # noqa: E402
from prune_repair.prune import FisherOptions, PruneMethod, prune_, score_weights  # noqa: E402
from training import load_or_train  # noqa: E402

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
RAW = CACHE / "bench_prune.json"
SPARSITIES = [0.5, 0.8, 0.9, 0.95, 0.98]
CALIB_SIZE, FISHER_SAMPLES, SEED = 64, 400, 0
SWEEP_SIZES, SWEEP_SEEDS = [16, 64, 256, 1024], [0, 1, 2]
RESNETS = {  # the LN net learns slowly: a smaller learning rate and batch (at lr 0.05/batch 128 it ended at 26%)
    "resnet20-bn": {"norm": "bn", "lr": 0.1, "batch_size": 128},
    "resnet20-ln": {"norm": "ln", "lr": 0.005, "batch_size": 32},
}
RESNET_TRAIN = {"epochs": 1, "seed": 0, "subset": 30000}
RESNET_EVAL = 2000


def build_models(x: torch.Tensor, y: torch.Tensor, names: list[str]) -> dict[str, dict]:
    """name -> {"model", "eval_size", "bn", "about"}; ResNets are trained once and cached."""
    models = {}
    for name in [n for n in zoo.zoo_names() if n in names]:
        models[name] = {"model": zoo.load(name), "eval_size": None, "bn": zoo.entry(name).kwargs.get("batch_norm", False),
                        "about": f"zoo:{name} ({zoo.arch_spec(name)} {zoo.arch_kwargs(name)})"}
    generator = torch.Generator().manual_seed(RESNET_TRAIN["seed"])
    subset = torch.randperm(len(x), generator=generator)[: RESNET_TRAIN["subset"]]
    for name, spec in [(n, s) for n, s in RESNETS.items() if n in names]:
        torch.manual_seed(RESNET_TRAIN["seed"])
        model = ResNetMini(width=16, blocks_per_stage=(3, 3, 3), norm=spec["norm"])
        start = time.perf_counter()
        load_or_train(CACHE / f"{name}.pt", model, x[subset], y[subset], epochs=RESNET_TRAIN["epochs"], lr=spec["lr"],
                      seed=RESNET_TRAIN["seed"], batch_size=spec["batch_size"],
                      log=lambda line, n=name: print(f"  train {n}: {line}", flush=True))
        print(f"{name}: ready ({time.perf_counter() - start:.0f} s)", flush=True)
        models[name] = {"model": model.eval(), "eval_size": RESNET_EVAL, "bn": spec["norm"] == "bn",
                        "about": f"ResNetMini(width=16, blocks_per_stage=(3,3,3), norm='{spec['norm']}'), "
                                 f"1 epoch on {RESNET_TRAIN['subset']} mnist:train samples, lr {spec['lr']}, "
                                 f"batch {spec['batch_size']}"}
    return models


def corrections(bn: bool) -> list[str]:
    return ["none", "reset", "repair", "rescale"] if bn else ["none", "repair", "rescale"]


def grid(name: str, info: dict, calib, fisher, test) -> list[dict]:
    """Accuracy for every method x sparsity x correction of one model."""
    model, rows = info["model"], []
    reference = collect_stats(model, calib[0])
    for method in PruneMethod:
        scores = score_weights(model, method, fisher, options=FisherOptions(num_grads=FISHER_SAMPLES))
        print(f"  {name} {method.value}: scored in {scores.seconds:.1f} s", flush=True)
        for sparsity in SPARSITIES:
            pruned = copy.deepcopy(model)
            report = prune_(pruned, sparsity, method, scores=scores)
            for correction in corrections(info["bn"]):
                fixed = pruned if correction == "none" else copy.deepcopy(pruned)
                if correction != "none":
                    repair_(fixed, reference, calib[0], repair=correction)
                metrics = evaluate(fixed, *test)
                rows.append({"model": name, "method": method.value, "sparsity": sparsity,
                             "achieved": report.achieved_sparsity, "correction": correction, **metrics})
            accs = {r["correction"]: r["acc"] for r in rows[-len(corrections(info["bn"])):]}
            print(f"    {sparsity}: " + " ".join(f"{k} {v:.4f}" for k, v in accs.items()), flush=True)
    return rows


def calib_sweep(name: str, info: dict, x, y, test) -> list[dict]:
    """Repair (auto) after global magnitude at 90% with several calibration sizes and seeds."""
    model, rows = info["model"], []
    pruned = copy.deepcopy(model)
    prune_(pruned, 0.9, "global-magnitude")
    for size in SWEEP_SIZES:
        for seed in SWEEP_SEEDS:
            cx, _ = calibration_batch(x, y, size, seed)
            fixed = copy.deepcopy(pruned)
            repair_(fixed, collect_stats(model, cx), cx, repair="auto")
            rows.append({"model": name, "calib_size": size, "seed": seed, **evaluate(fixed, *test)})
        print(f"  sweep {name} {size}: " + " ".join(f"{r['acc']:.4f}" for r in rows[-len(SWEEP_SEEDS):]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated subset of model names ('none': only the timings)")
    parser.add_argument("--write-only", action="store_true", help="only re-render RESULTS.md and the plot")
    parser.add_argument("--no-speed", action="store_true", help="skip the timings and the WoodFisher probe")
    parser.add_argument("--raw", type=Path, default=RAW, help="raw JSON (read and updated)")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="markdown file to update")
    parser.add_argument("--plot", type=Path, default=HERE / "prune_accuracy.png", help="PNG to write")
    args = parser.parse_args()
    torch.set_num_threads(2)
    CACHE.mkdir(exist_ok=True)
    raw = json.loads(args.raw.read_text()) if args.raw.is_file() else {"models": {}, "grid": {}, "sweep": {}}
    if not args.write_only:
        x, y = load_dataset("mnist:train")
        tx, ty = load_dataset("mnist:test")
        calib = calibration_batch(x, y, CALIB_SIZE, SEED)
        fisher = calibration_batch(x, y, FISHER_SAMPLES, SEED + 1)
        wanted = [n for n in args.models.split(",") if n != "none"] if args.models else zoo.zoo_names() + list(RESNETS)
        speed_models = ["resnet20-bn", "mnist-cnn-bn"] if not args.no_speed else []
        models = build_models(x, y, wanted + [n for n in speed_models if n not in wanted])
        for name in wanted:
            info = models[name]
            n = info["eval_size"] or len(tx)
            test = (tx[:n], ty[:n])
            dense = evaluate(info["model"], *test)
            print(f"{name}: dense acc {dense['acc']:.4f} on {n} test samples", flush=True)
            raw["models"][name] = {"about": info["about"], "eval_size": n, "dense": dense, "bn": info["bn"]}
            raw["grid"][name] = grid(name, info, calib, fisher, test)
            raw["sweep"][name] = calib_sweep(name, info, x, y, test)
            args.raw.write_text(json.dumps(raw, indent=1))
        if speed_models:
            raw["speed"] = speed_comparisons(models["resnet20-bn"]["model"], models["mnist-cnn-bn"]["model"], calib,
                                             (tx, ty))
            raw["woodfisher"] = woodfisher_cost(fisher)
        raw["settings"] = {"calib_size": CALIB_SIZE, "fisher_samples": FISHER_SAMPLES, "seed": SEED,
                           "sparsities": SPARSITIES, "torch": torch.__version__, "threads": torch.get_num_threads()}
        args.raw.write_text(json.dumps(raw, indent=1))
    write_outputs(raw, args.results, args.plot)


if __name__ == "__main__":
    main()
