"""Every correction of the registry under every pass strategy equals the inline single pass.

The calibration pipeline (``engine/run/pipeline.py``) runs each method under each strategy
from one implementation. The specification, on four small float64 models (an MLP, a CNN
with BatchNorm, a ViT encoder with ``nn.MultiheadAttention``, a GPT-2-shaped HF model built
from a ``GPT2Config`` with padded tokens): for every ``RepairMode`` (reconstruction included),
``Variant`` and ``Passes``, ``repair_`` over three batches gives the weights of the same call
on the three batches as ONE batch (one inline pass), to 1e-9; a combination that cannot
apply is refused with a one-line ``ValueError`` saying why, and the model is left unchanged.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torchvision.models.vision_transformer import Encoder

from prune_repair import Passes, RepairMode, repair_
from prune_repair.engine.correct.modes import Variant


class Tokens(nn.Module):
    """A ViT encoder on (N, T, D) tokens, then a linear head on the mean token."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.encoder = Encoder(seq_length=5, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16, dropout=0.0,
                               attention_dropout=0.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=24, n_positions=16, n_embd=8, n_layer=2, n_head=2, bos_token_id=0,
                                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def _tokens(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(n, 7, dtype=torch.long)
    mask[::3, 5:] = 0  # padded positions: left out of every statistic
    return {"input_ids": torch.randint(0, 24, (n, 7), generator=g), "attention_mask": mask}


def _model(name: str) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    if name == "mlp":
        model, x = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)), \
            torch.randn(36, 5)
    elif name == "cnn-bn":
        model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                              nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        x = torch.randn(36, 2, 6, 6)
    elif name == "vit-block":
        model, x = Tokens(), torch.randn(36, 5, 6)
    else:
        model, x = _gpt2(), _tokens(36)
    return model.double().eval(), x.double() if isinstance(x, torch.Tensor) else x


def _damaged(model: nn.Module) -> nn.Module:
    """Half of every weight matrix zeroed (the rest scaled): the pruned model to repair."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "wte" not in name and "wpe" not in name:
                p.mul_((torch.rand(p.shape, generator=g) >= 0.5).double() * 1.7)
    return model


def _split(x, parts: int = 3) -> list:
    if isinstance(x, dict):
        pieces = {k: v.chunk(parts) for k, v in x.items()}
        return [{k: pieces[k][i] for k in x} for i in range(parts)]
    return list(x.chunk(parts))


def refusal(name: str, mode: RepairMode, variant: Variant, passes: Passes) -> str | None:
    """What the combination is refused with (a regex), or None when it must run."""
    if variant is Variant.CLOSED_FORM:
        return "applies to merging only"
    if variant is Variant.ALL_AT_ONCE and passes is not Passes.LOCKSTEP:
        return "makes one pass anyway"
    if variant is Variant.ALL_AT_ONCE and mode is RepairMode.RECONSTRUCT:
        return "refits each layer with the layers before it already refitted"
    if mode is RepairMode.RESET and name != "cnn-bn":
        return "no site of this model is followed by a BatchNorm"
    return None


COMBINATIONS = [(mode, variant, passes) for mode in RepairMode for variant in Variant for passes in Passes]


@pytest.mark.parametrize("name", ["mlp", "cnn-bn", pytest.param("vit-block", marks=pytest.mark.slow),
                                  pytest.param("gpt2", marks=pytest.mark.slow)])
def test_every_correction_under_every_strategy_equals_the_inline_pass(name):
    reference, x = _model(name)
    damaged = _damaged(reference)
    batches = _split(x)
    inline: dict[tuple, nn.Module] = {}
    checked = refused = 0
    for mode, variant, passes in COMBINATIONS:
        why = refusal(name, mode, variant, passes)
        model = copy.deepcopy(damaged)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # under-determined layers, skipped sites: not what is tested here
            if why is not None:
                with pytest.raises(ValueError, match=why) as error:
                    repair_(model, reference, batches, repair=mode, variant=variant, passes=passes)
                assert "\n" not in str(error.value), f"{mode.value}/{variant.value}/{passes.value}: not one line"
                _assert_same(model, damaged, f"refused {mode.value}/{variant.value}/{passes.value} changed the model")
                refused += 1
                continue
            if (mode, variant) not in inline:
                inline[mode, variant] = copy.deepcopy(damaged)
                repair_(inline[mode, variant], reference, x, repair=mode, variant=variant)
            report = repair_(model, reference, batches, repair=mode, variant=variant, passes=passes)
        _assert_same(model, inline[mode, variant], f"{mode.value}/{variant.value}/{passes.value}")
        if passes is Passes.BLOCKWISE and not mode.reconstructs and mode is not RepairMode.NONE:
            assert report.extra["blockwise"]["blocks"] >= 2
        checked += 1
    assert checked >= len(RepairMode) * len(Passes) - len(Passes)  # the exact variant runs everywhere but reset
    assert refused >= len(RepairMode) * len(Passes)  # closed-form at least


def _assert_same(a: nn.Module, b: nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb), what
    for key in sa:
        assert_close(sa[key], sb[key], rtol=1e-9, atol=1e-9, msg=lambda m, key=key: f"{what}: {key}: {m}")


def test_a_refusal_names_the_option_in_one_line():
    reference, x = _model("mlp")
    with pytest.raises(ValueError, match=re.escape("passes='per-site'")):
        repair_(_damaged(reference), reference, _split(x), variant="all-at-once", passes="per-site")


def test_progress_shows_every_decided_site_per_block_and_is_silent_by_default(capsys, monkeypatch):
    from prune_repair import reconstruct_
    from prune_repair.engine.run import progress

    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)  # a line per step (default: at most one per 5 s)
    reference, x = _model("cnn-bn")
    report = repair_(_damaged(reference), reference, _split(x), repair="repair", passes="blockwise", progress=True)
    lines = capsys.readouterr().err.splitlines()
    goal = [line for line in lines if line.startswith("statistics: ")]  # first the goal, measured on the reference
    assert len(goal) == len(report.sites) and lines[:len(goal)] == goal
    assert goal[-1].endswith(f"[{len(goal)}/{len(goal)}]")
    lines = lines[len(goal):]
    assert len(lines) == len(report.sites) and all(line.startswith("repair: ") for line in lines)
    assert all(re.match(r"repair: block \d+/9 \(\d\), '\d'", line) for line in lines)  # the chain: 9 children
    assert lines[-1].endswith(f"[{len(lines)}/{len(lines)}]")
    seen = []
    rebuilt = reconstruct_(_damaged(reference), reference, _split(x), progress=lambda done, total: seen.append((done,
                                                                                                              total)))
    assert seen == [(k + 1, len(rebuilt.layers)) for k in range(len(rebuilt.layers))]
    repair_(_damaged(reference), reference, _split(x), repair="repair")  # the library is silent unless asked
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name", ["mlp", "cnn-bn"])
def test_obs_pruning_under_every_strategy_equals_the_inline_pass(name):
    from prune_repair.prune.obs import obs_prune_

    reference, x = _model(name)
    for target in ("reference", "layer"):  # the dense model run beside, or each layer's own output
        inline = copy.deepcopy(reference)
        obs_prune_(inline, x, 0.5, block_size=4, target=target)
        for passes in Passes:
            model = copy.deepcopy(reference)
            report = obs_prune_(model, _split(x), 0.5, block_size=4, passes=passes, target=target)
            assert report.achieved_sparsity == pytest.approx(0.5, abs=0.01)
            _assert_same(model, inline, f"obs/{target}/{passes.value}")
