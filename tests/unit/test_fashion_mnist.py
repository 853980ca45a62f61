"""IDX reading and the Fashion-MNIST search order."""
import gzip
from pathlib import Path

import numpy as np
import pytest

from tasks.data import fashion_mnist as fm
from tests.fakes import write_fake_fashion_mnist, write_idx


def test_read_idx_round_trip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.idx", "a.idx.gz"):
        write_idx(tmp_path / name, a)
        np.testing.assert_array_equal(fm.read_idx(tmp_path / name, expect_ndim=3), a)


@pytest.mark.parametrize("corrupt, match", [
    (lambda d: d[:-5], "truncated"),                    # fewer bytes than the header says
    (lambda d: b"\x00\x00\x0d\x03" + d[4:], "magic"),   # float IDX, not unsigned bytes
    (lambda d: b"", "magic"),
])
def test_corrupt_idx_names_the_file(tmp_path, corrupt, match):
    good = tmp_path / "good.idx"
    write_idx(good, np.zeros((3, 28, 28), np.uint8))
    bad = tmp_path / "bad-images.idx"
    bad.write_bytes(corrupt(good.read_bytes()))
    with pytest.raises(fm.IDXError, match=match) as err:
        fm.read_idx(bad)
    assert "bad-images.idx" in str(err.value)


def test_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00\x00\x00\x05" + b"12345")[:-8])
    with pytest.raises(fm.IDXError, match="x.gz"):
        fm.read_idx(path)


def test_wrong_dimensions_rejected(tmp_path):
    write_idx(tmp_path / "labels.idx", np.zeros((3, 2), np.uint8))
    with pytest.raises(fm.IDXError, match="dimensions"):
        fm.read_idx(tmp_path / "labels.idx", expect_ndim=1)


def test_load_and_search_order(tmp_path, monkeypatch):
    folder = write_fake_fashion_mnist(tmp_path / "fm", n_train=20, n_test=10)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(folder))
    x, y = fm.load_fashion_mnist("train", limit=7)
    assert x.shape == (7, 28, 28) and x.dtype.is_floating_point is False and y.shape == (7,)
    assert fm.find_data_dir() == folder
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fm.find_data_dir(tmp_path / "empty")


def test_nothing_found_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "none"))
    monkeypatch.setattr(fm, "SYSTEM_DIR", str(tmp_path / "none2"))
    monkeypatch.setattr(fm, "CACHE_DIR", tmp_path / "none3")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fm.find_data_dir()


@pytest.mark.skipif(not Path(fm.SYSTEM_DIR, "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed")
def test_real_files():
    x, y = fm.load_fashion_mnist("test", fm.SYSTEM_DIR)
    assert x.shape == (10000, 28, 28) and sorted(set(y.tolist())) == list(range(10))
    assert abs(x.float().mean().item() / 255 - 0.2868) < 0.01
