"""CutMix through python -m tasks.classify: a tiny run trains and is reproducible, on CPU."""
import torch

from tasks import classify
from tasks.engine.checkpoint import load_checkpoint
from tests.fakes import write_fake_fashion_mnist


def test_cutmix_trains_and_is_reproducible(tmp_path):
    fm = write_fake_fashion_mnist(tmp_path / "fm", n_train=64, n_test=32)
    args = ["--device", "cpu", "--quiet", "--batch-size", "32", "--data-dir", str(fm), "--set", "model.depth=18",
            "--set", "data.cutmix_alpha=1.0", "--epochs", "1"]
    a = classify.main(args + ["--output", str(tmp_path / "a")])
    b = classify.main(args + ["--output", str(tmp_path / "b")])
    assert 0 <= a["acc"] <= 1 and a["acc"] == b["acc"]  # the mixing is a function of (seed, epoch)
    ka, kb = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert all(torch.equal(ka["model"][k], kb["model"][k]) for k in ka["model"])
