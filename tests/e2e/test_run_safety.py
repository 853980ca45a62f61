"""Never touch the user's files, never keep a broken result: the run folder, the FashionScenes
generator and export, driven as a careless user would (a folder of their own as the output,
two runs at once, --resume with other settings, SIGTERM, Ctrl-C twice, batch size 1)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tasks import classify, export
from tasks.data import scenes
from tasks.engine import checkpoint as checkpoint_module
from tasks.engine import runner
from tasks.engine.checkpoint import load_checkpoint
from tasks.engine.loop import Trainer
from tasks.engine.runner import run_cli
from tests.fakes import write_fake_fashion_mnist, write_task_checkpoint

# 32 images at batch 16 (2 steps per epoch), a narrow trunk: checkpoints of 1.5 MB, epochs of ms
QUICK = ["--device", "cpu", "--quiet", "--batch-size", "16", "--limit-train", "32", "--limit-val", "16",
         "--set", "model.width=8", "--set", "optim.lr=0.01", "--set", "optim.warmup_epochs=0"]


def cli(main, argv, capsys) -> tuple[int, str]:
    """Run ``main(argv)`` as the command line does: (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    return exit_info.value.code, capsys.readouterr().err


def cli_error(main, argv, capsys) -> str:
    """Exit 2 with one ``error:`` line and no traceback; that line."""
    code, err = cli(main, argv, capsys)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def epochs(folder: Path) -> list[int]:
    log = folder / "metrics.jsonl"
    return [json.loads(x)["epoch"] for x in log.read_text().splitlines()] if log.exists() else []


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fm_dir(tmp_path_factory):
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=64, n_test=32)


@pytest.fixture(scope="module")
def run2(fm_dir, tmp_path_factory):
    """A finished two-epoch run (4 steps: a LambdaLR schedule)."""
    out = tmp_path_factory.mktemp("run") / "two"
    classify.main(QUICK + ["--data-dir", str(fm_dir), "--epochs", "2", "--output", str(out)])
    return out


@pytest.fixture
def copy_of(tmp_path):
    def copy(folder: Path, name: str = "copy") -> Path:
        return Path(shutil.copytree(folder, tmp_path / name))
    return copy


# ---------------------------------------------------------------- 1. FashionScenes never deletes a user's folder

def test_scenes_root_at_a_users_dataset_folder_is_refused_and_left_untouched(fm_dir, tmp_path, capsys):
    """A user's own dataset (images/ and annotations/, the names the generator writes) as
    data.scenes_root: it used to be deleted whole (exit 0)."""
    mine = tmp_path / "my_dataset"
    (mine / "images").mkdir(parents=True)
    (mine / "annotations").mkdir()
    (mine / "images" / "cat.jpg").write_bytes(b"a photo")
    (mine / "annotations" / "instances_train.json").write_text('{"images": []}')
    before = files(mine)
    with pytest.raises(FileExistsError, match="not a FashionScenes dataset") as e:
        scenes.ensure_scenes(mine, train=2, val=1, size=64, data_dir=fm_dir, progress=False)
    assert str(mine) in str(e.value)
    assert files(mine) == before
    # the CLI generator writes in place: the same folder is refused there too, with one line
    with pytest.raises(SystemExit):
        scenes.main(["--out", str(mine), "--train", "2", "--val", "1", "--size", "64", "--data-dir", str(fm_dir),
                     "--workers", "1", "--quiet"])
    assert "not a FashionScenes dataset" in capsys.readouterr().err
    assert files(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_dataset"]  # no temporary folder left


def test_a_generated_folder_with_a_users_file_added_is_not_deleted(fm_dir, tmp_path):
    root = scenes.ensure_scenes(tmp_path / "ds", train=2, val=1, size=64, data_dir=fm_dir, progress=False)
    (root / "images" / "train" / "my_notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="my_notes.txt"):  # other arguments would regenerate it
        scenes.ensure_scenes(root, train=3, val=1, size=64, data_dir=fm_dir, progress=False)
    assert (root / "images" / "train" / "my_notes.txt").read_text() == "mine"
    (root / "images" / "train" / "my_notes.txt").unlink()
    assert scenes.ensure_scenes(root, train=3, val=1, size=64, data_dir=fm_dir, progress=False) == root
    assert len(list((root / "images" / "train").iterdir())) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_ensure_scenes_never_deletes_a_folder_it_did_not_create_beside_the_root(fm_dir, tmp_path):
    """The temporary folder is a fresh one: a sibling that happens to have its old fixed name
    (``.<root>.tmp-<pid>``) is someone's, and stays."""
    sibling = tmp_path / f".ds.tmp-{os.getpid()}"
    sibling.mkdir()
    (sibling / "keep.txt").write_text("mine")
    scenes.ensure_scenes(tmp_path / "ds", train=2, val=1, size=64, data_dir=fm_dir, progress=False)
    assert (sibling / "keep.txt").read_text() == "mine"


def test_an_interrupted_generation_in_place_is_recognised_as_ours(fm_dir, tmp_path, monkeypatch):
    """python -m tasks.data.scenes --out DIR stopped halfway, then run again: its own half folder
    (marked, no DONE.json yet) is rewritten, not refused."""
    real = scenes._render_job

    def stop(job, data=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(scenes, "_render_job", stop)
    with pytest.raises(KeyboardInterrupt):
        scenes.generate_scenes(tmp_path / "ds", train=2, val=1, size=64, data_dir=fm_dir, workers=1, progress=False)
    assert not (tmp_path / "ds" / "DONE.json").exists()
    monkeypatch.setattr(scenes, "_render_job", real)
    scenes.generate_scenes(tmp_path / "ds", train=2, val=1, size=64, data_dir=fm_dir, workers=1, progress=False)
    assert (tmp_path / "ds" / "DONE.json").is_file() and not (tmp_path / "ds" / scenes.MARKER).exists()


# ---------------------------------------------------------------- 2. export never replaces its input

def test_export_output_onto_the_checkpoint_is_refused(tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ckpt = write_task_checkpoint(tmp_path / "best.pt", "classify")
    before = ckpt.read_bytes()
    (tmp_path / "link.onnx").symlink_to(ckpt)
    (tmp_path / "sub").mkdir()
    for output in (ckpt, tmp_path / "." / "best.pt", tmp_path / "link.onnx", tmp_path / "sub" / ".." / "best.pt"):
        line = cli_error(export.main, ["--weights", str(ckpt), "--output", str(output), "--no-check"], capsys)
        assert "is the input checkpoint" in line and str(output) in line, line
        assert ckpt.read_bytes() == before
    # a checkpoint that is named *.onnx: the default output (<stem>.onnx) is itself
    named = Path(shutil.copy(ckpt, tmp_path / "model.onnx"))
    line = cli_error(export.main, ["--weights", str(named), "--no-check"], capsys)
    assert "is the input checkpoint" in line and named.read_bytes() == before


def test_export_does_not_replace_another_checkpoint_or_a_folder(tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ckpt = write_task_checkpoint(tmp_path / "best.pt", "classify")
    other = write_task_checkpoint(tmp_path / "last.pt", "classify", seed=1)
    before = other.read_bytes()
    line = cli_error(export.main, ["--weights", str(ckpt), "--output", str(other), "--no-check"], capsys)
    assert f"--output {other} exists and is not an ONNX model" in line and other.read_bytes() == before
    line = cli_error(export.main, ["--weights", str(ckpt), "--output", str(tmp_path), "--no-check"], capsys)
    assert "is a folder" in line


def test_export_refuses_weights_holding_nan(tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ckpt = write_task_checkpoint(tmp_path / "nan.pt", "classify")
    state = torch.load(ckpt, weights_only=True)
    state["model"]["backbone.layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    state.pop("checksums", None)
    checkpoint_module.atomic_save(state, ckpt)
    line = cli_error(export.main, ["--weights", str(ckpt), "--no-check"], capsys)
    assert "NaN or inf" in line and "backbone.layer2.0.conv1.weight" in line
    assert not (tmp_path / "nan.onnx").exists() and not list(tmp_path.glob(".*tmp*"))


# ---------------------------------------------------------------- 3. one run per folder

def test_a_second_run_on_a_folder_in_use_is_refused(fm_dir, tmp_path, monkeypatch):
    """Two runs at once on one --output: the second is refused while the first trains; the first
    finishes with one log, and its lock is gone."""
    out = tmp_path / "r"
    args = QUICK + ["--data-dir", str(fm_dir), "--epochs", "2", "--output", str(out)]
    real = Trainer.train_one_epoch
    seen = {}

    def second_run_meanwhile(self, epoch):
        if epoch == 1 and not seen:
            lock = (out / runner.LOCK_NAME).read_text()
            with pytest.raises(FileExistsError, match=rf"in use by another run \(pid {os.getpid()}") as e:
                classify.main(args)
            seen["line"], seen["lock"] = str(e.value), lock
        return real(self, epoch)

    monkeypatch.setattr(Trainer, "train_one_epoch", second_run_meanwhile)
    classify.main(args)
    assert seen["lock"].splitlines()[0] == str(os.getpid())
    assert epochs(out) == [1, 2] and not (out / runner.LOCK_NAME).exists()
    with pytest.raises(FileExistsError, match="in use by another run"):  # also with --resume / --overwrite
        holder = runner.RunLock.acquire(out)
        try:
            classify.main(args + ["--overwrite"])
        finally:
            holder.release()


def test_a_live_process_lock_is_respected_and_a_dead_ones_is_taken_over(fm_dir, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / runner.LOCK_NAME).write_text(f"{alive.pid}\n")
        line = cli_error(classify.main, QUICK + ["--data-dir", str(fm_dir), "--epochs", "1", "--output", str(out)],
                         capsys)
        assert f"in use by another run (pid {alive.pid}" in line and str(out / runner.LOCK_NAME) in line
    finally:
        alive.kill()
        alive.wait()
    (out / runner.LOCK_NAME).write_text(f"{alive.pid}\n")  # now a dead process's
    classify.main(QUICK + ["--data-dir", str(fm_dir), "--epochs", "1", "--output", str(out)])
    assert f"taking over the lock of pid {alive.pid}, which is no longer running" in capsys.readouterr().err
    assert epochs(out) == [1] and not (out / runner.LOCK_NAME).exists()


def test_the_lock_goes_on_errors_and_ctrl_c(fm_dir, tmp_path, monkeypatch):
    out = tmp_path / "r"
    with pytest.raises(FileNotFoundError):  # after the folder is chosen and locked: the data is missing
        classify.main(QUICK + ["--data-dir", str(tmp_path / "none"), "--epochs", "1", "--output", str(out)])
    assert not (out / runner.LOCK_NAME).exists()

    def interrupted(self, epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        classify.main(QUICK + ["--data-dir", str(fm_dir), "--epochs", "1", "--output", str(out)])
    assert not (out / runner.LOCK_NAME).exists()


def test_default_run_folders_skip_a_folder_in_use(fm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ONETRUNK_RUNS", str(tmp_path))
    base = tmp_path / "classify" / "fashion_mnist_quick"
    base.mkdir(parents=True)
    holder = runner.RunLock.acquire(base)
    try:
        result = classify.main(QUICK + ["--data-dir", str(fm_dir), "--epochs", "1",
                                        "--config", "configs/classify/fashion_mnist_quick.yaml"])
    finally:
        holder.release()
    assert result["output"] == str(base.with_name(base.name + "-2")) and not (base / "last.pt").exists()


# ---------------------------------------------------------------- 4. a folder with a previous run's results

@pytest.mark.parametrize("kept", ["best.pt", "metrics.jsonl", "confusion.png"])
def test_a_folder_holding_a_previous_runs_results_is_refused(run2, fm_dir, tmp_path, kept, capsys):
    """best.pt without last.pt (or only the log, or only a picture): a new run used to overwrite it."""
    out = tmp_path / "r"
    out.mkdir()
    shutil.copy(run2 / kept, out / kept)
    before = files(out)
    line = cli_error(classify.main, QUICK + ["--data-dir", str(fm_dir), "--epochs", "1", "--output", str(out)],
                     capsys)
    assert f"--output {out} already holds a run ({kept})" in line and "--resume" in line and "--overwrite" in line
    assert files(out) == before


def test_default_run_folders_skip_a_folder_holding_only_best(run2, fm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ONETRUNK_RUNS", str(tmp_path))
    base = tmp_path / "classify" / "fashion_mnist_quick"
    base.mkdir(parents=True)
    shutil.copy(run2 / "best.pt", base / "best.pt")
    before = (base / "best.pt").read_bytes()
    result = classify.main(QUICK + ["--data-dir", str(fm_dir), "--epochs", "1",
                                    "--config", "configs/classify/fashion_mnist_quick.yaml"])
    assert result["output"] == str(base.with_name(base.name + "-2"))
    assert (base / "best.pt").read_bytes() == before


def test_overwrite_replaces_the_old_run_whole(run2, fm_dir, copy_of, monkeypatch):
    """--overwrite, then stopped in the first epoch: the old run's checkpoints must not stay
    beside the new run's config (a later --resume would continue the old run as the new one)."""
    out = copy_of(run2)

    def interrupted(self, epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        classify.main(QUICK + ["--data-dir", str(fm_dir), "--epochs", "3", "--output", str(out), "--overwrite"])
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists() and epochs(out) == []
    assert not (out / "confusion.png").exists()


# ---------------------------------------------------------------- 4b. other files of the user's a run would replace

def test_eval_only_into_a_training_run_folder_keeps_its_pictures(run2, copy_of, fm_dir, capsys):
    out = copy_of(run2)
    before = files(out)
    line = cli_error(classify.main, ["--eval-only", "--weights", str(out / "best.pt"), "--output", str(out),
                                     "--device", "cpu", "--data-dir", str(fm_dir)], capsys)
    assert f"--output {out} holds a training run (last.pt, best.pt, metrics.jsonl)" in line
    assert str(out / "eval-best") in line and files(out) == before


def test_a_users_config_yaml_in_the_output_folder_is_not_replaced(fm_dir, tmp_path, capsys):
    """A folder of the user's with their own recipe in it: the run would write its resolved
    config over it (a config.yaml a stopped run wrote is replaced, as before)."""
    out = tmp_path / "exp"
    out.mkdir()
    shutil.copy("configs/classify/fashion_mnist_quick.yaml", out / "config.yaml")
    before = (out / "config.yaml").read_bytes()
    argv = QUICK + ["--data-dir", str(fm_dir), "--epochs", "1", "--output", str(out)]
    line = cli_error(classify.main, argv + ["--config", str(out / "config.yaml")], capsys)
    assert f"--output {out} holds a config.yaml that no run wrote" in line
    assert (out / "config.yaml").read_bytes() == before and not (out / runner.LOCK_NAME).exists()
    classify.main(argv + ["--config", str(out / "config.yaml"), "--overwrite"])  # said so: replaced
    assert (out / "config.yaml").read_bytes() != before and epochs(out) == [1]


def test_a_compile_cache_path_at_a_checkpoint_is_not_overwritten(run2, fm_dir, tmp_path, monkeypatch, capsys):
    """train.compile_cache pointed at a checkpoint by mistake: a file that does not load used to be
    rewritten with the compile artifacts after the first epoch."""
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", None))
    ckpt = Path(shutil.copy(run2 / "best.pt", tmp_path / "model.pt"))
    before = ckpt.read_bytes()
    line = cli_error(classify.main, QUICK + ["--data-dir", str(fm_dir), "--epochs", "1", "--output",
                                             str(tmp_path / "r"), "--compile", "--set",
                                             f"train.compile_cache={ckpt}"], capsys)
    assert f"train.compile_cache {ckpt} is a zip file" in line and ckpt.read_bytes() == before


def test_only_temp_files_of_killed_writes_are_removed(fm_dir, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".notes.tmpl").write_text("a hidden file of the user's")
        (out / ".last.tmp999999999.pt").write_bytes(b"half a checkpoint")  # a killed write's
        (out / f".best.tmp{alive.pid}.onnx").write_bytes(b"an export in progress")  # a live process's
        classify.main(QUICK + ["--data-dir", str(fm_dir), "--epochs", "1", "--output", str(out)])
        assert sorted(p.name for p in out.glob(".*")) == [f".best.tmp{alive.pid}.onnx", ".notes.tmpl"]
    finally:
        alive.kill()
        alive.wait()


# ---------------------------------------------------------------- 5. --resume with more (or fewer) epochs

def test_resume_with_more_epochs_rebuilds_the_schedule(fm_dir, tmp_path, capsys):
    """OneCycle (8 steps) resumed for 3 epochs used to fail: "Tried to step 9 times"."""
    out = tmp_path / "r"
    args = QUICK + ["--data-dir", str(fm_dir), "--batch-size", "8", "--set", "optim.schedule=onecycle",
                    "--output", str(out)]
    classify.main(args + ["--epochs", "2"])
    capsys.readouterr()
    result = classify.main(["--resume", "--output", str(out), "--epochs", "3"])
    assert "train.epochs 2 in the checkpoint, 3 now: the learning-rate schedule is rebuilt for 3 epochs" \
        in capsys.readouterr().out
    assert result["epoch"] == 3 and epochs(out) == [1, 2, 3]
    assert load_checkpoint(out / "last.pt")["scheduler"]["total_steps"] == 12
    assert "epochs: 3" in (out / "config.yaml").read_text()
    # the schedule of the last epoch is the one a 3-epoch run has: the same lr as an uninterrupted run's
    classify.main(args[:-1] + [str(tmp_path / "whole"), "--epochs", "3"])
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["lr"]
    whole = json.loads((tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()[-1])["lr"]
    assert last == pytest.approx(whole, rel=1e-9)


def test_resume_with_more_epochs_across_schedule_kinds_says_so(run2, fm_dir, copy_of, capsys):
    """4 steps (LambdaLR: too short for OneCycle's phases) resumed to 8 (OneCycle): KeyError 'max_lr'."""
    out = copy_of(run2)
    result = classify.main(["--resume", "--output", str(out), "--epochs", "4"])
    printed = capsys.readouterr().out
    assert "train.epochs 2 in the checkpoint, 4 now: the learning-rate schedule is rebuilt for 4 epochs and " \
           "the schedule continues at step 4 of 8" in printed
    assert result["epoch"] == 4 and epochs(out) == [1, 2, 3, 4]


def test_resume_with_fewer_epochs_than_trained_is_refused(run2, fm_dir, copy_of, capsys):
    out = copy_of(run2)
    before = files(out)
    line = cli_error(classify.main, ["--resume", "--output", str(out), "--epochs", "1"], capsys)
    assert "train.epochs (--epochs) 1 is fewer than the 2 epochs" in line and "--epochs 3" in line
    assert files(out) == before  # config.yaml not rewritten to a length that never ran


# ---------------------------------------------------------------- 6. --resume with another model or optimizer

@pytest.mark.parametrize("sets, named", [
    (["model.depth=34"], ["model.depth 18 in the checkpoint, 34 in this command"]),
    (["model.stem=cifar"], ["model.stem 'imagenet' in the checkpoint, 'cifar' in this command"]),
    (["model.norm=gn", "model.width=32"], ["model.norm 'bn' in the checkpoint, 'gn' in this command",
                                           "model.width 8 in the checkpoint, 32 in this command"]),
    (["optim.name=adamw"], ["optim.name 'sgd' in the checkpoint, 'adamw' in this command"]),
    (["optim.lr=0.5"], ["optim.lr 0.01 in the checkpoint, 0.5 in this command"]),
    (["optim.trunk_lr_mult=0.1"], ["optim.trunk_lr_mult 1.0 in the checkpoint, 0.1 in this command"]),
])
def test_resume_with_another_model_or_optimizer_names_the_difference(run2, copy_of, sets, named, capsys):
    out = copy_of(run2)
    before = files(out)
    argv = ["--resume", "--output", str(out), "--epochs", "3"]
    for s in sets:
        argv += ["--set", s]
    line = cli_error(classify.main, argv, capsys)
    assert f"--resume {out / 'last.pt'}" in line
    for name in named:
        assert name in line, line
    assert files(out) == before  # config.yaml, log and checkpoints as they were


# ---------------------------------------------------------------- 7. SIGTERM and Ctrl-C

@pytest.fixture
def sigterm_guard():
    """If the code under test did not handle SIGTERM, the test fails instead of pytest dying."""
    class Unhandled(Exception):
        pass

    def fail(signum, frame):
        raise Unhandled("SIGTERM reached the default handler")

    previous = signal.signal(signal.SIGTERM, fail)
    yield Unhandled
    signal.signal(signal.SIGTERM, previous)


def _stop_at(epoch_to_stop: int, sig: int):
    real = Trainer.train_one_epoch

    def train(self, epoch):
        if epoch == epoch_to_stop:
            os.kill(os.getpid(), sig)  # the handler runs in this thread, right here
            time.sleep(0.05)
        return real(self, epoch)
    return train


def test_sigterm_before_the_first_checkpoint_then_resume(fm_dir, tmp_path, monkeypatch, capsys, sigterm_guard):
    out = tmp_path / "r"
    args = QUICK + ["--data-dir", str(fm_dir), "--epochs", "2", "--output", str(out)]
    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_one_epoch", _stop_at(0, signal.SIGTERM))
        code, err = cli(classify.main, args, capsys)
    assert code == 143
    assert "stopped (SIGTERM) in epoch 1 of 2: no checkpoint was saved yet: nothing to resume, start again" in err
    assert not (out / "last.pt").exists() and epochs(out) == [] and not (out / runner.LOCK_NAME).exists()
    assert not list(out.glob(".*tmp*"))
    classify.main(args + ["--resume"])  # the same command with --resume: nothing to resume, so it starts afresh
    assert "holds no checkpoint yet" in capsys.readouterr().err
    assert epochs(out) == [1, 2] and load_checkpoint(out / "last.pt")["epoch"] == 2


def test_sigterm_after_a_checkpoint_says_how_to_resume(fm_dir, tmp_path, monkeypatch, capsys, sigterm_guard):
    out = tmp_path / "r"
    args = QUICK + ["--data-dir", str(fm_dir), "--epochs", "3", "--output", str(out)]
    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_one_epoch", _stop_at(1, signal.SIGTERM))
        code, err = cli(classify.main, args, capsys)
    assert code == 143
    assert f"stopped (SIGTERM) in epoch 2 of 3: last.pt holds epoch 1 of 3; resume with --resume {out}" in err
    assert epochs(out) == [1] and load_checkpoint(out / "last.pt")["epoch"] == 1
    assert not (out / runner.LOCK_NAME).exists()
    classify.main(["--resume", str(out), "--quiet"])
    assert epochs(out) == [1, 2, 3]


def test_a_stop_drops_log_lines_no_checkpoint_holds(fm_dir, tmp_path, monkeypatch, capsys, sigterm_guard):
    """train.save_every / eval_every 3: epochs 1 and 2 log a line but save nothing. Stopped in
    epoch 3, the log must not be ahead of the (absent) checkpoints, so the command can simply
    start again."""
    out = tmp_path / "r"
    args = QUICK + ["--data-dir", str(fm_dir), "--epochs", "3", "--output", str(out), "--set", "train.save_every=3",
                    "--set", "train.eval_every=3"]
    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_one_epoch", _stop_at(2, signal.SIGTERM))
        code, err = cli(classify.main, args, capsys)
    assert code == 143 and "no checkpoint was saved yet: nothing to resume, start again" in err
    assert epochs(out) == [] and not (out / "last.pt").exists()
    classify.main(args)  # start again: the folder holds no result that would refuse it
    assert epochs(out) == [1, 2, 3]


def test_a_stop_with_only_best_saved_says_to_resume_from_it(fm_dir, tmp_path, monkeypatch, capsys, sigterm_guard):
    out = tmp_path / "r"
    args = QUICK + ["--data-dir", str(fm_dir), "--epochs", "3", "--output", str(out), "--set", "train.save_every=3"]
    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_one_epoch", _stop_at(1, signal.SIGTERM))
        code, err = cli(classify.main, args, capsys)
    assert code == 143
    assert f"no last.pt yet, best.pt holds epoch 1 of 3; resume with --resume {out / 'best.pt'}" in err
    assert epochs(out) == [1]
    classify.main(["--resume", str(out / "best.pt"), "--quiet"])
    assert epochs(out) == [1, 2, 3]


def test_ctrl_c_twice_while_a_checkpoint_is_written(fm_dir, tmp_path, monkeypatch, capsys):
    """The first Ctrl-C stops the run, a second one (an impatient user) arrives while epoch 1's
    checkpoint is still being written: the folder must still end with whole files, a log that is
    not ahead of last.pt, no lock, and the line that says what to resume."""
    out = tmp_path / "r"
    real = checkpoint_module.atomic_save
    writing, stopped = threading.Event(), threading.Event()

    def slow_save(obj, path):
        if Path(path).name == "last.pt" and obj["epoch"] == 1:
            writing.set()
            stopped.wait(timeout=60)  # the first Ctrl-C has reached the main thread ...
            time.sleep(0.3)  # ... which now waits for this write
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C
            time.sleep(0.3)
        return real(obj, path)

    real_epoch = Trainer.train_one_epoch

    def epoch_after_the_signals(self, epoch):
        # the first Ctrl-C, at the start of the second epoch (index 1) while epoch 1's last.pt is
        # being written, raised in the main thread itself (where it is handled)
        if epoch == 1:
            writing.wait(timeout=60)
            stopped.set()
            signal.raise_signal(signal.SIGINT)
        return real_epoch(self, epoch)

    monkeypatch.setattr(checkpoint_module, "atomic_save", slow_save)
    monkeypatch.setattr(Trainer, "train_one_epoch", epoch_after_the_signals)
    # Ctrl-C as in a terminal: a test session started in the background (`make test &`) inherits
    # SIGINT ignored, and Python then keeps it ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, err = cli(classify.main, QUICK + ["--data-dir", str(fm_dir), "--epochs", "3", "--output", str(out)],
                        capsys)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130
    assert not [t for t in threading.enumerate() if t.name == "checkpoint-writer"]  # nothing still writing
    assert load_checkpoint(out / "last.pt")["epoch"] == 1 and epochs(out) == [1]
    assert f"last.pt holds epoch 1 of 3; resume with --resume {out}" in err
    assert "stopping: finishing the files being written" in err  # the second Ctrl-C was held
    assert not (out / runner.LOCK_NAME).exists() and not list(out.glob(".*tmp*"))
    monkeypatch.setattr(checkpoint_module, "atomic_save", real)
    monkeypatch.setattr(Trainer, "train_one_epoch", real_epoch)
    classify.main(["--resume", str(out), "--quiet"])
    assert epochs(out) == [1, 2, 3]


def test_sigterm_in_a_real_process_exits_143_and_releases_the_lock(fm_dir, tmp_path):
    """The whole command in its own process, killed with SIGTERM while it trains."""
    out = tmp_path / "r"
    code = (
        "import os, signal, sys\n"
        "from tasks import classify\n"
        "from tasks.engine.loop import Trainer\n"
        "from tasks.engine.runner import run_cli\n"
        "real = Trainer.train_one_epoch\n"
        "def train(self, epoch):\n"
        "    if epoch == 1:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(self, epoch)\n"
        "Trainer.train_one_epoch = train\n"
        "run_cli(lambda: classify.main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, *QUICK, "--data-dir", str(fm_dir), "--epochs", "3",
                           "--output", str(out)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "resume with --resume" in proc.stderr and "Traceback" not in proc.stderr
    assert epochs(out) == [1] and not (out / runner.LOCK_NAME).exists()


# ---------------------------------------------------------------- 8. batches of one image with BatchNorm

def test_batch_size_1_with_batch_norm_is_one_line(fm_dir, tmp_path, capsys):
    """The quick recipe's ImageNet stem makes C5 of a 28x28 image 1x1: BatchNorm cannot train there
    on one image. One line naming the batch size, at the first step; nothing saved, no lock left."""
    out = tmp_path / "r"
    line = cli_error(classify.main, QUICK + ["--data-dir", str(fm_dir), "--epochs", "1", "--output", str(out),
                                             "--batch-size", "1"], capsys)
    assert "training batch 1 of epoch 1 holds 1 image" in line and "--batch-size" in line
    assert "model.norm=gn" in line and "Expected more than 1 value" not in line
    assert not (out / "metrics.jsonl").exists() and not (out / "last.pt").exists()
    assert not (out / runner.LOCK_NAME).exists()
    # a training set of one image gives a batch of one whatever the batch size
    line = cli_error(classify.main, QUICK + ["--data-dir", str(fm_dir), "--epochs", "1", "--output", str(out),
                                             "--limit-train", "1", "--overwrite"], capsys)
    assert "holds 1 image" in line and "--batch-size" in line


def test_a_last_batch_of_one_image_is_one_line_and_batch_1_trains_where_it_can(tmp_path):
    """9 images at batch 8, the last batch kept (a user's own DataLoader through the Python API);
    while a model whose BatchNorm inputs have more than one pixel per channel trains at batch 1."""
    from tasks.engine.config import config_from_dict

    cfg = config_from_dict(classify.ClassifyConfig, {"model": {"in_chans": 1, "num_classes": 3, "width": 8},
                                                     "train": {"batch_size": 8, "epochs": 1}})
    model = classify.build_model(cfg, {"class_names": ["a", "b", "c"]})
    data = torch.utils.data.TensorDataset(torch.randn(9, 1, 28, 28), torch.randint(0, 3, (9,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8, drop_last=False)
    trainer = Trainer("classify", cfg, model, loader, evaluate=lambda m, final: {}, main_metric="acc",
                      output=tmp_path / "a", device=torch.device("cpu"), quiet=True)
    with pytest.raises(ValueError, match=r"training batch 2 of epoch 1 holds 1 image: BatchNorm cannot train on a "
                                         r"batch of one image"):
        trainer.fit()
    assert not (tmp_path / "a" / "last.pt").exists()
    cifar = config_from_dict(classify.ClassifyConfig, {"model": {"in_chans": 1, "num_classes": 3, "width": 8,
                                                                 "stem": "cifar"},
                                                       "train": {"batch_size": 1, "epochs": 1}})
    ones = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(3, 1, 28, 28),
                                                                      torch.randint(0, 3, (3,))), batch_size=1)
    Trainer("classify", cifar, classify.build_model(cifar, {"class_names": ["a", "b", "c"]}), ones,  # C5 is 4x4
            evaluate=lambda m, final: {}, main_metric="acc", output=tmp_path / "b", device=torch.device("cpu"),
            quiet=True).fit()
    assert (tmp_path / "b" / "last.pt").exists()


def test_a_command_refused_before_it_writes_leaves_no_empty_run_folder(tmp_path, capsys):
    """Bad data found once the run folder was chosen: the folders made for it go again (a user's
    own existing --output folder stays)."""
    missing = tmp_path / "no-such-data"
    out = tmp_path / "a" / "b" / "run"
    line = cli_error(classify.main, QUICK + ["--data-dir", str(missing), "--epochs", "1", "--output", str(out)], capsys)
    assert str(missing) in line
    assert not (tmp_path / "a").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    cli_error(classify.main, QUICK + ["--data-dir", str(missing), "--epochs", "1", "--output", str(mine)], capsys)
    assert mine.is_dir() and not any(mine.iterdir())
