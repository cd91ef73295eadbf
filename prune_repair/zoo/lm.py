"""Byte-level causal language models shipped with the package as HF directories.

Each ``zoo:NAME`` here is a ``save_pretrained`` directory ``weights/NAME/`` (``config.json``
+ ``model.safetensors``) of a transformers causal LM with a 256-token vocabulary (the
bytes), trained by ``benchmarks/train_transformers.py`` on the Python standard library's
sources (the ``pysrc:train`` split of :mod:`prune_repair.io.pysrc`); the CLI reads
``zoo:NAME`` as ``hf:weights/NAME`` (transformers is needed to load them).

- ``py-gpt2`` / ``py-gpt2-b``: ``GPT2LMHeadModel`` (tied head, Conv1D projections), two seeds;
- ``py-llama``: ``LlamaForCausalLM`` (RMSNorm, rotary, bias-free projections, untied head).

Example:
    >>> lm_names()
    ['py-gpt2', 'py-gpt2-b', 'py-llama']
    >>> is_lm("zoo:py-llama"), is_lm("zoo:mnist-cnn"), is_lm("py-llama")
    (True, False, False)
    >>> lm_dir("zoo:py-gpt2").name
    'py-gpt2'
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["LM_NAMES", "lm_names", "is_lm", "lm_dir"]

LM_NAMES = ("py-gpt2", "py-gpt2-b", "py-llama")
_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_PREFIX = "zoo:"


def lm_names() -> list[str]:
    """Names of the zoo's language models, sorted."""
    return sorted(LM_NAMES)


def is_lm(spec: str) -> bool:
    """Whether ``spec`` is ``zoo:NAME`` for a language model of the zoo (the prefix is required)."""
    text = str(spec)
    return text.startswith(_PREFIX) and text[len(_PREFIX):] in LM_NAMES


def lm_dir(name: str) -> Path:
    """The HF directory of the zoo LM ``name`` (``zoo:`` prefix optional); it may not exist before training."""
    key = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
    if key not in LM_NAMES:
        raise ValueError(f"unknown zoo language model {name!r}: known ones are {', '.join(lm_names())}")
    return _WEIGHTS_DIR / key
