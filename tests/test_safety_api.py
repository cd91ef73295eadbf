"""Python API functions leave their inputs alone unless their name ends in ``_`` (issue 5).

Each case calls one public function on fresh inputs: models in TRAIN mode with a
user hook, randomized BatchNorm statistics and one frozen parameter, plus data and
statistics tensors. Afterwards every input must be as it was: state_dict bytes,
train/eval flags, requires_grad flags, ``.grad`` (still None), hooks, the parameter
objects themselves, and every tensor argument.

``test_every_public_function_taking_a_model_has_a_case`` keeps the table complete:
a new public function that takes a model needs a case here (or a reason in EXEMPT).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

import prune_repair as pr
from prune_repair.zoo.models import MLP, PlainCNN, ResNetMini
from safety_helpers import state_digest


# plain imports: a module that stops importing fails this file instead of silently losing its cases
from prune_repair import prune
from prune_repair.metrics import evaluate
from prune_repair.prune import pipeline, structured

merge = importlib.import_module("prune_repair.merge")  # the package (pr.merge is the function)


def prepared(model: nn.Module) -> nn.Module:
    """A model as a user may hand it over: train mode, a hook, one frozen parameter, random BN stats."""
    model.train()
    model.register_forward_hook(lambda module, inputs, output: None)
    first = next(model.parameters())
    first.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.1)
            m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    return model


@dataclass
class Inputs:
    """Fresh inputs for one case; ``watched`` lists everything that must stay unchanged."""

    cnn: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    mlp_a: nn.Module
    mlp_b: nn.Module
    xm: torch.Tensor
    ym: torch.Tensor
    tmp: Any
    extra: dict[str, Any] = field(default_factory=dict)

    def watched(self) -> dict[str, Any]:
        return {"cnn": self.cnn, "x": self.x, "y": self.y, "mlp_a": self.mlp_a, "mlp_b": self.mlp_b,
                "xm": self.xm, "ym": self.ym, **self.extra}


def make_inputs(tmp_path) -> Inputs:
    torch.manual_seed(0)
    cnn = prepared(PlainCNN(channels=(4, 6), batch_norm=True, input_size=8))
    mlp_a, mlp_b = prepared(MLP(widths=(8, 8), in_features=4)), prepared(MLP(widths=(8, 8), in_features=4))
    x, y = torch.randn(32, 1, 8, 8), torch.arange(32) % 10
    xm, ym = torch.randn(32, 4), torch.arange(32) % 10
    return Inputs(cnn, x, y, mlp_a, mlp_b, xm, ym, tmp_path)


def fingerprint(obj: Any) -> Any:
    """Everything about ``obj`` a function could change in place."""
    if isinstance(obj, nn.Module):
        return {
            "state": state_digest(obj.state_dict()),
            "modules": [(n, type(m).__name__, m.training) for n, m in obj.named_modules()],
            "parameters": [(n, id(p), p.requires_grad, p.grad is None) for n, p in obj.named_parameters()],
            "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                       len(m._backward_pre_hooks)) for n, m in obj.named_modules()],
        }
    if isinstance(obj, torch.Tensor):
        return (obj.dtype, tuple(obj.shape), obj.requires_grad,
                hashlib.sha256(obj.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest())
    if isinstance(obj, pr.ActivationStats):
        return fingerprint(obj.state_dict())
    if isinstance(obj, dict):
        return {k: fingerprint(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [fingerprint(v) for v in obj]
    if hasattr(obj, "__dict__"):
        return fingerprint(dict(vars(obj)))
    return obj


# --- the cases: name -> function(inputs) that calls it -------------------------------------

CASES: dict[str, Callable[[Inputs], Any]] = {}


def case(name: str):
    def register(fn):
        CASES[name] = fn
        return fn

    return register


@case("prune_repair.collect_stats")
def _(i):
    pr.collect_stats(i.cnn, i.x)


@case("prune_repair.batchnorm_goal / RecordStats")
def _(i):
    pr.batchnorm_goal(i.cnn, i.x[:2])
    with pr.RecordStats(i.mlp_a, i.xm[:2], record="any") as rec:  # no BatchNorm: a forward changes nothing
        i.mlp_a(i.xm)
    rec.stats()


@case("prune_repair.find_sites")
def _(i):
    pr.find_sites(i.cnn, i.x[:2])


@case("prune_repair.fold_corrections")
def _(i):
    sites = pr.find_sites(i.cnn, i.x[:2])
    corrections = {s.fqn: pr.Correction(torch.full((s.channels,), 2.0, dtype=torch.float64),
                                        torch.ones(s.channels, dtype=torch.float64)) for s in sites}
    i.extra.update(sites=sites, corrections=corrections)
    fused = pr.fold_corrections(i.cnn, corrections, sites)
    assert state_digest(fused.state_dict()) != state_digest(i.cnn.state_dict())


@case("prune_repair.fuse_batchnorm")
def _(i):
    pr.fuse_batchnorm(i.cnn, i.x[:2])


@case("prune_repair.check_finite")
def _(i):
    pr.check_finite(i.cnn)


@case("prune_repair.fold_affine / fuse_bn / fold_affine_into_bn")
def _(i):
    w, b = torch.randn(3, 2), torch.randn(3)
    s, t, mean, var = torch.rand(3) + 0.5, torch.randn(3), torch.randn(3), torch.rand(3) + 0.5
    i.extra.update(w=w, b=b, s=s, t=t, mean=mean, var=var)
    pr.fold_affine(w, b, s, t)
    pr.fuse_bn(w, b, mean, var, 1e-5, s, t)
    pr.fold_affine_into_bn(s, t, mean, var, 1e-5, s, t)
    pr.fold_affine_into_bn(None, None, mean, var, 1e-5, s, t)


@case("prune_repair.ActivationStats.interpolate / select_channels")
def _(i):
    a, b = pr.collect_stats(i.mlp_a, i.xm), pr.collect_stats(i.mlp_b, i.xm)
    i.extra.update(a=a, b=b)
    a.interpolate(b, 0.3)
    a.select_channels({"features.fc1": torch.tensor([0, 2])})


@case("prune_repair.metrics.classify.evaluate")
def _(i):
    evaluate(i.cnn, i.x, i.y, batch_size=7)


@case("prune_repair.prune.find_targets / measure_sparsity / magnitude_scores / masks_from_scores")
def _(i):
    targets = prune.find_targets(i.cnn, example_inputs=i.x[:2])
    scores = prune.magnitude_scores(targets)
    i.extra.update(scores=scores)
    prune.masks_from_scores(scores, 0.5)
    prune.masks_from_scores(scores, 0.5, scope="layer")
    prune.measure_sparsity(targets)

for _method in ("global-magnitude", "layer-magnitude", "fisher", "woodfisher"):

    @case(f"prune_repair.prune.score_weights[{_method}]")
    def _(i, method=_method):
        options = prune.FisherOptions(num_grads=8, block_size=16)
        prune.score_weights(i.cnn, method, (i.x, i.y), options=options)


@case("prune_repair.prune.fisher_scores / gradient_chunks / labeled_data")
def _(i):
    targets = prune.find_targets(i.cnn)
    prune.labeled_data((i.x, i.y))
    prune.fisher_scores(i.cnn, targets, (i.x, i.y), num_grads=8)
    for _chunk in prune.gradient_chunks(i.cnn, targets, (i.x, i.y), num_grads=8):
        pass


@case("prune_repair.prune.inverse_fisher / woodfisher_scores")
def _(i):
    targets = prune.find_targets(i.cnn)
    inv = prune.inverse_fisher(i.cnn, targets, (i.x, i.y), num_grads=8, block_size=16)
    prune.woodfisher_scores(inv, targets)


@case("prune_repair.prune.input_norms / wanda_scores")
def _(i):
    targets = prune.find_targets(i.cnn, example_inputs=i.x[:2])
    prune.input_norms(i.cnn, targets, i.x)
    prune.wanda_scores(i.cnn, targets, i.x)


@case("prune_repair.prune.structured_prune")
def _(i):
    small = prune.structured_prune(i.mlp_a, i.xm, 0.25, latency_runs=1)
    assert small is not None


@case("prune_repair.merge.transformer_groups")
def _(i):
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = prepared(VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                                     num_classes=3))
    i.extra.update(vit=vit)
    assert merge.transformer_groups(vit)
    assert merge.transformer_groups(i.mlp_a) is None


@case("prune_repair.prune.pipeline.prune_and_repair")
def _(i):
    pipeline.prune_and_repair(i.cnn, (i.x, i.y), [0.5, 0.9])


@case("prune_repair.prune.structured.kept_channels / save_structured")
def _(i):
    import torch_pruning as tp

    torch.manual_seed(0)
    original = prepared(ResNetMini(width=8, blocks_per_stage=(1,)))
    example = torch.randn(2, 1, 28, 28)
    pruned = copy.deepcopy(original).eval()
    pruner = tp.pruner.MetaPruner(pruned, example, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=[pruned.fc])
    pruner.step()
    history = pruner.pruning_history()
    i.extra.update(original=original, pruned=pruned, history=history, example=example)
    structured.kept_channels(original, history, example)
    structured.save_structured(pruned, i.tmp / "structured.pt", history, example)


@case("prune_repair.merge.merge / merge_many")
def _(i):
    merge.merge(i.mlp_a, i.mlp_b, i.xm, alpha=0.3)
    merge.merge(i.mlp_a, i.mlp_b, i.xm, align="weight", repair="rescale")
    merge.merge_many([i.mlp_a, i.mlp_b, i.mlp_a], i.xm)


@case("prune_repair.merge.merge[closed-form, BatchNorm]")
def _(i):
    other = prepared(PlainCNN(channels=(4, 6), batch_norm=True, input_size=8))
    i.extra.update(other=other)
    merge.merge(i.cnn, other, i.x, variant="closed-form")
    merge.merge(i.cnn, other, i.x, repair="reset")


@case("prune_repair.merge.prepare_merge / MergePlan.merged / barrier_curve")
def _(i):
    plan = merge.prepare_merge([i.mlp_a, i.mlp_b], i.xm)
    plan.merged([0.5, 0.5])
    merge.barrier_curve(i.mlp_a, i.mlp_b, i.xm, i.xm, i.ym, alphas=3)


@case("prune_repair.merge.find_groups / find_alignment / activation_matching / weight_matching")
def _(i):
    groups = pr.find_groups(i.mlp_a, i.xm[:2])
    merge.find_alignment(i.mlp_a, i.mlp_b, groups, i.xm)
    merge.find_alignment(i.mlp_a, i.mlp_b, groups, method="weight")
    merge.activation_matching(i.mlp_a, i.mlp_b, i.xm, groups)
    merge.weight_matching(i.mlp_a, i.mlp_b, groups)


@case("prune_repair.merge.permute / check_function_preserved / probes_of / interpolate / site_moments")
def _(i):
    groups = pr.find_groups(i.cnn, i.x[:2])
    perms = merge.random_perms(groups, torch.Generator().manual_seed(0))
    i.extra.update(perms=perms)
    merge.permute(i.cnn, groups, perms)
    merge.check_function_preserved(i.cnn, groups, i.x[:4])
    merge.probes_of(i.cnn, groups[0])
    merge.interpolate([i.mlp_a, i.mlp_b], [0.25, 0.75])
    merge.site_moments([i.mlp_a, i.mlp_b], i.xm, pr.find_sites(i.mlp_a, i.xm[:2]))


@case("prune_repair.merge.lerp_state_dicts / permute_state_dict")
def _(i):
    a, b = i.mlp_a.state_dict(), i.mlp_b.state_dict()
    groups = pr.find_groups(i.mlp_a, i.xm[:2])
    perms = merge.random_perms(groups, torch.Generator().manual_seed(0))
    i.extra.update(state_a=a, state_b=b, perms=perms)
    merge.lerp_state_dicts([a, b], [0.5, 0.5])
    merge.permute_state_dict(a, groups, perms)


@pytest.mark.parametrize("name", sorted(CASES))
def test_inputs_are_unchanged(name, tmp_path):
    inputs = make_inputs(tmp_path)

    class Watching(dict):
        """Cases register the inputs they build in ``extra``: fingerprinted when registered."""

        def update(self, *args, **kwargs):
            super().update(*args, **kwargs)
            for key, value in dict(*args, **kwargs).items():
                added[key] = fingerprint(value)

    added: dict[str, Any] = {}
    inputs.extra = Watching()
    before = fingerprint(inputs.watched())
    grad_mode = torch.is_grad_enabled()
    CASES[name](inputs)
    after = fingerprint({k: v for k, v in inputs.watched().items() if k not in added})
    assert after == before, f"{name} changed an input"
    assert {k: fingerprint(inputs.extra[k]) for k in added} == added, f"{name} changed an input"
    assert torch.is_grad_enabled() == grad_mode


# --- the table covers the API -----------------------------------------------------------------

EXEMPT = {
    "default_forward": "calls the model's forward, nothing else",
    "repair_structured_": "ends in _",
}


def public_functions_taking_a_model() -> set[str]:
    names = set()
    for module_name in ("prune_repair", "prune_repair.prune", "prune_repair.merge", "prune_repair.prune.pipeline"):
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name, None)
            if not inspect.isfunction(obj) or name.endswith("_") or name in EXEMPT:
                continue
            params = inspect.signature(obj).parameters.values()
            if any("Module" in str(p.annotation) for p in params):
                names.add(name)
    return names


def test_every_public_function_taking_a_model_has_a_case():
    def named(name: str) -> bool:  # a case title names it: "pkg.name", "/ name", "name[...]"
        return any(re.search(rf"(^|[ ./]){re.escape(name)}($|[ \[/])", title) for title in CASES)

    missing = sorted(n for n in public_functions_taking_a_model() if not named(n))
    assert not missing, f"add a case to tests/test_safety_api.py for: {', '.join(missing)}"
