"""Packed self-attention with q/k/v projected once per pass (sites.attention_once): the same
output as nn.MultiheadAttention, and the same statistics and repairs as the calls that keep
their own path (q/k/v recomputed, corrections folded into the in-projection for the call)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.testing import assert_close

from prune_repair import collect_stats, find_sites, repair_
from prune_repair.engine.sites.attention_once import bind, projects_once, self_attention


class Block(nn.Module):
    """Linear -> self-attention (asking for the attention weights or not) -> linear."""

    def __init__(self, weights: bool, batch_first: bool = True, d: int = 8):
        super().__init__()
        self.weights, self.batch_first = weights, batch_first
        self.embed, self.mha = nn.Linear(3, d), nn.MultiheadAttention(d, 2, batch_first=batch_first)
        self.mlp, self.head = nn.Linear(d, d), nn.Linear(d, 2)

    def forward(self, x):
        h = self.embed(x if self.batch_first else x.transpose(0, 1))
        h = h + self.mha(h, h, h, need_weights=self.weights)[0]
        h = torch.relu(self.mlp(h))
        return self.head(h if self.batch_first else h.transpose(0, 1))


def block(weights: bool, batch_first: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return Block(weights, batch_first).double().eval()


class Once(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        call = bind(args, kwargs or {}) if func is F.multi_head_attention_forward else None
        if call is not None and projects_once(call):
            return self_attention(call, lambda q, k, v: (q, k, v))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("batch_first", [True, False])
def test_the_attention_computed_once_equals_the_module(batch_first):
    mha = block(False, batch_first).mha
    x = torch.randn(4, 6, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = mha(x, x, x, need_weights=False)[0]
        with Once():
            got = mha(x, x, x, need_weights=False)[0]
    assert_close(got, expected)
    call = bind((x, x, x, 8, 2, mha.in_proj_weight, mha.in_proj_bias, None, None, False, 0.0,
                 mha.out_proj.weight, mha.out_proj.bias), {"need_weights": True})
    assert not projects_once(call)  # attention weights asked for: the call keeps its own path


def test_statistics_and_repairs_equal_those_of_the_recomputing_path():
    x = torch.randn(12, 5, 3, dtype=torch.float64)
    once, own = block(False), block(True)  # the same weights; only need_weights differs
    stats_once, stats_own = collect_stats(once, [x[:7], x[7:]]), collect_stats(own, [x[:7], x[7:]])
    assert [s.fqn for s in stats_once.sites][1:4] == ["mha.in_proj:q", "mha.in_proj:k", "mha.in_proj:v"]
    for fqn in stats_own:
        assert_close(stats_once[fqn].mean, stats_own[fqn].mean)
        assert_close(stats_once[fqn].var, stats_own[fqn].var)
    goal = collect_stats(once, x)
    for passes in ("lockstep", "per-site"):
        a, b = copy.deepcopy(once), copy.deepcopy(own)
        with torch.no_grad():
            for m in (a, b):
                m.mha.in_proj_weight.mul_(torch.linspace(0.5, 2.0, 24, dtype=torch.float64)[:, None])
                m.embed.weight.mul_(1.5)
        repair_(a, goal, [x[:7], x[7:]], passes=passes)
        repair_(b, goal, [x[:7], x[7:]], passes=passes)
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert_close(p, q, msg=name)
        after = collect_stats(a, x, sites=find_sites(a, x[:2]))
        for fqn in ("mha.in_proj:q", "mha.in_proj:v", "mha.out_proj"):
            assert_close(after[fqn].std, goal[fqn].std, rtol=1e-6, atol=1e-9)
