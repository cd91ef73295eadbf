"""Train the zoo's transformers: MNIST ViTs and byte-level GPT-2 / LLaMA LMs on Python source.

Deterministic on CPU from each model's seed for a fixed thread count (``--threads``).

- ``mnist-vit`` / ``mnist-vit-b``: torchvision VisionTransformer (:func:`prune_repair.zoo.vit.mnist_vit`)
  on all of ``mnist:train`` with AdamW, two seeds; test accuracy/loss on ``mnist:test`` go to
  ``prune_repair/zoo/weights/zoo.json`` and the float32 state_dict to ``weights/NAME.pt``.
- ``py-gpt2`` / ``py-gpt2-b`` / ``py-llama``: ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` with a
  256-byte vocabulary, trained on random 256-byte windows of the ``pysrc:train`` split
  (:mod:`prune_repair.io.pysrc`); perplexity on ``pysrc:eval`` (the evaluation of
  ``prune-repair prune --eval-data pysrc:eval``) goes to ``zoo.json``, the model to the HF
  directory ``weights/NAME/`` (``save_pretrained``, safetensors; float16 weights with a float32
  ``config.dtype``, so they load as float32 at half the size; the perplexity is measured on the
  model read back from there).

Run from the repository root (package importable, e.g. ``pip install -e .``)::

    python benchmarks/train_transformers.py                 # all five, ~25 minutes on 2 busy cores
    python benchmarks/train_transformers.py mnist-vit py-gpt2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from prune_repair import zoo
from prune_repair.io import pysrc
from prune_repair.io.data import load_dataset
from prune_repair.io.hf import load_hf_dir
from prune_repair.io.tokens import num_sequences, select
from prune_repair.metrics.classify import evaluate
from prune_repair.metrics.lm import perplexity
from prune_repair.zoo.lm import lm_dir

VIT_SETTINGS = {"epochs": 4, "lr": 2e-3, "batch_size": 128, "weight_decay": 0.05, "warmup": 0.1}
LM_SETTINGS = {"steps": 500, "lr": 3e-3, "batch_size": 16, "seq_len": pysrc.SEQ_LEN, "weight_decay": 0.1,
               "warmup": 0.05}
SEEDS = {"mnist-vit": 0, "mnist-vit-b": 1, "py-gpt2": 0, "py-gpt2-b": 1, "py-llama": 0}
GPT2 = {"vocab_size": 256, "n_positions": pysrc.SEQ_LEN, "n_embd": 128, "n_layer": 4, "n_head": 4,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 0, "eos_token_id": 0}
LLAMA = {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": pysrc.SEQ_LEN,
         "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0}
EVAL_BATCH = 32  # the CLI's evaluation batch for HF models


def adamw_loop(model: nn.Module, loss_of: Callable[[int], torch.Tensor], steps: int, lr: float,
               weight_decay: float, warmup: float, log: Callable[[str], None], every: int) -> None:
    """``steps`` AdamW steps on ``loss_of(step)``: linear warm-up, then cosine decay to zero.

    Weight decay applies to matrices only (not to biases, norms, embeddings of rank 1).
    """
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    warm = max(1, int(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    start, running = time.perf_counter(), 0.0
    for step in range(steps):
        loss = loss_of(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running += float(loss.detach())
        if (step + 1) % every == 0 or step + 1 == steps:
            log(f"step {step + 1}/{steps}: loss {running / ((step % every) + 1):.4f} "
                f"({time.perf_counter() - start:.0f} s)")
            running = 0.0
    model.eval()


def train_vit(name: str, log: Callable[[str], None]) -> dict:
    """Train the MNIST ViT ``name``, save its state_dict and return its metrics record."""
    s, seed = VIT_SETTINGS, SEEDS[name]
    x, y = load_dataset("mnist:train")
    torch.manual_seed(seed)
    model = zoo.build(name)
    per_epoch = -(-len(x) // s["batch_size"])
    generator = torch.Generator().manual_seed(seed)
    order: list[torch.Tensor] = []

    def loss_of(step: int) -> torch.Tensor:
        if step % per_epoch == 0:
            order[:] = [torch.randperm(len(x), generator=generator)]
        index = order[0][(step % per_epoch) * s["batch_size"]:(step % per_epoch + 1) * s["batch_size"]]
        return F.cross_entropy(model(x[index]), y[index])

    start = time.perf_counter()
    adamw_loop(model, loss_of, s["epochs"] * per_epoch, s["lr"], s["weight_decay"], s["warmup"], log, 100)
    seconds = time.perf_counter() - start
    x_test, y_test = load_dataset("mnist:test")
    metrics = evaluate(model, x_test, y_test)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, zoo.weights_path(name))
    log(f"test acc {metrics['acc']:.4f} loss {metrics['loss']:.4f} ({seconds:.0f} s)")
    return {"arch": zoo.arch_spec(name), "kwargs": zoo.arch_kwargs(name), "test_acc": metrics["acc"],
            "test_loss": metrics["loss"], "train_seconds": round(seconds, 1),
            "train": {**s, "seed": seed, "optimizer": "adamw-0.9-0.98", "schedule": "warmup-cosine"}}


def eval_batches() -> list[dict[str, torch.Tensor]]:
    """``pysrc:eval`` in the CLI's evaluation batches."""
    data = pysrc.load_pysrc("pysrc:eval")
    return [select(data, slice(i, i + EVAL_BATCH)) for i in range(0, num_sequences(data), EVAL_BATCH)]


def build_lm(name: str) -> nn.Module:
    """A fresh byte-level GPT-2 or LLaMA of the zoo's shape (seed the generator first)."""
    import transformers

    if name.startswith("py-gpt2"):
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))


def save_lm(model: nn.Module, name: str) -> nn.Module:
    """Write ``model`` to the zoo's HF directory with float16 weights and a float32 ``config.dtype``
    (so it loads as float32, half the size on disk); return it as the CLI reads it back."""
    directory = lm_dir(name)
    model.half().save_pretrained(str(directory), safe_serialization=True)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    reloaded = load_hf_dir(f"zoo:{name}")
    if reloaded.dtype != torch.float32:
        raise RuntimeError(f"{directory} loads as {reloaded.dtype}, expected float32: check config.json")
    return reloaded


def train_lm(name: str, log: Callable[[str], None]) -> dict:
    """Train the zoo LM ``name`` on pysrc:train, save its HF directory and return its metrics record."""
    s, seed = LM_SETTINGS, SEEDS[name]
    stream = torch.frombuffer(bytearray(b"".join(pysrc.split_bytes("train"))), dtype=torch.uint8)
    torch.manual_seed(seed)
    model = build_lm(name)
    generator = torch.Generator().manual_seed(seed)
    span = torch.arange(s["seq_len"])

    def loss_of(step: int) -> torch.Tensor:
        offsets = torch.randint(0, len(stream) - s["seq_len"], (s["batch_size"],), generator=generator)
        ids = stream[offsets[:, None] + span].long()
        return model(input_ids=ids, labels=ids).loss

    start = time.perf_counter()
    adamw_loop(model, loss_of, s["steps"], s["lr"], s["weight_decay"], s["warmup"], log, 50)
    seconds = time.perf_counter() - start
    model = save_lm(model, name)
    metrics = perplexity(model, eval_batches())
    log(f"pysrc:eval ppl {metrics['ppl']:.3f} loss {metrics['loss']:.4f} ({seconds:.0f} s)")
    return {"arch": f"hf:{type(model).__name__}", "config": GPT2 if name.startswith("py-gpt2") else LLAMA,
            "eval_ppl": metrics["ppl"], "eval_loss": metrics["loss"], "eval_data": "pysrc:eval",
            "train_seconds": round(seconds, 1), "train": {**s, "seed": seed, "optimizer": "adamw-0.9-0.98",
                                                          "schedule": "warmup-cosine", "data": "pysrc:train"},
            "python": sys.version.split()[0], "stdlib_files": len(pysrc.source_files())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"models to train (default: all of {', '.join(SEEDS)})")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in SEEDS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(SEEDS)}")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    metrics_path = zoo.WEIGHTS_DIR / zoo.METRICS_FILE
    for name in args.names or list(SEEDS):
        log = lambda line, name=name: print(f"{name} {line}", flush=True)  # noqa: E731
        record = train_vit(name, log) if name.startswith("mnist-vit") else train_lm(name, log)
        record.update(torch=torch.__version__, threads=args.threads)
        records = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        records[name] = record
        metrics_path.write_text(json.dumps(dict(sorted(records.items())), indent=2) + "\n")


if __name__ == "__main__":
    main()
