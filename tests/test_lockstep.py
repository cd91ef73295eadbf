"""Lockstep passes (issue 9): several calibration batches, one pass per batch, exact in float64."""

import copy
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from prune_repair import collect_stats, repair_
from prune_repair.engine.run.lockstep import Lockstep, Stream
from prune_repair.zoo.models import ResNetMini
from engine_helpers import damage_


def assert_same_weights(a, b, tol=1e-10):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert_close(sa[key], sb[key], rtol=tol, atol=tol, msg=lambda m, key=key: f"{key}: {m}")


def finishes(fn, seconds=20.0):
    """``fn()``'s result or exception, asserting it returns within ``seconds`` (never hangs)."""
    out = {}

    def call():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out["error"] = e

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"did not finish within {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def resnet():
    torch.manual_seed(0)
    model = ResNetMini(width=4, blocks_per_stage=(1, 1), norm="bn").double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def three_ways(model, goal, x, splits, **kw):
    """The model repaired over one batch, over ``splits`` in lockstep and per site; reports."""
    out = {}
    for name, data, passes in (("one", x, "lockstep"), ("lockstep", list(x.split(splits)), "lockstep"),
                               ("per-site", list(x.split(splits)), "per-site")):
        m = copy.deepcopy(model)
        out[name] = (m, repair_(m, goal, data, passes=passes, **kw))
    return out


@pytest.mark.parametrize("repair", ["repair", "auto"])
def test_lockstep_equals_per_site_and_one_concatenated_batch(repair):
    reference = resnet()
    x = torch.randn(24, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    goal = collect_stats(reference, x)
    model = copy.deepcopy(reference)
    damage_(model)
    out = three_ways(model, goal, x, [7, 9, 8], repair=repair)
    assert_same_weights(out["lockstep"][0], out["per-site"][0], 1e-12)  # same merge order
    assert_same_weights(out["lockstep"][0], out["one"][0])
    assert out["lockstep"][1].passes == 1 and out["one"][1].passes == 1  # one forward per batch
    assert out["per-site"][1].passes == len(goal.sites)
    modes = {s.mode for s in out["lockstep"][1].sites}
    assert modes == ({"repair"} if repair == "repair" else {"reset"})


def test_reconstruct_over_batches_equals_one_concatenated_batch_one_pass_per_batch():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 6, 3), nn.Flatten(),
                              nn.Linear(6 * 6 * 6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)).double().eval()
    model = copy.deepcopy(reference)
    damage_(model, 0.6)
    x = torch.randn(30, 1, 10, 10, dtype=torch.float64)
    one, many = copy.deepcopy(model), copy.deepcopy(model)
    r1 = repair_(one, reference, x, repair="reconstruct")
    r3 = repair_(many, reference, list(x.split([9, 11, 10])), repair="reconstruct")
    assert_same_weights(one, many)
    passes = r3.extra["reconstruct"]["passes"]
    assert passes["model"] == 3 and passes["reference"] == 3 and r1.extra["reconstruct"]["passes"]["model"] == 1
    assert r1.extra["reconstruct"]["passes"]["reference"] == 1  # one streamed reference pass, nothing re-run
    per_site = copy.deepcopy(model)
    r_ps = repair_(per_site, reference, list(x.split([9, 11, 10])), repair="reconstruct", passes="per-site")
    assert_same_weights(per_site, many)
    assert r_ps.extra["reconstruct"]["passes"]["model"] > 3  # one prefix pass per layer and batch


@pytest.mark.parametrize("splits", [[20], [6, 7, 7]])
def test_reference_targets_are_not_changed_by_an_in_place_relu(splits):
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)).double()
    x = torch.randn(20, 5, dtype=torch.float64)
    report = repair_(copy.deepcopy(reference), reference, list(x.split(splits)), repair="reconstruct")
    # the model is the reference: its error is rounding (about 1e-8); a changed target would give about 0.1-1
    assert all(layer["error_before"] < 1e-6 for layer in report.extra["reconstruct"]["layers"])


def test_per_site_is_refused_where_it_does_not_apply():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(8, 3)
    with pytest.raises(ValueError, match="exact variant"):
        repair_(model, collect_stats(model, x), x, variant="all-at-once", passes="per-site")
    with pytest.raises(ValueError, match="unknown passes 'twice'"):
        repair_(model, collect_stats(model, x), x, passes="twice")


class TokenNet(nn.Module):
    """Embedding -> Linear -> F.linear through the parent -> MultiheadAttention -> head."""

    def __init__(self, d=8):
        super().__init__()
        self.emb = nn.Embedding(20, d)
        self.fc = nn.Linear(d, d)
        self.inner = nn.Linear(d, d)  # its weight is used through F.linear: a "function" site
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.fc(self.emb(input_ids)))
        h = torch.tanh(F.linear(h, self.inner.weight, self.inner.bias))
        pad = None if attention_mask is None else attention_mask == 0
        return self.head(self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0])


def tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (n,), generator=g)
    mask = (torch.arange(8)[None, :] < lengths[:, None]).long()
    return {"input_ids": torch.randint(1, 20, (n, 8), generator=g) * mask, "attention_mask": mask}


def test_forward_fn_dict_batches_function_sites_and_attention():
    torch.manual_seed(0)
    reference = TokenNet().double().eval()
    parts = [tokens(5, 1), tokens(7, 2), tokens(6, 3)]
    whole = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    calls = []

    def forward_fn(model, batch):
        calls.append(threading.current_thread().name)
        return model(**batch)

    goal = collect_stats(reference, whole, forward_fn=forward_fn)
    kinds = {s.fqn: s.call for s in goal.sites}
    assert kinds["inner"] == "function" and kinds["attn.in_proj:q"] == "attention" and kinds["fc"] == "module"
    model = copy.deepcopy(reference)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    results = {}
    for name, data, passes in (("one", whole, "lockstep"), ("lockstep", parts, "lockstep"),
                               ("per-site", parts, "per-site")):
        m = copy.deepcopy(model)
        calls.clear()
        results[name] = (m, repair_(m, goal, data, repair="repair", forward_fn=forward_fn, passes=passes))
        if name == "lockstep":
            assert len(calls) == 3 and all(c.startswith("prune-repair-lockstep") for c in calls)
    assert results["lockstep"][1].passes == 1 and not results["lockstep"][1].skipped
    assert_same_weights(results["lockstep"][0], results["per-site"][0], 1e-12)
    assert_same_weights(results["lockstep"][0], results["one"][0])
    after = collect_stats(results["lockstep"][0], whole, sites=goal.sites, forward_fn=forward_fn)
    for fqn in goal:  # padding excluded per batch (each thread its own mask)
        assert_close(after[fqn].std, goal[fqn].std, rtol=1e-9, atol=1e-10)


class Boom(RuntimeError):
    pass


def test_an_error_in_one_batch_stops_all_and_leaves_no_thread():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    batches = [torch.randn(6, 4, dtype=torch.float64) for _ in range(3)]
    goal = collect_stats(reference, batches)
    before = threading.active_count()

    def forward_fn(model, batch):
        h = model[1](model[0](batch))
        if batch is batches[1]:
            raise Boom("batch 2 fails")
        return model[4](model[3](model[2](h)))

    with pytest.raises(Boom, match="batch 2 fails"):
        finishes(lambda: repair_(copy.deepcopy(reference), goal, batches, forward_fn=forward_fn))
    with pytest.raises(Boom, match="batch 2 fails"):
        finishes(lambda: repair_(copy.deepcopy(reference), reference, batches, repair="reconstruct",
                                 forward_fn=lambda m, b: forward_fn(m, b) if m is not reference else m(b)))
    assert threading.active_count() == before


class Branchy(nn.Module):
    """Batches with a positive first feature take ``a`` then ``b``; the others ``b`` then ``a``,
    or (``skip``) ``b`` alone."""

    def __init__(self, skip):
        super().__init__()
        self.skip = skip
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        if bool(x[0, 0] > 0):
            return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))
        if self.skip:
            return self.head(torch.tanh(self.b(x)))
        return self.head(torch.tanh(self.a(torch.tanh(self.b(x)))))


def branch_batches():
    g = torch.Generator().manual_seed(0)
    first, second = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g,
                                                                                      dtype=torch.float64)
    first[0, 0], second[0, 0] = 1.0, -1.0
    return [first, second]


def test_data_dependent_order_is_a_clear_error_never_a_hang():
    torch.manual_seed(0)
    model = Branchy(skip=False).double()
    batches = branch_batches()
    goal = collect_stats(model, batches)
    with pytest.raises(ValueError, match="data-dependent paths.*passes='per-site'"):
        finishes(lambda: repair_(copy.deepcopy(model), goal, batches, repair="repair"))
    repair_(copy.deepcopy(model), goal, batches, repair="repair", passes="per-site")  # the fallback runs


def test_a_batch_that_skips_a_site_is_not_waited_for():
    torch.manual_seed(0)
    model = Branchy(skip=True).double()
    batches = branch_batches()
    goal = collect_stats(model, batches[0])
    with torch.no_grad():
        model.a.weight.mul_(2.0)
    lock, per_site = copy.deepcopy(model), copy.deepcopy(model)
    report = finishes(lambda: repair_(lock, goal, batches, repair="repair"))
    repair_(per_site, goal, batches, repair="repair", passes="per-site")
    assert report.passes == 1 and set(report.corrections) == {"a", "b"}
    assert_same_weights(lock, per_site)


def test_lockstep_primitives():
    with pytest.raises(RuntimeError, match="tasks of Lockstep.run"):
        Lockstep().meet(0, "x", lambda: None, lambda: None)
    order = []
    lock = Lockstep()

    def task(b):
        for k in range(3):
            lock.meet(k, f"p{k}", lambda: order.append((k, b)), lambda: order.append((k, "d")))
        return b

    assert lock.run([lambda b=b: task(b) for b in range(3)]) == [0, 1, 2]
    assert order == [(k, x) for k in range(3) for x in (0, 1, 2, "d")]
    slow = Lockstep(timeout_s=0.2)

    def sleeper(b):
        if b == 0:
            time.sleep(0.6)
        slow.meet(0, "p", lambda: None, lambda: None)

    with pytest.raises(RuntimeError, match="waited 0.2 s for its turn"):
        finishes(lambda: slow.run([lambda b=b: sleeper(b) for b in range(2)]))
    s = Stream(lambda emit: [emit(i) for i in range(5)])
    assert s.next() == (True, 0) and s.next() == (True, 1)
    s.close()  # stops the paused producer
    assert not any(t.name == "prune-repair-stream" for t in threading.enumerate())


def test_layerwise_lockstep_equals_per_layer_passes_with_torch_prune_masks():
    from torch.nn.utils import prune as torch_prune

    from prune_repair.engine.refit.layerwise import ReferenceOutputs, layerwise_

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.randn(21, 5, dtype=torch.float64)
    batches = list(x.split([7, 7, 7]))
    seen = {}
    for passes in ("lockstep", "per-site"):
        model = copy.deepcopy(reference)
        torch_prune.l1_unstructured(model[2], "weight", amount=0.5)
        layers = [(f, model.get_submodule(f)) for f in ("0", "2", "4")]
        grams = []

        def step(i, gram, layers=layers, grams=grams):
            grams.append((gram.G.clone(), gram.C.clone()))
            with torch.no_grad():  # a change the next layers must see (weight_orig under torch prune)
                getattr(layers[i][1], "weight_orig", layers[i][1].weight).mul_(0.5)

        targets = ReferenceOutputs(reference, batches, [f for f, _ in layers])
        made = layerwise_(model, batches, layers, step=step, target=targets, passes=passes)
        seen[passes] = grams, made, model(x)
    (g1, m1, y1), (g2, m2, y2) = seen["lockstep"], seen["per-site"]
    assert m1 == 3 and m2 == 3 * 3
    for (G1, C1), (G2, C2) in zip(g1, g2, strict=True):
        assert_close(G1, G2, rtol=1e-12, atol=1e-12)
        assert_close(C1, C2, rtol=1e-12, atol=1e-12)
    assert_close(y1, y2, rtol=1e-12, atol=1e-12)


def test_a_streamed_reference_lends_the_output_asked_for_and_copies_outputs_kept_ahead():
    """While the streamed reference waits at a module, that module's output is handed out as formed (no copy);
    an output formed on the way to a later one is copied, since the reference goes on past it."""
    from prune_repair.engine.run.reference import ReferenceOutputs

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)).double()
    formed = {}
    for name in ("0", "2"):
        reference.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: formed.__setitem__(name, o))
    x = torch.randn(4, 5, dtype=torch.float64)
    outputs = ReferenceOutputs(reference, [x], ["0", "2"])
    with torch.no_grad(), outputs.streaming():
        first = outputs(0, 0)
        assert first is formed["0"] and bool((first < 0).any())  # not yet through the in-place ReLU
        assert outputs(0, 1) is formed["2"]
    outputs = ReferenceOutputs(reference, [x], ["2", "0"])  # "2" asked for first: "0" is formed on the way
    with torch.no_grad(), outputs.streaming():
        assert outputs(0, 0) is formed["2"]
        kept = outputs(0, 1)
        assert kept is not formed["0"] and bool((kept < 0).any()) and not bool((formed["0"] < 0).any())
