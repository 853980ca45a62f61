"""train.patience (early stopping) and train.accumulate (gradient accumulation) through
python -m tasks.classify's main, on a tiny synthetic Fashion-MNIST, on CPU."""
import json

import pytest
import yaml

from tasks import classify
from tasks.engine.checkpoint import load_checkpoint
from tasks.engine.config import ConfigError
from tests.fakes import write_fake_fashion_mnist

# 192 images at batch 32: 6 batches, in groups of 2: 3 optimizer steps per epoch. Learning rate 0
# and the whole trunk frozen (its BatchNorm statistics too): the head cannot move, so the
# validation accuracy stays where epoch 1 put it and patience 1 ends the run after epoch 2.
STALLED = ["--device", "cpu", "--batch-size", "32", "--limit-train", "192", "--limit-val", "96", "--epochs", "5",
           "--set", "model.width=8", "--set", "model.freeze_at=5", "--set", "optim.lr=0",
           "--set", "optim.schedule=constant", "--set", "optim.warmup_epochs=0",
           "--set", "train.patience=1", "--set", "train.accumulate=2"]


@pytest.fixture(scope="module")
def fm_dir(tmp_path_factory):
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=192, n_test=96)


def test_patience_ends_a_stalled_run_and_its_resume_trains_nothing(fm_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = STALLED + ["--data-dir", str(fm_dir), "--output", str(out)]
    result = classify.main(args)
    printed = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and records[1]["val_acc"] == records[0]["val_acc"]
    assert result["stopped_early"] == 2 and result["acc"] == records[1]["val_acc"]
    stop = [line for line in printed if line.startswith("early stop at epoch 2: ")]
    assert stop == [f"early stop at epoch 2: val_acc has not improved on {records[0]['val_acc']:.4g} (epoch 1) "
                    "for 1 epoch (train.patience=1)"]
    assert any(line.startswith("done: ") for line in printed[printed.index(stop[0]):])  # then the usual end
    for name in ("config.yaml", "last.pt", "best.pt", "curves.png", "confusion.png"):  # as a finished run has
        assert (out / name).is_file(), name
    last, best = load_checkpoint(out / "last.pt"), load_checkpoint(out / "best.pt")
    assert (last["epoch"], last["stopped_early"], last["best_epoch"], best["epoch"]) == (2, 2, 1, 1)
    # train.accumulate 2: 3 optimizer steps per epoch, 6 schedule steps in the 2 epochs
    assert last["steps_per_epoch"] == 3 and last["scheduler"]["last_epoch"] == 6
    written = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert (written["accumulate"], written["patience"]) == (2, 1)

    again = classify.main(args + ["--resume"])  # a resubmitted job: nothing to train, the report
    printed = capsys.readouterr().out
    assert "the run stopped early after epoch 2 (" in printed and "nothing to train" in printed
    assert again["stopped_early"] == 2 and again["epoch"] == 2 and again["acc"] == result["acc"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("key, value, match", [
    ("train.patience", "0", r"train.patience: 0 is out of range, expected a value >= 1"),
    ("train.patience", "-3", r"train.patience: -3 is out of range, expected a value >= 1"),
    ("train.accumulate", "0", r"train.accumulate: 0 is out of range, expected a value >= 1"),
])
def test_values_out_of_range_are_refused_before_anything_runs(fm_dir, tmp_path, key, value, match):
    with pytest.raises(ConfigError, match=match) as e:
        classify.main(["--device", "cpu", "--data-dir", str(fm_dir), "--output", str(tmp_path / "r"),
                       "--set", f"{key}={value}"])
    assert "\n" not in str(e.value) and not (tmp_path / "r").exists()
