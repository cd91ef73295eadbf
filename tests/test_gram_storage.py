"""GramStorage: a finished Gram's memory reused by the next layer's, never memory still in use."""

import torch
from torch import nn

from prune_repair.engine.refit.gram_storage import GramStorage
from prune_repair.engine.refit.layerwise import layerwise_

CPU = torch.device("cpu")


def test_memory_in_use_is_never_lent_twice():
    storage = GramStorage()
    a = storage.zeros((1, 4, 4), CPU)
    b = storage.zeros((1, 4, 4), CPU)
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    storage.give_back(a)
    c = storage.zeros((1, 3, 3), CPU)
    d = storage.zeros((1, 3, 3), CPU)  # the spare is lent once
    assert c.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    assert d.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()


def test_reused_memory_is_zero_and_keeps_its_whole_size():
    storage = GramStorage()
    big = storage.zeros((1, 10, 10), CPU).fill_(7.0)
    storage.give_back(big)
    small = storage.zeros((1, 2, 2), CPU)
    assert float(small.abs().sum()) == 0.0
    storage.give_back(small)  # the whole buffer comes back, not just the 4 entries lent
    again = storage.zeros((1, 10, 10), CPU)
    assert again.data_ptr() == big.data_ptr() and float(again.abs().sum()) == 0.0


def test_each_dtype_has_its_own_spare_and_strided_tensors_are_not_kept():
    storage = GramStorage()
    storage.give_back(torch.ones(16, dtype=torch.float32))
    storage.give_back(torch.ones(4, 8, dtype=torch.float64).T)  # not contiguous
    fresh = storage.zeros((2, 2), CPU)
    assert fresh.numel() == 4 and float(fresh.sum()) == 0.0
    single = storage.empty((2, 2), CPU, torch.float32)  # the float32 spare, values as they were
    assert single.dtype == torch.float32 and float(single.sum()) == 4.0


def test_layerwise_grams_are_the_same_with_recycled_memory():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(2, 4, 3, padding=1)).double()  # Grams of 73, 73, 19 columns: the later reuse
    x = torch.randn(5, 8, 6, 6, dtype=torch.float64)
    layers = [("0", model[0]), ("2", model[2]), ("4", model[4])]
    pointers: list[int] = []
    seen: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    for recycle in (False, True):
        def step(i, gram, recycle=recycle):
            seen[recycle].append(gram.G.clone())
            pointers.append(gram.G.untyped_storage().data_ptr())
        layerwise_(model, [x], layers, step=step, recycle=recycle)
    for plain, recycled in zip(seen[False], seen[True], strict=True):
        assert torch.equal(plain, recycled)
    assert pointers[3] == pointers[4] == pointers[5]  # recycled: one buffer for all three
