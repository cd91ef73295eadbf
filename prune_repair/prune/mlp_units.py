"""The hidden units of transformer MLPs: finding them, and removing them physically.

An MLP's hidden units are the output rows of its *producers* (``fc1``; LLaMA's
``gate_proj`` and ``up_proj``) and the input columns of its *consumer* (``fc2`` /
``c_proj`` / ``down_proj``); between them sits an elementwise activation, so unit ``j``
can be removed by dropping row ``j`` of every producer and column ``j`` of the consumer.
Recognized layouts (:func:`find_mlps`):

- torchvision ``MLPBlock`` / ``torchvision.ops.MLP`` with two linears (ViT ``mlp.0`` / ``mlp.3``);
- HF GPT-2 ``c_fc`` / ``c_proj`` (``Conv1D``, weight stored ``[in, out]``);
- LLaMA-style ``gate_proj`` / ``up_proj`` / ``down_proj``;
- BERT / HF ViT layers: ``intermediate.dense`` / ``output.dense``;
- any module with linear ``fc1`` / ``fc2`` (OPT, CLIP, the zoo's ``TokenBlock``).

Example:
    >>> import torch
    >>> from prune_repair.zoo.models import TokenMLP
    >>> model = TokenMLP(dim=8, depth=2)
    >>> [(m.consumer, m.width) for m in find_mlps(model)]
    [('blocks.0.fc2', 16), ('blocks.1.fc2', 16)]
    >>> mlp = find_mlps(model)[0]
    >>> shrink_mlp_(model, mlp, torch.arange(4))
    >>> model.blocks[0].fc1.out_features, model.blocks[0].fc2.in_features
    (4, 4)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..engine.producers import is_conv1d
from .targets import PruneError

CONFIG_WIDTH_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "mlp_dim")
"""Config attributes (HF configs; torchvision ViT's attribute) that hold the MLP width."""


@dataclass(frozen=True)
class MLPUnits:
    """One MLP: its module path, the layers whose outputs are the units, the layer reading them."""

    fqn: str
    producers: tuple[str, ...]
    consumer: str
    width: int

    kind = "mlp"
    unit_size = 1  # consumer columns per unit

    @property
    def units(self) -> int:
        return self.width

    def columns(self, kept_units: torch.Tensor) -> torch.Tensor:
        """The consumer columns of the kept units (here: the units themselves)."""
        return kept_units

    def kept_rows(self, kept_units: torch.Tensor) -> dict[str, torch.Tensor]:
        """Output rows each producer keeps."""
        return {p: kept_units for p in self.producers}

    def shrink_(self, model: nn.Module, kept_units: torch.Tensor, rows: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> None:
        shrink_mlp_(model, self, kept_units, rows, bias)


def _linear(module: nn.Module | None) -> bool:
    return isinstance(module, nn.Linear) or (module is not None and is_conv1d(module))


def _in_features(module: nn.Module) -> int:
    return int(module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1])


def _out_features(module: nn.Module) -> int:
    return int(module.weight.shape[1] if is_conv1d(module) else module.weight.shape[0])


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _match(fqn: str, module: nn.Module) -> MLPUnits | None:
    """The MLP ``module`` is, or None."""
    get = lambda path: module.get_submodule(path) if _has(module, path) else None  # noqa: E731
    layouts = (("gate_proj", "up_proj"), "down_proj"), (("c_fc",), "c_proj"), (("fc1",), "fc2"), \
        (("intermediate.dense",), "output.dense")
    for producers, consumer in layouts:
        layers = [get(p) for p in producers] + [get(consumer)]
        if all(_linear(m) for m in layers):
            widths = {_out_features(m) for m in layers[:-1]} | {_in_features(layers[-1])}
            if len(widths) == 1:
                return MLPUnits(fqn, tuple(_join(fqn, p) for p in producers), _join(fqn, consumer), widths.pop())
    if type(module).__name__ in ("MLPBlock", "MLP") and isinstance(module, nn.Sequential):
        linears = [(name, m) for name, m in module.named_children() if isinstance(m, nn.Linear)]
        if len(linears) == 2 and linears[0][1].out_features == linears[1][1].in_features:
            return MLPUnits(fqn, (_join(fqn, linears[0][0]),), _join(fqn, linears[1][0]), linears[0][1].out_features)
    return None


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def find_mlps(model: nn.Module) -> list[MLPUnits]:
    """Every recognized MLP of ``model`` in module order (nested matches are not repeated)."""
    found: list[MLPUnits] = []
    for fqn, module in model.named_modules():
        if any(fqn.startswith(m.fqn + ".") for m in found if m.fqn):
            continue
        match = _match(fqn, module)
        if match is not None:
            found.append(match)
    return found


def units_to_remove(width: int, ratio: float) -> int:
    """How many of ``width`` units a ``ratio`` removes (rounded, at least one kept).

    >>> units_to_remove(64, 0.25), units_to_remove(10, 0.25), units_to_remove(4, 0.9)
    (16, 2, 3)
    """
    return min(int(round(ratio * width)), width - 1)


def _keep_rows(layer: nn.Module, kept: torch.Tensor) -> None:
    """Keep the output units ``kept`` of a producer (Linear rows / Conv1D columns)."""
    with torch.no_grad():
        if is_conv1d(layer):
            layer.weight = nn.Parameter(layer.weight[:, kept].clone())
            layer.nf = int(kept.numel())
        else:
            layer.weight = nn.Parameter(layer.weight[kept].clone())
            layer.out_features = int(kept.numel())
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias[kept].clone())


def set_consumer_(layer: nn.Module, rows: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Give a consumer new ``(out, k)`` weight rows (and a bias when it has one), in place."""
    like = layer.weight
    with torch.no_grad():
        weight = rows.T if is_conv1d(layer) else rows
        layer.weight = nn.Parameter(weight.to(dtype=like.dtype, device=like.device).contiguous())
        if not is_conv1d(layer):
            layer.in_features = int(rows.shape[1])
        if bias is not None and layer.bias is not None:
            layer.bias = nn.Parameter(bias.to(dtype=like.dtype, device=like.device).clone())


def consumer_rows(layer: nn.Module) -> torch.Tensor:
    """The consumer's weight as ``(out, width)`` rows (a view)."""
    return layer.weight.T if is_conv1d(layer) else layer.weight


def shrink_mlp_(model: nn.Module, mlp: MLPUnits, kept: torch.Tensor, rows: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> None:
    """Keep units ``kept`` of ``mlp`` in place: producer rows dropped, consumer columns dropped
    (or replaced by ``rows`` ``(out, len(kept))`` and ``bias`` when given)."""
    kept = torch.as_tensor(kept, dtype=torch.long)
    for name in mlp.producers:
        layer = model.get_submodule(name)
        _keep_rows(layer, kept.to(layer.weight.device))
    consumer = model.get_submodule(mlp.consumer)
    if rows is None:
        rows = consumer_rows(consumer).detach()[:, kept.to(consumer.weight.device)]
    set_consumer_(consumer, rows, bias)


def set_config_width_(model: nn.Module, old: int, new: int) -> str | None:
    """Write the new MLP width into the model's config (HF ``config``, or the model's own
    attribute such as torchvision ViT's ``mlp_dim``). Returns the key set, or None when no
    config names the width. GPT-2's ``n_inner=None`` (meaning ``4 * n_embd``) is set too."""
    config = getattr(model, "config", None)
    for holder in (config, model):
        if holder is None:
            continue
        for key in CONFIG_WIDTH_KEYS:
            value = getattr(holder, key, "missing")
            if value == old or (key == "n_inner" and value is None and getattr(holder, "n_embd", 0) * 4 == old):
                setattr(holder, key, new)
                return key
    return None


def uniform_width(mlps: list[MLPUnits]) -> int:
    """The width every MLP shares, or :class:`PruneError` (a config holds one number)."""
    widths = sorted({m.width for m in mlps})
    if len(widths) != 1:
        raise PruneError(f"the MLPs have different widths {widths}: a uniform --structured ratio needs one width "
                         "(HF configs hold one intermediate size)")
    return widths[0]
