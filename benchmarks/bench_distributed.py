"""Distributed benchmark: collect_stats + exact repair_ with 1 and 2 CPU processes (gloo).

The same total calibration set (``--calib`` MNIST test images, seed 0) is measured by one
process, then split across 2 processes (each takes its contiguous shard). Each timed run
is ``collect_stats(reference) + repair_(pruned)`` (exact one-pass variant), between
barriers; the time of a run is the slowest rank's. Median of ``--repeats`` runs after one
warm-up. On 2 shared CPU cores this does not speed up: the ratio shows the cost of the
collectives (2 all-reduces per site in collect_stats, 2 per site in repair_).

Run from the repository root (the package importable)::

    python benchmarks/bench_distributed.py                       # markdown table on stdout
    python benchmarks/bench_distributed.py --models mnist-cnn-bn --calib 512 --repeats 7
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from prune_repair import zoo
from prune_repair.engine import collect_stats, repair_
from prune_repair.engine.run import distributed
from prune_repair.io.data import calibration_batch, load_dataset


def _prune_(model: nn.Module, sparsity: float = 0.8) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                k = int(sparsity * m.weight.numel())
                threshold = m.weight.abs().flatten().kthvalue(k).values
                m.weight.mul_(m.weight.abs() > threshold)
    return model


def measure(name: str, calib: int, repeats: int) -> dict:
    """Times (seconds) of collect + repair on this rank's shard; the slowest rank's per run."""
    x, y = load_dataset("mnist:test")
    cx, _ = calibration_batch(x, y, calib, seed=0)
    cx = cx[distributed.shard(len(cx))]
    reference = zoo.load(name)
    pruned = _prune_(copy.deepcopy(reference))
    times = []
    for i in range(repeats + 1):
        model = copy.deepcopy(pruned)
        if distributed.is_distributed():
            torch.distributed.barrier()
        start = time.perf_counter()
        repair_(model, collect_stats(reference, cx), cx, repair="repair")
        elapsed = distributed.all_reduce_max(time.perf_counter() - start)
        if i:  # the first run warms up
            times.append(elapsed)
    return {"model": name, "world_size": distributed.world_size(), "median_s": statistics.median(times),
            "samples_per_rank": len(cx)}


def _worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")
    try:
        rows = [measure(m, args.calib, args.repeats) for m in args.models]
        if distributed.is_main_process():
            print(json.dumps(rows))
    finally:
        if distributed.is_distributed():
            torch.distributed.destroy_process_group()


def _launch(world: int, args: argparse.Namespace, threads: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
               "RANK": str(r), "LOCAL_RANK": str(r), "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, __file__, "--worker", "--calib", str(args.calib), "--repeats", str(args.repeats),
               "--models", *args.models]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker of the {world}-process run failed")
    return json.loads(outs[0].strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mnist-cnn-bn", "mnist-mlp"])
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    cores = os.cpu_count() or 1
    threads = max(1, cores // 2)
    one_all = _launch(1, args, cores)  # one process with every core
    one = _launch(1, args, threads)  # one process with the threads each of two gets
    two = _launch(2, args, threads)
    print(f"collect_stats + exact repair_ on {args.calib} MNIST samples (same set split over the processes), "
          f"{cores} CPU cores, gloo; median of {args.repeats}\n")
    print(f"| model | 1 proc x {cores} threads (s) | 1 proc x {threads} thread(s) (s) | 2 procs x {threads} (s) "
          f"| ratio 2 procs / 1 proc x {threads} |")
    print("|---|---:|---:|---:|---:|")
    for a, b, c in zip(one_all, one, two):
        print(f"| {a['model']} | {a['median_s']:.4f} | {b['median_s']:.4f} | {c['median_s']:.4f} "
              f"| {c['median_s'] / b['median_s']:.2f}x |")


if __name__ == "__main__":
    main()
