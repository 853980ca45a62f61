"""The training guard through the commands: a diverging or collapsed run exits 3 with one line and no bad checkpoint."""
import pytest

from tasks import classify
from tests.fakes import checkpoints_finite, write_fake_fashion_mnist


def test_cli_diverging_run_exits_3_with_one_line(tmp_path, capsys):
    """SGD at lr 1e4 on a small set: stopped by the guard (not a chance-level best.pt and exit 0)."""
    from tasks.engine.runner import run_cli

    fm = write_fake_fashion_mnist(tmp_path / "fm", n_train=256, n_test=64)
    out = tmp_path / "run"
    argv = ["--device", "cpu", "--quiet", "--data-dir", str(fm), "--epochs", "2", "--batch-size", "16",
            "--output", str(out), "--set", "optim.lr=1e4", "--set", "train.log_every=4"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: classify.main(argv))
    assert exit_info.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("training stopped: ")
    assert "optim.lr (now 1e+04)" in err[0]
    checkpoints_finite(out)


def test_detection_with_dead_box_regression_stops(tmp_path, monkeypatch, capsys):
    """The detection collapse the guard exists for: every predicted box degenerate (l = t = r = b =
    0, a dead ReLU), so the GIoU loss is exactly 1 at every step: exit 3 after the first epoch,
    naming the term, and no checkpoint."""
    from heads.detection import FCOSHead
    from tasks import detect
    from tasks.engine.runner import run_cli
    from tests.fakes import tiny_scenes_args

    monkeypatch.setattr(FCOSHead, "_distances", lambda self, x, level: x.float() * 0)
    out = tmp_path / "run"
    argv = ["--device", "cpu", "--quiet", "--batch-size", "2", "--config", "configs/detect/scenes_quick.yaml",
            "--set", "model.fpn_channels=16", "--set", "model.num_convs=1", "--epochs", "2", "--output", str(out),
            *tiny_scenes_args(tmp_path / "data")]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: detect.main(argv))
    assert exit_info.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss term 'bbox_regression' stayed at 1 " in err[0] and "epoch 1" in err[0], err
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()
