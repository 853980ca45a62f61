"""python -m tasks.classify end to end on a tiny synthetic Fashion-MNIST, on CPU."""
import json

import pytest
import torch

from backbones import resnet18
from tasks import classify
from tasks.engine.checkpoint import load_checkpoint
from tasks.engine.loop import NonFiniteLossError, Trainer
from tests.fakes import fake_fashion_images, write_fake_fashion_mnist

QUICK = ["--device", "cpu", "--quiet", "--batch-size", "32", "--limit-train", "192", "--limit-val", "96",
         "--set", "optim.lr=0.01", "--set", "optim.warmup_epochs=0.5", "--set", "optim.schedule=cosine"]


@pytest.fixture(scope="module")
def fm_dir(tmp_path_factory):
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=192, n_test=96)


@pytest.fixture(scope="module")
def two_epoch_run(fm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "full"
    metrics = classify.main(QUICK + ["--data-dir", str(fm_dir), "--epochs", "2", "--output", str(out)])
    return out, metrics


def test_run_writes_every_artifact_and_learns(two_epoch_run):
    out, metrics = two_epoch_run
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "curves.png", "confusion.png"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["train_loss"] < records[0]["train_loss"]
    assert metrics["acc"] == pytest.approx(records[-1]["val_acc"])
    assert metrics["acc"] > 0.3  # 10 classes: chance is 0.1
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["task"] == "classify" and ckpt["meta"]["class_names"][9] == "Ankle boot"
    assert {"format", "config", "model", "optimizer", "scheduler", "metrics", "rng", "meta"} <= set(ckpt)
    meta = ckpt["meta"]  # one schema for every task
    assert meta["in_chans"] == 1 and len(meta["mean"]) == len(meta["std"]) == 1
    assert meta["preprocess"] == {"resize": "crop", "size": 28, "crop_pct": 1.0, "size_divisible": 32, "max_size": None}


def test_resume_reproduces_uninterrupted_run(two_epoch_run, fm_dir, tmp_path, monkeypatch):
    full, _ = two_epoch_run
    out = tmp_path / "resumed"
    real = Trainer.train_one_epoch

    def interrupted(self, epoch):  # Ctrl-C as the second epoch starts
        if epoch == 1:
            raise KeyboardInterrupt
        return real(self, epoch)

    args = QUICK + ["--data-dir", str(fm_dir), "--epochs", "2", "--output", str(out)]
    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_one_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            classify.main(args)
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    classify.main(args + ["--resume"])
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(out / "last.pt")
    assert b["epoch"] == 2
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=0, msg=k)
    assert b["optimizer"]["state"][0]["momentum_buffer"].equal(a["optimizer"]["state"][0]["momentum_buffer"])
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_eval_only_reproduces_recorded_accuracy(two_epoch_run, fm_dir, tmp_path, capsys):
    out, _ = two_epoch_run
    best = load_checkpoint(out / "best.pt")
    metrics = classify.main(["--eval-only", "--weights", str(out / "best.pt"), "--data-dir", str(fm_dir),
                             "--device", "cpu", "--limit-val", "96", "--output", str(tmp_path)])
    assert metrics["acc"] == pytest.approx(best["metrics"]["val_acc"], abs=1e-9)
    assert (tmp_path / "confusion.png").is_file()
    assert "Ankle boot" in capsys.readouterr().out
    saved = json.loads((tmp_path / "metrics.json").read_text())  # the numbers as a file too
    assert saved["acc"] == metrics["acc"] and saved["weights"] == str(out / "best.pt")


def test_predict_prints_top3(two_epoch_run, tmp_path, capsys):
    import cv2
    out, _ = two_epoch_run
    images, labels = fake_fashion_images(2, seed=5)
    paths = []
    for i, img in enumerate(images):
        paths.append(str(tmp_path / f"img{i}.png"))
        cv2.imwrite(paths[-1], img)
    result = classify.main(["--predict", *paths, "--weights", str(out / "best.pt"), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert len(result["predictions"]) == 2 and all(len(r["top3"]) == 3 for r in result["predictions"])
    assert paths[0] in printed and "%" in printed


def test_nan_loss_stops_cleanly(fm_dir, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    calls = {"n": 0}
    real_loss = classify.ClassificationHead.loss

    def poisoned(self, logits, targets):
        calls["n"] += 1
        losses = real_loss(self, logits, targets)
        if calls["n"] == 9:  # second epoch (6 steps per epoch), third step
            losses["cls"] = losses["cls"] * float("nan")
        return losses

    monkeypatch.setattr(classify.ClassificationHead, "loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 3"):
        classify.main(QUICK + ["--data-dir", str(fm_dir), "--epochs", "3", "--output", str(out)])
    ckpt = load_checkpoint(out / "last.pt")  # epoch 1 survives, nothing later was written
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_existing_run_is_not_overwritten(two_epoch_run, fm_dir):
    out, _ = two_epoch_run
    with pytest.raises(FileExistsError, match="--resume"):
        classify.main(QUICK + ["--data-dir", str(fm_dir), "--epochs", "1", "--output", str(out)])


def test_trunk_flag_loads_backbone(fm_dir, tmp_path, capsys):
    trunk = resnet18(in_chans=1)
    path = tmp_path / "trunk.pt"
    torch.save(trunk.state_dict(), path)
    classify.main(QUICK + ["--data-dir", str(fm_dir), "--epochs", "1", "--output", str(tmp_path / "r"),
                           "--trunk", str(path), "--set", "optim.lr=0"])
    assert "tensors loaded" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "r" / "last.pt")
    torch.testing.assert_close(ckpt["model"]["backbone.layer2.0.conv1.weight"], trunk.state_dict()["layer2.0.conv1.weight"])


def test_compile_tune_without_compile_is_refused(fm_dir, tmp_path):
    with pytest.raises(ValueError, match="train.compile_tune.*train.compile=true"):
        classify.main(QUICK + ["--data-dir", str(fm_dir), "--epochs", "1", "--output", str(tmp_path / "r"),
                               "--set", "train.compile_tune=true"])


def test_api_and_predict_see_images_as_evaluation_does(two_epoch_run, fm_dir, tmp_path, capsys):
    """The same image gives the same class through evaluation, tasks.load(...).predict and --predict."""
    import cv2

    from tasks import TASKS, load
    from tasks.data.fashion_mnist import load_fashion_mnist

    out, _ = two_epoch_run
    model = load(out / "best.pt", device="cpu")
    from tasks.engine.config import config_from_dict
    cfg = config_from_dict(classify.ClassifyConfig, load_checkpoint(out / "best.pt")["config"])  # the run's data
    data = TASKS["classify"].build_data(cfg, torch.device("cpu"), train=False)
    with torch.no_grad():
        evaluated = torch.cat([model.model(x).argmax(1) for x, _ in data.val]).tolist()  # the evaluation path
    images, _ = load_fashion_mnist("test", str(fm_dir), 96)
    api = [model.class_names.index(r["top"][0][0]) for r in model.predict(list(images.numpy()), batch_size=40)]
    assert api == evaluated
    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f"val{i}.png"))
        cv2.imwrite(paths[-1], images[i].numpy())
    capsys.readouterr()
    cli = classify.main(["--predict", *paths, "--weights", str(out / "best.pt"), "--device", "cpu"])
    assert [model.class_names.index(e["top3"][0][0]) for e in cli["predictions"]] == evaluated[:6]


def test_tensorboard_scalars_beside_metrics(fm_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    classify.main(QUICK + ["--data-dir", str(fm_dir), "--epochs", "2", "--output", str(out),
                           "--set", "train.tensorboard=true"])
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train/loss", "val/acc", "lr"} <= set(events.Tags()["scalars"])
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in events.Scalars("val/acc")] == [1, 2]
    assert [e.value for e in events.Scalars("val/acc")] == pytest.approx([r["val_acc"] for r in records])
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)  # not installed
    with pytest.raises(ValueError, match=r"train.tensorboard needs the tensorboard package: pip install 'onetrunk\[tensorboard\]'"):
        classify.main(QUICK + ["--data-dir", str(fm_dir), "--epochs", "1", "--output", str(tmp_path / "tb2"),
                               "--set", "train.tensorboard=true"])


def test_trunk_width_is_a_config_key_and_survives_the_checkpoint(fm_dir, tmp_path):
    from tasks import load
    out = tmp_path / "narrow"
    classify.main(QUICK + ["--data-dir", str(fm_dir), "--epochs", "1", "--output", str(out),
                           "--set", "model.stem=cifar", "--set", "model.width=16"])
    model = load(out / "best.pt", device="cpu").model
    assert [s.channels for s in model.backbone.feature_info] == [16, 32, 64, 128]


@pytest.mark.slow  # torch.compile on the CPU, twice (~11 s)
def test_compile_cache_is_written_after_the_first_epoch_and_read_next_time(fm_dir, tmp_path, monkeypatch, capsys):
    # inductor itself is not run here (minutes on 2 cores): torch.compile is the identity and the
    # cache-artifact API records what the trainer hands it
    calls = {"loaded": []}
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: calls["loaded"].append(data))
    cache = tmp_path / "classify.compile-cache"
    args = QUICK + ["--data-dir", str(fm_dir), "--epochs", "2", "--compile", "--set", f"train.compile_cache={cache}"]
    classify.main(args + ["--output", str(tmp_path / "a")])
    assert cache.read_bytes() == b"artifacts" and calls["loaded"] == []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"second run", None))
    classify.main(args + ["--output", str(tmp_path / "b")])
    assert calls["loaded"] == [b"artifacts"]
    assert cache.read_bytes() == b"artifacts"  # a file that loaded (perhaps shipped) is not rewritten
    cache.write_bytes(b"damaged")
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: (_ for _ in ()).throw(RuntimeError("bad")))
    classify.main(args + ["--output", str(tmp_path / "c")])  # reported, then compiles as usual
    assert "was not loaded (RuntimeError: bad)" in capsys.readouterr().err
    assert cache.read_bytes() == b"second run"  # and rewritten
    with pytest.raises(ValueError, match="train.compile_cache.*train.compile=true"):  # without --compile
        classify.main(QUICK + ["--data-dir", str(fm_dir), "--output", str(tmp_path / "d"),
                               "--set", f"train.compile_cache={cache}"])
