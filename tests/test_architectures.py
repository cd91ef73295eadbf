"""Torchvision classification architectures end to end (issue 9): sites, exact repair, keys.

Each architecture is built at a small input size with random initialisation, in eval mode
and float64, and checked for:

1. coverage: every conv/linear layer and attention projection that RUNS in the forward pass
   (traced here independently of the engine: forward hooks on every conv/linear/attention
   module, plus every conv/linear function call that receives one of their weights, as
   swin's ``F.linear(x, self.qkv.weight, ...)``) is the producer of a site, except the
   classifier, which is exactly the one extra site of ``include_classifier=True``;
2. exactness: after ``prune_(model, 0.5)`` and an exact repair toward the dense model's
   statistics on the same batch, the repaired model's statistics equal the goal at every
   site (rtol 1e-6). Channels the engine reports as dead, and the means of sites it reports
   as ``shift_dropped`` (a bias-free layer with no norm after it), are left out, and must be
   reported: nothing is skipped silently;
3. surgery: state_dict keys and shapes unchanged, every pruned zero still zero.

``repair="repair"`` is used, not the default ``auto``: ``auto`` *resets* BatchNorm sites
(recomputes their running statistics), which does not aim at the reference statistics.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

import prune_repair as pr
from prune_repair.engine.sites.find import split_owner

CONV_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class Arch:
    build: Callable[[], nn.Module]
    size: int  # input height = width
    batch: int
    classifier: str
    method: str = "global-magnitude"


ARCHS: dict[str, Arch] = {
    "resnet18": Arch(lambda: torchvision.models.resnet18(num_classes=10), 32, 8, "fc"),
    "mobilenet_v3_small": Arch(lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 64, 8,
                               "classifier.3"),
    # random-init depthwise convs (kaiming fan_out) are ~k^2 smaller than the rest: one global magnitude
    # threshold zeroes whole layers, leaving the later sites nearly constant (std ~1e-4 of the mean),
    # where float64 round-off reaches 1e-6; the same sparsity per layer keeps the check meaningful
    "efficientnet_b0": Arch(lambda: torchvision.models.efficientnet_b0(num_classes=10), 32, 8, "classifier.1",
                            "layer-magnitude"),
    "convnext-tiny": Arch(lambda: ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10),
                          32, 16, "classifier.2"),
    "vit-tiny": Arch(lambda: VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                               hidden_dim=32, mlp_dim=64, num_classes=10), 32, 16, "heads.head"),
    "swin-tiny": Arch(lambda: SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                              window_size=[2, 2], num_classes=10), 32, 16, "head"),
    "densenet-tiny": Arch(lambda: torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2),
                                                              num_init_features=16, num_classes=10),
                          32, 16, "classifier"),
    "googlenet": Arch(lambda: torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=False),
                      32, 8, "fc"),
    "resnet50": Arch(lambda: torchvision.models.resnet50(num_classes=10), 32, 4, "fc"),
    # 75 px is the smallest input inception_v3 takes; its aux head does not run in eval mode
    "inception_v3": Arch(lambda: torchvision.models.inception_v3(num_classes=10, aux_logits=True, init_weights=False),
                         75, 4, "fc"),
}
SLOW: set[str] = {"inception_v3"}  # the others take < 2 s each on 2 CPU cores (float64)


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The architecture in float64 eval mode with non-trivial norm statistics, and its batch."""
    arch = ARCHS[name]
    torch.manual_seed(0)
    model = arch.build().double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.Linear) and not m.weight.any():  # ViT's zero-initialised head
                m.weight.normal_(0, 0.1)
    torch.manual_seed(1)
    return model.eval(), torch.randn(arch.batch, 3, arch.size, arch.size, dtype=torch.float64)


def layers_that_run(model: nn.Module, x: torch.Tensor) -> set[str]:
    """Conv/linear layers and attention in-projections that run on ``x``, traced without the
    engine: ``'<fqn>'`` for a conv/linear layer (its own forward, or a conv/linear function
    called on its weight anywhere) and ``'<mha>.in_proj'`` for an ``nn.MultiheadAttention``."""
    names = {m: n for n, m in model.named_modules()}
    ran: set[str] = set()
    weights = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, CONV_LINEAR)}
    weights |= {id(m.in_proj_weight): f"{n}.in_proj" for n, m in model.named_modules()
                if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None}

    def hook(module, inputs, output):
        if isinstance(module, nn.MultiheadAttention):  # also when it takes the fused fast path
            ran.update({f"{names[module]}.in_proj", f"{names[module]}.out_proj"})
        else:
            ran.add(names[module])

    class Calls(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if "linear" in name or "conv" in name:
                for a in (*args, *(kwargs or {}).values()):
                    if isinstance(a, torch.Tensor) and id(a) in weights:
                        ran.add(weights[id(a)])
            return func(*args, **(kwargs or {}))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, CONV_LINEAR + (nn.MultiheadAttention,))]
    try:
        with torch.no_grad(), Calls():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return ran


def covered(site: pr.Site) -> str:
    """The layer name of :func:`layers_that_run` that ``site`` corrects."""
    return f"{split_owner(site.fqn)}.in_proj" if ".in_proj:" in site.fqn else site.producer


PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in ARCHS]


@pytest.mark.parametrize("name", PARAMS)
def test_sites_cover_every_layer_that_runs(name):
    model, x = build(name)
    ran = layers_that_run(model, x)
    sites = pr.find_sites(model, x)
    with_head = pr.find_sites(model, x, include_classifier=True)
    have = {covered(s) for s in sites}
    missing = sorted(ran - have - {ARCHS[name].classifier})
    assert not missing, f"{name}: layers that ran but are no site: {missing}"
    assert ARCHS[name].classifier in ran and ARCHS[name].classifier not in have
    assert [covered(s) for s in with_head if s not in sites] == [ARCHS[name].classifier]
    assert have <= ran, f"{name}: sites of layers that never ran: {sorted(have - ran)}"
    assert len({s.fqn for s in sites}) == len(sites)
    calls = {s.call for s in sites}
    assert ("attention" in calls) == name.startswith("vit") and ("function" in calls) == name.startswith("swin")


@pytest.mark.parametrize("name", PARAMS)
def test_exact_repair_after_pruning_half(name):
    model, x = build(name)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    goal = pr.collect_stats(model, x)
    targets = pr.find_targets(model)
    pruned = pr.prune_(model, 0.5, ARCHS[name].method)
    assert pruned.achieved_sparsity == pytest.approx(0.5, abs=0.01)
    zeros = {t.stored_name: (t.weight == 0).clone() for t in targets}
    before = pr.collect_stats(model, x, sites=goal.sites)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = pr.repair_(model, goal, x, repair="repair", variant="exact")
    after = pr.collect_stats(model, x, sites=goal.sites)

    # nothing is silently left out: every site is in the report and none is skipped
    assert [s.fqn for s in report.sites] == [s.fqn for s in goal.sites]
    assert not report.skipped, report.skipped
    assert not [w for w in caught if "not corrected" in str(w.message)]
    assert report.passes == 1 and set(report.corrections) == set(goal)
    # the pruning did disturb the statistics, so this is no no-op
    assert any(not torch.allclose(before[f].std, goal[f].std, rtol=1e-3) for f in goal)

    shift_dropped = {s.fqn for s in report.sites if s.shift_dropped}
    dead = report.dead_channels
    checked = 0
    for site in goal.sites:
        f = site.fqn
        alive = torch.ones(site.channels, dtype=torch.bool)
        alive[dead.get(f, [])] = False
        atol = 1e-9 * float(goal[f].std.abs().max()) + 1e-12
        torch.testing.assert_close(after[f].std[alive], goal[f].std[alive], rtol=1e-6, atol=atol,
                                   msg=lambda m, f=f: f"{name} site {f} std: {m}")
        if f not in shift_dropped:
            torch.testing.assert_close(after[f].mean[alive], goal[f].mean[alive], rtol=1e-6, atol=atol,
                                       msg=lambda m, f=f: f"{name} site {f} mean: {m}")
        checked += int(alive.sum())
    if name.startswith("densenet"):  # its conv2/transition convs: no bias, and a concat before the next norm
        assert shift_dropped
    assert checked > 0.5 * sum(s.channels for s in goal.sites), f"{name}: most channels dead: {dead}"

    # keys, shapes and zeros kept
    state = model.state_dict()
    assert list(state) == list(dense)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in dense.items()}
    assert all(v.dtype == dense[k].dtype for k, v in state.items())
    params = dict(model.named_parameters())
    for stored_name, was_zero in zeros.items():
        assert not params[stored_name][was_zero].any(), f"{name}: {stored_name} lost pruned zeros"
