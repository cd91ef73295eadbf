"""Reading and writing checkpoints and data safely (issue 5).

- ``.safetensors`` checkpoints are read and ``--out x.safetensors`` is written when the
  optional extra is installed; without it, one line names the extra to install;
- a checkpoint keeps its dtype: float16/bfloat16/float64 in, the same dtype out,
  repaired with float64 statistics; dead and constant channels never give NaN/Inf;
- NaN/Inf in data is reported with the sample; labels the model cannot output, data of
  another shape and an input that is also an output are refused before any work.
"""

from __future__ import annotations

import copy
import json
import struct
import sys

import numpy as np
import pytest
import torch

from prune_repair import collect_stats, repair_
from prune_repair.io.data import DataError, load_dataset
from prune_repair.io import checkpoint_dtype, load_state_dict, save_state_dict
from safety_helpers import ARCH_KWARGS, make_world, repair_args, run_cli, snapshot, tiny_model

try:
    import safetensors.torch as safetensors_torch
except ImportError:
    safetensors_torch = None
needs_safetensors = pytest.mark.skipif(safetensors_torch is None, reason="the optional extra safetensors is not installed")
EXTRA_HINT = "pip install 'prune-repair[safetensors]'"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("io-world"))


def one_error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def load_out(path):
    if str(path).endswith(".safetensors"):
        return safetensors_torch.load_file(str(path))
    return torch.load(path, weights_only=True)


# --- safetensors ---------------------------------------------------------------------------


@needs_safetensors
def test_safetensors_in_and_out_give_the_same_result_as_pt(world, tmp_path):
    pruned = tmp_path / "pruned.safetensors"
    safetensors_torch.save_file(torch.load(world.pruned, weights_only=True), str(pruned))
    assert run_cli(*repair_args(world, tmp_path / "a.pt")).exit_code == 0
    result = run_cli(*repair_args(world, tmp_path / "b.safetensors", pruned=pruned))
    assert result.exit_code == 0, result.output
    a, b = load_out(tmp_path / "a.pt"), load_out(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tiny_model().load_state_dict(b, strict=True)


@needs_safetensors
def test_the_format_is_recognized_by_content_whatever_the_suffix(world, tmp_path):
    state = torch.load(world.pruned, weights_only=True)
    safetensors_torch.save_file(state, str(tmp_path / "pruned.bin"))
    (tmp_path / "torch.safetensors").write_bytes(world.pruned.read_bytes())
    for name in ("pruned.bin", "torch.safetensors"):
        loaded = load_state_dict(tmp_path / name)
        assert all(torch.equal(loaded[k], state[k]) for k in state), name


@needs_safetensors
def test_tied_weights_are_written_to_safetensors(tmp_path):
    shared = torch.arange(4.0)
    save_state_dict({"encoder.weight": shared, "decoder.weight": shared}, tmp_path / "tied.safetensors")
    back = safetensors_torch.load_file(str(tmp_path / "tied.safetensors"))
    assert torch.equal(back["encoder.weight"], shared) and torch.equal(back["decoder.weight"], shared)


def handmade_safetensors() -> bytes:
    """A valid safetensors file, written without the package."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    return struct.pack("<Q", len(header)) + header + struct.pack("<f", 1.0)


@pytest.mark.parametrize("where", ["--out", "checkpoint"])
def test_without_the_extra_one_line_says_how_to_install_it(world, tmp_path, monkeypatch, where):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors now raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    if where == "--out":
        args = repair_args(world, tmp_path / "out.safetensors")
    else:
        (tmp_path / "pruned.safetensors").write_bytes(handmade_safetensors())
        args = repair_args(world, tmp_path / "out.pt", pruned=tmp_path / "pruned.safetensors")
    before = snapshot(tmp_path)
    line = one_error_line(run_cli(*args))
    assert "needs the optional safetensors package" in line and EXTRA_HINT in line
    assert snapshot(tmp_path) == before


# --- dtypes ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, rtol", [(torch.float16, 2e-2), (torch.bfloat16, 5e-2), (torch.float64, 1e-5)],
                         ids=["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("which", ["both", "pruned-only"])
def test_the_output_keeps_the_dtype_of_the_checkpoint(world, tmp_path, dtype, rtol, which):
    for name, source in (("pruned", world.pruned), ("reference", world.reference)):
        state = torch.load(source, weights_only=True)
        if name == "pruned" or which == "both":
            state = {k: v.to(dtype) for k, v in state.items()}
        torch.save(state, tmp_path / f"{name}.pt")
    args = repair_args(world, tmp_path / "out.pt", pruned=tmp_path / "pruned.pt")
    args[args.index("--reference") + 1] = tmp_path / "reference.pt"
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert run_cli(*repair_args(world, tmp_path / "float32.pt")).exit_code == 0
    out, out32 = torch.load(tmp_path / "out.pt", weights_only=True), torch.load(tmp_path / "float32.pt", weights_only=True)
    pruned = torch.load(tmp_path / "pruned.pt", weights_only=True)
    for key, value in out.items():
        assert value.dtype == dtype, key
        assert torch.isfinite(value).all()
        assert torch.equal(value == 0, pruned[key] == 0), f"{key}: sparsity changed"
        torch.testing.assert_close(value.double(), out32[key].double(), rtol=rtol, atol=rtol)
    assert not all(torch.equal(out[k], pruned[k]) for k in out), "nothing was repaired"


def test_half_precision_models_are_repaired_with_float64_statistics():
    """Repairing in float16 matches repairing in float64 up to float16 rounding of the weights."""
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    dense = tiny_model(0).double()
    goal = collect_stats(dense, x.double())
    assert all(s.mean.dtype == torch.float64 for s in goal.values())
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        pruned.features.fc1.weight.mul_(torch.rand(8, 4, generator=torch.Generator().manual_seed(1)) > 0.5)
    half, double = copy.deepcopy(pruned).half(), copy.deepcopy(pruned)
    assert all(s.m2.dtype == torch.float64 for s in collect_stats(half, x.half()).values())
    repair_(half, goal, x.half())
    repair_(double, goal, x.double())
    for key, value in half.state_dict().items():
        assert value.dtype == torch.float16
        torch.testing.assert_close(value.double(), double.state_dict()[key], rtol=4e-3, atol=4e-3)


def test_mixed_precision_checkpoints_compute_in_the_promoted_dtype():
    model = tiny_model()
    state = {k: v.to(torch.float16 if "fc1" in k else torch.bfloat16) for k, v in model.state_dict().items()}
    assert checkpoint_dtype(model, state) == torch.float32
    assert checkpoint_dtype(model, {k: v.half() for k, v in state.items()}) == torch.float16


def test_dead_and_constant_channels_never_produce_nan_or_inf(world, tmp_path):
    """A channel pruned away entirely (constant: only its bias is left, or all zero) is left as it was."""
    state = torch.load(world.pruned, weights_only=True)
    state["features.fc1.weight"][:2] = 0
    state["features.fc1.bias"][1] = 0
    torch.save(state, tmp_path / "dead.pt")
    result = run_cli(*repair_args(world, tmp_path / "out.pt", pruned=tmp_path / "dead.pt"))
    assert result.exit_code == 0, result.output
    assert "dead channel(s) (zero or non-finite spread) left as they were" in result.output
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert torch.equal(out["features.fc1.weight"][:2], state["features.fc1.weight"][:2])
    assert torch.equal(out["features.fc1.bias"][:2], state["features.fc1.bias"][:2])


# --- bad numbers and bad data -----------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e300], ids=["nan", "inf", "beyond-float32"])
def test_nan_or_inf_in_data_is_reported_with_the_sample(world, tmp_path, value):
    x = torch.randn(40, 4, dtype=torch.float64)
    x[7, 2] = value
    torch.save({"x": x, "y": torch.zeros(40, dtype=torch.long)}, tmp_path / "bad.pt")
    with pytest.raises(DataError, match="NaN or infinite values .* in 1 sample\\(s\\), the first is sample 7"):
        load_dataset(tmp_path / "bad.pt")
    line = one_error_line(run_cli(*repair_args(world, tmp_path / "out.pt", data=tmp_path / "bad.pt")))
    assert "the first is sample 7" in line and not (tmp_path / "out.pt").exists()


def test_labels_the_model_cannot_output_are_refused(world, tmp_path):
    torch.save({"x": torch.randn(40, 4), "y": torch.arange(40) % 6}, tmp_path / "six.pt")
    line = one_error_line(run_cli(*repair_args(world, tmp_path / "out.pt"), "--eval-data", tmp_path / "six.pt"))
    assert line == "error: --eval-data has label 5 but the model outputs 3 classes: check the data and --arch-kwargs (e.g. num_classes)"


def test_evaluation_data_of_another_shape_is_refused(world, tmp_path):
    torch.save({"x": torch.randn(40, 5), "y": torch.arange(40) % 3}, tmp_path / "five.pt")
    line = one_error_line(run_cli(*repair_args(world, tmp_path / "out.pt"), "--eval-data", tmp_path / "five.pt"))
    assert "--eval-data samples have shape [5] but --data samples have [4]" in line


@pytest.mark.parametrize("option", ["--out", "--report"])
def test_data_that_is_also_an_output_is_refused_even_with_force(world, tmp_path, option):
    data = tmp_path / "data.pt"
    data.write_bytes(world.data.read_bytes())
    args = repair_args(world, tmp_path / "out.pt", data=data)
    if option == "--out":
        args[args.index("--out") + 1] = data
    else:
        args += ["--report", data]
    line = one_error_line(run_cli(*args, "--force"))
    assert line == f"error: --data {data} is also the {option} of this command: write the result to another file"
    assert data.read_bytes() == world.data.read_bytes()


def test_text_from_files_is_printed_literally(world, tmp_path):
    """Names taken from a file (here .npz keys) are not read as rich markup."""
    np.savez(tmp_path / "keys.npz", **{"[/]": np.zeros(3), "[bold]z": np.zeros(3)})
    line = one_error_line(run_cli(*repair_args(world, tmp_path / "out.pt", data=tmp_path / "keys.npz")))
    assert "found ['[/]', '[bold]z']" in line


def test_arch_kwargs_the_constructor_rejects_are_one_line(world, tmp_path):
    args = repair_args(world, tmp_path / "out.pt")
    args[args.index("--arch-kwargs") + 1] = json.dumps({**ARCH_KWARGS, "widths": [-3]})
    assert "cannot build --arch prune_repair.zoo.models:MLP" in one_error_line(run_cli(*args))


def test_usage_errors_print_values_literally(world, tmp_path):
    line = one_error_line(run_cli(*repair_args(world, tmp_path / "out.pt"), "--repair", "[/]"))
    assert "'[/]' is not one of" in line and line.endswith("(see --help)")
