"""Train the pretrained MNIST zoo and record its measured test metrics.

For every model of :mod:`prune_repair.zoo`: seed, build, train on all of
``mnist:train`` with :func:`training.train`, measure accuracy/loss on
``mnist:test`` and write ``prune_repair/zoo/weights/NAME.pt`` (float32
state_dict) plus ``prune_repair/zoo/weights/zoo.json`` (the measured metrics and
the training settings). Deterministic on CPU for a fixed thread count.

Run from the repository root (package importable, e.g. ``pip install -e .``)::

    python benchmarks/train_zoo.py            # all models, ~2-3 minutes on 2 cores
    python benchmarks/train_zoo.py mnist-mlp  # just one
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from prune_repair import zoo
from prune_repair.io.data import load_dataset
from prune_repair.metrics.classify import evaluate
from training import train

SETTINGS = {
    "mnist-mlp": {"epochs": 8, "lr": 0.1, "batch_size": 128, "seed": 0},
    "mnist-cnn": {"epochs": 4, "lr": 0.05, "batch_size": 128, "seed": 0},
    "mnist-cnn-bn": {"epochs": 4, "lr": 0.1, "batch_size": 128, "seed": 0},
    "mnist-mlp6-a": {"epochs": 6, "lr": 0.1, "batch_size": 128, "seed": 0},
    "mnist-mlp6-b": {"epochs": 6, "lr": 0.1, "batch_size": 128, "seed": 1},
}


def train_one(name: str, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor) -> dict:
    """Train zoo model ``name``, save its weights and return its metrics record."""
    settings = SETTINGS[name]
    torch.manual_seed(settings["seed"])
    model = zoo.build(name)
    start = time.perf_counter()
    train(model, x, y, log=lambda line: print(f"  {name} {line}", flush=True), **settings)
    seconds = time.perf_counter() - start
    metrics = evaluate(model, x_test, y_test)
    zoo.WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    torch.save(state, zoo.weights_path(name))
    print(f"{name}: test acc {metrics['acc']:.4f} loss {metrics['loss']:.4f} ({seconds:.0f} s)", flush=True)
    return {
        "arch": zoo.arch_spec(name),
        "kwargs": zoo.arch_kwargs(name),
        "test_acc": metrics["acc"],
        "test_loss": metrics["loss"],
        "train_seconds": round(seconds, 1),
        "train": {**settings, "optimizer": "sgd-nesterov-0.9", "weight_decay": 5e-4, "schedule": "triangular"},
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"models to train (default: all of {', '.join(SETTINGS)})")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it)")
    args = parser.parse_args()
    unknown = [name for name in args.names if name not in SETTINGS]  # the ViTs: benchmarks/train_transformers.py
    if unknown:
        parser.error(f"unknown zoo model(s) {', '.join(unknown)}: choose from {', '.join(SETTINGS)}")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    x, y = load_dataset("mnist:train")
    x_test, y_test = load_dataset("mnist:test")
    metrics_path = zoo.WEIGHTS_DIR / zoo.METRICS_FILE
    records = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    for name in args.names or list(SETTINGS):
        records[name] = train_one(name, x, y, x_test, y_test)
        metrics_path.write_text(json.dumps(dict(sorted(records.items())), indent=2) + "\n")


if __name__ == "__main__":
    main()
