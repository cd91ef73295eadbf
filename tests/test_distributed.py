"""Exact statistics across processes (issue 11): 2 gloo processes on the CPU vs one process.

The multi-process tests start this file as a worker script in 2 processes (``--worker``);
each runs every scenario on its shard of the data and saves what it got; the tests compare
with the same computation done here in one process, in float64.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from prune_repair.engine import collect_stats, find_sites, reconstruct_, repair_
from prune_repair.engine.run import distributed
from prune_repair.engine.stats.activation import ChannelStats, merge_moments
from prune_repair.engine.stats.goal import RecordStats
from prune_repair.merge import activation_matching, find_groups, site_moments
from prune_repair.prune.fisher import fisher_scores
from prune_repair.prune.targets import find_targets
from prune_repair.prune.woodfisher import inverse_fisher
from prune_repair.zoo.models import MLP, PlainCNN

WORLD = 2
TIMEOUT_S = 90
TOL = {"rtol": 1e-9, "atol": 1e-12}  # float64: only the reduction order differs
CLI_TOL = {"rtol": 1e-5, "atol": 1e-6}  # float32 checkpoints through the CLI


# --- the scenarios, run by the workers (their shard) and by the test (all data) ---------


def _damage_(model: nn.Module, seed: int = 2) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_((torch.rand(m.weight.shape, generator=g) >= 0.6).to(m.weight.dtype) * 1.7)
    return model


def _setup():
    torch.manual_seed(0)
    cnn = PlainCNN(channels=(4, 8), batch_norm=True).double().eval()
    for m in cnn.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    a, b = MLP(widths=(16, 16)).double(), MLP(widths=(16, 16)).double()
    x = torch.randn(24, 1, 28, 28, dtype=torch.float64) * 2 + 0.5
    y = torch.randint(0, 10, (24,))
    return cnn, a, b, x, y


def scenarios(part: slice) -> dict:
    """Everything the distributed path touches, on samples ``x[part]``."""
    cnn, a, b, x, y = _setup()
    xs, ys = x[part], y[part]
    out: dict = {}
    ref = collect_stats(cnn, xs)
    out["stats"] = {k: v.to_dict() for k, v in ref.items()}
    for passes in ("per-site", "blockwise"):  # the observe-only steps, pooled before each is decided
        got = collect_stats(cnn, list(xs.chunk(2)), passes=passes)
        out[f"stats-{passes}"] = {k: v.to_dict() for k, v in got.items()}
    with RecordStats(cnn, xs, window=None, record="eval") as rec, torch.no_grad():
        for batch in xs.chunk(2):
            cnn(batch)
    out["recorded"] = {k: v.to_dict() for k, v in rec.stats().items()}
    for name, kwargs in {"exact": {}, "all-at-once": {"variant": "all-at-once"}, "reset": {"repair": "reset"},
                         "exact-2-batches": {}, "blockwise": {"passes": "blockwise"}}.items():
        model = _damage_(copy.deepcopy(cnn))
        data = list(xs.chunk(2)) if name in ("exact-2-batches", "blockwise") else xs
        repair_(model, ref, data, repair=kwargs.get("repair", "repair"), variant=kwargs.get("variant", "exact"),
                passes=kwargs.get("passes", "lockstep"))
        out[name] = model.state_dict()
    if distributed.is_distributed():  # the same through a DistributedDataParallel wrapper
        model = _damage_(copy.deepcopy(cnn))
        ddp = nn.parallel.DistributedDataParallel(model)
        repair_(ddp, collect_stats(nn.parallel.DistributedDataParallel(cnn), xs), xs, repair="repair")
        out["ddp"] = model.state_dict()
        out["checksums"] = distributed.all_gather_objects(distributed.weights_checksum(model))
    model = _damage_(copy.deepcopy(cnn))  # reconstruction: Gram statistics summed over ranks
    reconstruct_(model, cnn, xs)
    out["reconstruct"] = model.state_dict()
    model = _damage_(copy.deepcopy(cnn))
    reconstruct_(model, cnn, list(xs.chunk(2)), passes="blockwise")
    out["reconstruct-blockwise"] = model.state_dict()
    groups = find_groups(a, x[:2])
    out["perms"] = activation_matching(a, b, xs, groups).perms
    m = site_moments([a, b], xs, find_sites(a, x[:2]))
    out["moments"] = {"count": m.count, "mean": m.mean, "cov": m.cov}
    m = site_moments([a, b], list(xs.chunk(2)), find_sites(a, x[:2]), passes="per-site")  # on the pipeline
    out["moments-per-site"] = {"count": m.count, "mean": m.mean, "cov": m.cov}
    targets = find_targets(a)
    out["fisher"] = fisher_scores(a, targets, (xs, ys), num_grads=len(x))  # each sample once
    inv = inverse_fisher(a, targets, (xs, ys), num_grads=None, block_size=8, rank=4, dtype=torch.float64, damp=1e-3)
    out["woodfisher"] = inv.blocks
    return out


def _worker(out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        result = scenarios(distributed.shard(len(_setup()[3])))
        torch.save(result, Path(out_dir) / f"rank{distributed.rank()}.pt")
    finally:
        torch.distributed.destroy_process_group()


# --- plumbing ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_bounded(cmds: list[list[str]], envs: list[dict], timeout: float = TIMEOUT_S) -> list[subprocess.CompletedProcess]:
    """Run the processes side by side; kill them all (and fail) if they outlive ``timeout``."""
    procs = [subprocess.Popen(c, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c, e in zip(cmds, envs)]
    results = []
    try:
        for c, p in zip(cmds, procs):
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"distributed run did not finish within {timeout} s (hang?)")
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    return results


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in extra.items()}}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    port = free_port()
    envs = [_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=WORLD, RANK=r, LOCAL_RANK=r)
            for r in range(WORLD)]
    run_bounded([[sys.executable, __file__, "--worker", str(out)]] * WORLD, envs)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    return scenarios(slice(None))


def assert_close(got, want, **tol):
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for k in want:
            assert_close(got[k], want[k], **tol)
    elif isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, **(tol or TOL))
    else:
        assert got == want


# --- without processes: the pooled-moment math, and the one-process no-ops ----------------


def test_pooled_moments_equal_the_direct_ones():
    torch.manual_seed(0)
    y = torch.randn(37, 5, dtype=torch.float64) * 3 + 1e4  # a large offset: no cancellation allowed
    parts = [ChannelStats.of(p, -1) for p in (y[:10], y[10:])]
    n, mean, m2 = functools.reduce(merge_moments, [(s.count, s.mean, s.m2) for s in parts])
    var, direct = torch.var_mean(y, dim=0, correction=0)
    assert n == 37
    torch.testing.assert_close(mean, direct, rtol=1e-14, atol=0)
    torch.testing.assert_close(m2 / n, var, rtol=1e-10, atol=0)
    naive = sum(s.var for s in parts) / 2  # an average of per-rank variances is not the pooled one
    assert not torch.allclose(naive, var, rtol=1e-3)


def test_pooled_co_moments_equal_the_direct_ones():
    torch.manual_seed(1)
    ya, yb = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64) + 2
    parts = []
    for s in (slice(0, 7), slice(7, 20)):
        a, b = ya[s] - ya[s].mean(0), yb[s] - yb[s].mean(0)
        parts.append((a.shape[0], torch.stack([ya[s].mean(0), yb[s].mean(0)]), a.T @ b))
    _, _, m2 = merge_moments(*parts, comoment=lambda d: torch.outer(d[0], d[1]))
    direct = (ya - ya.mean(0)).T @ (yb - yb.mean(0))
    torch.testing.assert_close(m2, direct, rtol=1e-12, atol=1e-12)


def test_one_process_is_a_no_op():
    s = ChannelStats.of(torch.randn(8, 3), -1)
    assert distributed.all_reduce_channel_stats({"a": s}, {"a": 3})["a"] is s
    assert distributed.pool_moments([(1, s.mean, s.m2)])[0][1] is s.mean
    assert distributed.world_size() == 1 and distributed.is_main_process()
    assert [distributed.shard(5, r, 2) for r in range(2)] == [slice(0, 2), slice(2, 5)]


def test_fsdp_is_refused_with_what_to_do():
    FullyShardedDataParallel = type("FullyShardedDataParallel", (nn.Module,), {})
    model = nn.Sequential(nn.Linear(2, 2), FullyShardedDataParallel())
    with pytest.raises(ValueError, match="FSDP-sharded models are not supported yet: gather a full state dict"):
        collect_stats(model, torch.randn(4, 2))


# --- two gloo processes vs one process ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("key", ["stats", "stats-per-site", "stats-blockwise", "recorded", "exact", "all-at-once",
                                 "reset", "exact-2-batches", "blockwise", "moments", "moments-per-site", "fisher",
                                 "woodfisher", "reconstruct", "reconstruct-blockwise"])
def test_two_processes_match_one(ranks, single, key):
    for r in ranks:
        assert_close(r[key], single[key])
    assert_close(ranks[1][key], ranks[0][key], rtol=0, atol=0)  # every rank holds the same result


@pytest.mark.slow
def test_blockwise_reconstruction_on_two_ranks_equals_one_process_on_the_whole_set(ranks, single):
    for r in ranks:  # two batches per rank, one block at a time, Grams summed over ranks
        assert_close(r["reconstruct-blockwise"], single["reconstruct"])


@pytest.mark.slow
def test_activation_matching_finds_the_same_permutations(ranks, single):
    for r in ranks:
        assert r["perms"].keys() == single["perms"].keys()
        assert all(torch.equal(r["perms"][k], single["perms"][k]) for k in single["perms"])


@pytest.mark.slow
def test_ddp_wrapped_model_is_repaired_like_the_plain_one(ranks, single):
    for r in ranks:
        assert_close(r["ddp"], single["exact"])
        assert len(set(r["checksums"])) == 1  # identical weights on every rank


@pytest.mark.slow
def test_torchrun_cli_matches_one_process(tmp_path):
    from prune_repair import zoo

    model = _damage_(zoo.load("mnist-cnn-bn"))
    pruned = tmp_path / "pruned.pt"
    torch.save(model.state_dict(), pruned)
    torch.manual_seed(0)
    evalset = tmp_path / "eval.pt"
    torch.save({"x": torch.rand(128, 1, 28, 28), "y": torch.randint(0, 10, (128,))}, evalset)
    outs = {}
    for world in (1, WORLD):
        out, report = tmp_path / f"out{world}.pt", tmp_path / f"report{world}.json"
        args = ["-m", "prune_repair", "repair", str(pruned), "--reference", "zoo:mnist-cnn-bn", "--data", "mnist:test",
                "--eval-data", str(evalset), "--calib-size", "64", "--repair", "repair", "--device", "cpu",
                "--out", str(out), "--report", str(report)]
        launch = [sys.executable] if world == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-addr",
            "127.0.0.1", "--master-port", str(free_port())]
        result = run_bounded([launch + args], [_env()])[0]
        assert json.loads(report.read_text())["world_size"] == world
        outs[world] = torch.load(out, weights_only=True)
        if world > 1:
            assert result.stdout.count("after repair") + result.stderr.count("after repair") == 1  # rank 0 prints
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no stray temporary files
    assert_close(outs[WORLD], outs[1], **CLI_TOL)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2])
