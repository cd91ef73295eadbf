"""Watch (engine/sites/watched.py): calls that use given parameters reach the handler, nothing else
does, and the parameters are back in their slots afterwards, also after an error."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prune_repair.engine.sites.watched import Watch


class Tied(nn.Module):
    """A parent calling its child's weight through F.linear, the same weight registered twice."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.twin = nn.Linear(4, 4)
        self.twin.weight = self.inner.weight

    def forward(self, x):
        return self.twin(torch.relu(F.linear(x, self.inner.weight, self.inner.bias)))


def test_only_calls_that_use_a_watched_parameter_reach_the_handler_and_results_are_unchanged():
    torch.manual_seed(0)
    model, x = Tied(), torch.randn(3, 4)
    expected, weight = model(x), model.inner.weight
    seen = []

    def handler(func, args, kwargs):  # gets the parameter itself, not its stand-in
        seen.append((func, any(a is weight for a in args)))
        return func(*args, **kwargs)

    with Watch(model, [weight], handler):
        got = model(x)
    assert torch.equal(got, expected)
    assert [f for f, _ in seen] == [F.linear, F.linear] and all(is_param for _, is_param in seen)
    got.sum().backward()  # autograd reaches the parameters themselves
    assert model.inner.weight.grad is not None and model.inner.bias.grad is not None


def test_slots_are_restored_when_the_last_of_nested_entries_leaves_and_after_an_error():
    model = Tied()
    weight = model.inner.weight
    watch = Watch(model, [weight], lambda func, args, kwargs: func(*args, **kwargs))
    with watch:
        with watch:  # lockstep threads enter the same watch
            assert type(model.twin.weight) is not nn.Parameter
        assert type(model.inner.weight) is not nn.Parameter
    assert model.inner.weight is weight and model.twin.weight is weight
    with pytest.raises(RuntimeError, match="boom"):
        with Watch(model, [weight], lambda func, args, kwargs: func(*args, **kwargs)):
            raise RuntimeError("boom")
    assert model.inner.weight is weight and model.twin.weight is weight
    assert [name for name, _ in model.named_parameters()] == ["inner.weight", "inner.bias", "twin.bias"]


def test_a_lazy_layer_is_measured_as_before():
    from prune_repair import collect_stats

    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))
    stats = collect_stats(model, torch.randn(4, 3))
    assert list(stats) == ["0"] and type(model[0].weight) is nn.Parameter
