"""Block-by-block exact repair of a big model: peak memory and time, with and without (issue 11).

torchvision resnet152 (random init: nothing can be downloaded here) at 224x224, pruned to 50%
by global magnitude, repaired (``auto``: BatchNorm statistics reset, exact) toward the dense
model's statistics on --calib MNIST digits upsampled to 3x224x224, given as batches of
--batch. Each configuration runs in a fresh process that loads the pruned model and the goal,
then measures one call: the rise of peak memory over what was resident before the call (RSS
on the CPU, allocated memory on CUDA) and its time, as a ratio to one plain forward over the
same batches measured in the same way:

- ``lockstep``: the default exact repair, every batch in ONE pass, in step at every site
  (the batches' activations at the current site are all alive at once);
- ``blockwise``: ``passes="blockwise"``, one residual block at a time over all batches, the
  block inputs kept where they are; ``blockwise + host`` (CUDA only) keeps them in host
  memory; ``blockwise + files`` in files under a temporary folder.

The blockwise weights are checked against lockstep's (max abs difference of all tensors).

Usage: python benchmarks/bench_blockwise.py [--model resnet152] [--calib 256] [--batch 32] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import replace_section  # noqa: E402

import prune_repair as pr  # noqa: E402
from prune_repair.io.data import calibration_batch, load_dataset  # noqa: E402
from prune_repair.prune import prune_  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
CONFIGS = {"forward": {}, "lockstep": {}, "blockwise": {"passes": "blockwise"},
           "blockwise + host": {"passes": "blockwise", "offload": "cpu"},
           "blockwise + files": {"passes": "blockwise", "offload": "FOLDER"}}


def prepare(folder: Path, model_name: str, calib: int, batch: int) -> None:
    """The pruned model, the dense model's goal statistics and the calibration batches, saved."""
    torch.manual_seed(0)
    x, y = load_dataset("mnist:train")
    digits, _ = calibration_batch(x, y, calib, seed=0)
    data = F.interpolate(digits, size=224, mode="bilinear").expand(-1, 3, -1, -1).contiguous()
    data = (data - data.mean()) / data.std()
    model = getattr(torchvision.models, model_name)().eval()
    batches = list(data.split(batch))
    pr.collect_stats(model, batches).save(folder / "goal.pt")
    prune_(model, 0.5, method="global-magnitude")
    torch.save(model.state_dict(), folder / "pruned.pt")
    torch.save(batches, folder / "batches.pt")


def _rss_kib() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmHWM", "VmRSS"))


def child(config: str, folder: Path, model_name: str, device: str, threads: int) -> None:
    """In a fresh process: print the peak extra bytes and seconds of one configuration."""
    torch.set_num_threads(threads)
    model = getattr(torchvision.models, model_name)()
    model.load_state_dict(torch.load(folder / "pruned.pt", weights_only=True))
    model = model.to(device).eval()
    batches = [b.to(device) for b in torch.load(folder / "batches.pt", weights_only=True)]
    goal = pr.ActivationStats.load(folder / "goal.pt")
    kwargs = dict(CONFIGS[config])
    if kwargs.get("offload") == "FOLDER":
        kwargs["offload"] = tempfile.mkdtemp(dir=folder)

    def call() -> None:
        if config == "forward":
            with torch.no_grad():
                for b in batches:
                    model(b)
        else:
            pr.repair_(model, goal, batches, **kwargs)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM)
        base = _rss_kib()[1]
    start = time.perf_counter()
    call()
    if device == "cuda":
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        extra = 1024 * (_rss_kib()[0] - base)
    seconds = time.perf_counter() - start
    if config != "forward":
        torch.save(model.state_dict(), folder / f"{config}.pt")
    print(json.dumps({"bytes": extra, "seconds": seconds}))


def measure(config: str, folder: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--child", config, str(folder), "--model", args.model, "--device", args.device,
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{config} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {config}: {result['seconds']:.1f} s, +{result['bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet152")
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="update the blockwise section of RESULTS.md")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], Path(args.child[1]), args.model, args.device, args.threads)
    configs = [c for c in CONFIGS if c != "blockwise + host" or args.device == "cuda"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare(folder, args.model, args.calib, args.batch)
        results = {c: measure(c, folder, args) for c in configs}
        lockstep = torch.load(folder / "lockstep.pt", weights_only=True)
        for c in configs[2:]:
            got = torch.load(folder / f"{c}.pt", weights_only=True)
            results[c]["diff"] = max((got[k].double() - lockstep[k].double()).abs().max().item()
                                     for k in got if got[k].is_floating_point())
    fwd = results["forward"]
    lines = [f"| {c} | {r['seconds']:.1f} | {r['seconds'] / fwd['seconds']:.2f}x | {r['bytes'] / 2**30:.2f} | "
             f"{r['bytes'] / fwd['bytes']:.2f}x | {format(r['diff'], '.1e') if 'diff' in r else '-'} |"
             for c, r in results.items()]
    table = ["| configuration | seconds | x forward | peak memory rise GiB | x forward's | max abs diff vs lockstep |",
             "|---|---:|---:|---:|---:|---:|", *lines]
    print("\n".join(table))
    if args.write:
        replace_section(RESULTS, "\n".join([
            "<!-- blockwise:start -->",
            "### Block-by-block exact repair of a big model (issue 11)", "",
            f"torchvision {args.model} (random init) at 224x224, pruned to 50% by global magnitude, exact `repair_` "
            f"(`auto`: BatchNorm statistics reset) on {args.calib} MNIST digits upsampled to 3x224x224, given as "
            f"batches of {args.batch}; {args.device}, {args.threads} threads, one fresh process per row. Peak memory "
            "rise: the highest resident memory during the call minus what was resident before it (the model, "
            "the batches, the goal). `forward` is one plain forward over the same batches.", "",
            f"Reproduce: `python benchmarks/bench_blockwise.py --model {args.model} --calib {args.calib} "
            f"--batch {args.batch} --write`", "", *table,
            "<!-- blockwise:end -->"]))


if __name__ == "__main__":
    main()
