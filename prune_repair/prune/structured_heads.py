"""Whole attention heads as prunable units (LLaMA-style attention: q/k/v/o_proj and a head_dim).

A head is ``head_dim`` consecutive output rows of ``q_proj`` and the same columns of
``o_proj`` (its consumer). With grouped-query attention (``num_key_value_heads`` below
``num_attention_heads``) query heads ``g * n_rep ... (g + 1) * n_rep - 1`` share key/value
head ``g``, so the unit is the whole group: its query heads, its rows of ``k_proj`` and
``v_proj``, its columns of ``o_proj``. Every layer loses the same number of units, so the
config keeps one ``num_attention_heads`` / ``num_key_value_heads`` (``head_dim`` stays and
is written explicitly); the smaller HF model loads with ``from_pretrained``.

Attention that cannot keep fewer heads at the same hidden size (torchvision's
``nn.MultiheadAttention``, GPT-2, BERT: their head size is hidden size / heads) is not
recognized here.

Example:
    >>> import torch, transformers
    >>> config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=32)
    >>> model = transformers.LlamaForCausalLM(config)
    >>> heads = find_heads(model)
    >>> heads[0].units, heads[0].unit_size, heads_to_remove(heads, 0.5)
    (2, 8, 1)
    >>> heads[0].shrink_(model, torch.tensor([1]))
    >>> set_config_heads_(model, heads[0], 1)
    >>> model.config.num_attention_heads, model(torch.tensor([[1, 2, 3]])).logits.shape
    (2, torch.Size([1, 3, 32]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .mlp_units import _keep_rows, consumer_rows, set_consumer_
from .targets import PruneError


@dataclass(frozen=True)
class HeadUnits:
    """One attention module: its projections, query heads, key/value heads and head size."""

    fqn: str
    consumer: str  # o_proj
    heads: int
    kv_heads: int
    head_dim: int

    kind = "heads"

    @property
    def producers(self) -> tuple[str, ...]:
        return tuple(f"{self.fqn}.{p}" for p in ("q_proj", "k_proj", "v_proj"))

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads

    @property
    def units(self) -> int:
        return self.kv_heads

    @property
    def unit_size(self) -> int:
        return self.group * self.head_dim

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    def columns(self, kept_units: torch.Tensor) -> torch.Tensor:
        """``o_proj`` columns (= ``q_proj`` rows) of the kept key/value groups."""
        return (kept_units[:, None] * self.unit_size + torch.arange(self.unit_size)).reshape(-1)

    def kept_rows(self, kept_units: torch.Tensor) -> dict[str, torch.Tensor]:
        kv = (kept_units[:, None] * self.head_dim + torch.arange(self.head_dim)).reshape(-1)
        q, k, v = self.producers
        return {q: self.columns(kept_units), k: kv, v: kv}

    def shrink_(self, model: nn.Module, kept_units: torch.Tensor, rows: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> None:
        """Keep the groups ``kept_units`` in place (``rows``/``bias``: the refitted ``o_proj``)."""
        kept_units = torch.as_tensor(kept_units, dtype=torch.long).cpu()
        for name, idx in self.kept_rows(kept_units).items():
            layer = model.get_submodule(name)
            _keep_rows(layer, idx.to(layer.weight.device))
        consumer = model.get_submodule(self.consumer)
        if rows is None:
            rows = consumer_rows(consumer).detach()[:, self.columns(kept_units).to(consumer.weight.device)]
        set_consumer_(consumer, rows, bias)


def find_heads(model: nn.Module) -> list[HeadUnits]:
    """Every LLaMA-style attention module of ``model`` (q/k/v/o_proj linears and ``head_dim``)."""
    found = []
    for fqn, module in model.named_modules():
        layers = [getattr(module, p, None) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        head_dim = getattr(module, "head_dim", None)
        if not all(isinstance(m, nn.Linear) for m in layers) or not isinstance(head_dim, int) or head_dim < 1:
            continue
        q, k, _, o = layers
        heads, kv = q.out_features // head_dim, k.out_features // head_dim
        if heads * head_dim == q.out_features == o.in_features and kv * head_dim == k.out_features and heads % kv == 0:
            found.append(HeadUnits(fqn, f"{fqn}.o_proj", heads, kv, head_dim))
    return found


def heads_to_remove(heads: list[HeadUnits], ratio: float) -> int:
    """Units (key/value groups) each layer loses; :class:`PruneError` unless the ratio gives a
    whole number of them in every layer."""
    if not 0 <= ratio < 1:
        raise PruneError(f"--structured-heads {ratio} is outside [0, 1): give the fraction of heads to remove, "
                         "e.g. 0.25")
    if not heads:
        raise PruneError("--structured-heads needs LLaMA-style attention (q_proj/k_proj/v_proj/o_proj and a head_dim); "
                         "this model's attention ties its head size to the hidden size and cannot keep fewer heads")
    counts = sorted({h.units for h in heads})
    if len(counts) != 1:
        raise PruneError(f"the attention layers have different key/value head counts {counts}: "
                         "--structured-heads needs one count")
    units, exact = counts[0], ratio * counts[0]
    what = "heads" if heads[0].group == 1 else f"key/value groups (of {heads[0].group} query heads each)"
    if abs(exact - round(exact)) > 1e-9:
        raise PruneError(f"--structured-heads {ratio:g} removes {exact:g} of the {units} {what} per layer, not a whole "
                         f"number: choose a multiple of 1/{units}")
    return int(round(exact))


def set_config_heads_(model: nn.Module, heads: HeadUnits, kept_units: int) -> None:
    """Write the new head counts (and the head size) into the model's HF config."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_attention_heads"):
        raise PruneError("--structured-heads writes the new head count into an HF config: the model has none")
    config.num_attention_heads = kept_units * heads.group
    config.num_key_value_heads = kept_units
    config.head_dim = heads.head_dim
