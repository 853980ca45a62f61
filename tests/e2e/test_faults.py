"""Bad input and faults: one clear line (exit 2, no traceback) and nothing lost, on every path."""
import errno
import gzip
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tasks import classify, detect, export, segment
from tasks.engine import checkpoint as checkpoint_module
from tasks.engine.checkpoint import CKPT_FORMAT, CheckpointWriter, load_checkpoint
from tasks.engine.runner import run_cli
from tests.fakes import write_fake_fashion_mnist, write_task_checkpoint

QUICK = ["--device", "cpu", "--quiet", "--batch-size", "32", "--limit-train", "64", "--limit-val", "32",
         "--set", "optim.lr=0.01", "--set", "optim.warmup_epochs=0"]


def cli_error(main, argv, capsys) -> str:
    """Run ``main(argv)`` as the command line does; assert exit 2 with one line and no
    traceback; return that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in "\n".join(err) and "weights_only=False" not in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def fm_dir(tmp_path_factory):
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=64, n_test=32)


@pytest.fixture(scope="module")
def run1(fm_dir, tmp_path_factory):
    """A finished one-epoch classification run."""
    out = tmp_path_factory.mktemp("run") / "one"
    classify.main(QUICK + ["--data-dir", str(fm_dir), "--epochs", "1", "--output", str(out)])
    return out


# ----------------------------------------------------------------------------- checkpoints

def _junk(folder: Path, kind: str) -> Path:
    path = folder / f"{kind}.pt"
    if kind == "folder":
        path.mkdir()
    elif kind == "text":
        path.write_text("these are not weights\n")
    elif kind == "one-byte":
        path.write_bytes(b"\x80")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "png":
        cv2.imwrite(str(folder / "x.png"), np.zeros((4, 4, 3), np.uint8))
        shutil.copy(folder / "x.png", path)
    elif kind == "json":
        path.write_text('{"model": [1, 2]}')
    elif kind == "gzip":
        path.write_bytes(gzip.compress(b"data"))
    elif kind == "truncated":
        torch.save({"w": torch.zeros(1000)}, folder / "whole.pt")
        path.write_bytes((folder / "whole.pt").read_bytes()[:700])
    return path


JUNK = {"folder": "is a folder, not a checkpoint file", "text": "not a PyTorch checkpoint: it is a text file",
        "one-byte": "is not a readable PyTorch checkpoint (truncated or corrupt",
        "empty": "not a PyTorch checkpoint: it is an empty file", "png": "not a PyTorch checkpoint: it is a PNG image",
        "json": "it is a JSON / text file", "gzip": "it is a gzip file",
        "truncated": "is not a readable PyTorch checkpoint (truncated or corrupt"}


@pytest.mark.parametrize("kind", list(JUNK))
def test_junk_checkpoints_get_one_true_line_on_every_path(kind, tmp_path, fm_dir, capsys):
    path = str(_junk(tmp_path, kind))
    for main, argv in [(classify.main, ["--eval-only", "--weights", path, "--device", "cpu"]),
                       (classify.main, ["--resume", path, "--device", "cpu"]),
                       (classify.main, QUICK + ["--data-dir", str(fm_dir), "--trunk", path, "--epochs", "1",
                                                "--output", str(tmp_path / "r")]),
                       (export.main, ["--weights", path, "--no-check"])]:
        line = cli_error(main, argv, capsys)
        assert path in line and JUNK[kind] in line, line


def test_flipped_bytes_fail_the_checksum(tmp_path):
    writer = CheckpointWriter()
    writer.save({"format": CKPT_FORMAT, "model": {"w": torch.full((64,), 1234.5)}, "ema": None}, tmp_path / "a.pt")
    writer.wait()
    data = bytearray((tmp_path / "a.pt").read_bytes())
    data[data.find(torch.full((64,), 1234.5).numpy().tobytes()) + 9] ^= 0x04  # inside the tensor's bytes
    (tmp_path / "b.pt").write_bytes(bytes(data))
    load_checkpoint(tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"b.pt: the 'model' weights do not match their checksum"):
        load_checkpoint(tmp_path / "b.pt")


def test_another_tasks_checkpoint_to_resume_names_both(tmp_path, capsys):
    path = write_task_checkpoint(tmp_path / "det.pt", "detect")
    line = cli_error(classify.main, ["--resume", str(path), "--device", "cpu"], capsys)
    assert "is a 'detect' checkpoint, not a 'classify' one" in line


def test_trunk_of_another_depth_or_block_is_refused(tmp_path, fm_dir, capsys):
    import torchvision
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pt")
    line = cli_error(classify.main, QUICK + ["--data-dir", str(fm_dir), "--epochs", "1", "--output",
                                             str(tmp_path / "r"), "--trunk", str(tmp_path / "r50.pt")], capsys)
    assert "holds a ResNet-50 (Bottlenecks 3-4-6-3) trunk but this model is ResNet-18" in line
    assert "--set model.depth=50" in line


# ----------------------------------------------------------------------------- config and flags

@pytest.mark.parametrize("argv, names", [
    (["--batch-size", "0"], "train.batch_size: 0 is out of range"),
    (["--batch-size", "-3"], "train.batch_size: -3 is out of range"),
    (["--set", "data.eval_batch_size=0"], "data.eval_batch_size: 0 is out of range"),
    (["--limit-train", "-5"], "data.limit_train: -5 is out of range"),
    (["--limit-val", "0"], "data.limit_val: 0 is out of range"),
    (["--epochs", "0"], "train.epochs: 0 is out of range"),
    (["--epochs", "-1"], "train.epochs: -1 is out of range"),
    (["--set", "train=5"], "--set train=5: train is a section"),
    (["--set", "train.epoch=5"], "unknown key 'epoch' in train"),
    (["--device", "foo"], "--device 'foo': not a device"),
    (["--device", "cuda:abc"], "--device 'cuda:abc': not a device"),
])
def test_wrong_values_are_named_before_anything_runs(argv, names, fm_dir, tmp_path, capsys):
    line = cli_error(classify.main, ["--device", "cpu", "--quiet", "--data-dir", str(fm_dir), "--output",
                                     str(tmp_path / "r"), *argv], capsys)
    assert names in line, line
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_resume_into_another_runs_folder_is_refused(run1, fm_dir, tmp_path, capsys):
    other = tmp_path / "other"
    classify.main(QUICK + ["--data-dir", str(fm_dir), "--epochs", "1", "--output", str(other)])
    before = (other / "metrics.jsonl").read_text()
    line = cli_error(classify.main, ["--resume", str(run1 / "last.pt"), "--output", str(other), "--epochs", "2",
                                     "--device", "cpu", "--data-dir", str(fm_dir)], capsys)
    assert f"--output {other} holds another run" in line and "--overwrite" in line
    assert (other / "metrics.jsonl").read_text() == before  # untouched
    classify.main(["--resume", str(run1 / "last.pt"), "--output", str(other), "--epochs", "2", "--device", "cpu",
                   "--data-dir", str(fm_dir), "--quiet", "--overwrite"])
    assert [json.loads(x)["epoch"] for x in (other / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ----------------------------------------------------------------------------- the run folder after a crash

def test_log_is_never_ahead_of_the_checkpoints(fm_dir, tmp_path, monkeypatch):
    out = tmp_path / "r"
    real = CheckpointWriter.save

    def killed(self, state, *paths, then=None):  # Ctrl-C while epoch 1's checkpoint is written
        raise KeyboardInterrupt

    monkeypatch.setattr(CheckpointWriter, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        classify.main(QUICK + ["--data-dir", str(fm_dir), "--epochs", "2", "--output", str(out)])
    assert not (out / "last.pt").exists()
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip()
    monkeypatch.setattr(CheckpointWriter, "save", real)
    classify.main(QUICK + ["--data-dir", str(fm_dir), "--epochs", "2", "--output", str(out)])  # the folder again
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_kill_while_writing_best_leaves_last_pointing_at_a_best_on_disk(fm_dir, tmp_path, monkeypatch):
    out = tmp_path / "r"
    real = checkpoint_module.atomic_save

    def dies_in_second_best(obj, path):
        if Path(path).name == "best.pt" and obj["epoch"] == 2:
            Path(path).with_name(".best.tmp999.pt").write_bytes(b"partial")  # what a kill leaves
            raise KeyboardInterrupt
        return real(obj, path)

    monkeypatch.setattr(checkpoint_module, "atomic_save", dies_in_second_best)
    # lr 0.05 and 3 epochs: epoch 2 beats epoch 1 on this easy data, so best.pt is written again
    with pytest.raises(KeyboardInterrupt):
        classify.main(QUICK + ["--data-dir", str(fm_dir), "--epochs", "3", "--output", str(out),
                               "--set", "optim.lr=0.05"])
    last, best = load_checkpoint(out / "last.pt"), load_checkpoint(out / "best.pt")
    assert last["epoch"] == 1 and last["best"] == best["metrics"]["val_acc"]
    monkeypatch.setattr(checkpoint_module, "atomic_save", real)
    classify.main(QUICK + ["--data-dir", str(fm_dir), "--epochs", "3", "--output", str(out), "--resume",
                           "--set", "optim.lr=0.05"])
    assert not list(out.glob(".*.tmp*"))  # the killed write's temp file is gone
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_full_disk_is_named_and_leaves_no_temp_file_or_orphan_log_line(fm_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    real_save = torch.save
    state = {"saves": 0}

    def full(obj, f, *a, **k):
        state["saves"] += 1
        if state["saves"] > 2:  # epoch 2 (epoch 1 wrote best.pt and last.pt): the disk is full
            Path(f).write_bytes(b"half")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4054")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    real_usage = shutil.disk_usage
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage",
                        lambda p: real_usage(p)._replace(free=1024) if state["saves"] > 2 else real_usage(p))
    line = cli_error(classify.main, QUICK + ["--data-dir", str(fm_dir), "--epochs", "3", "--output", str(out),
                                             "--set", "optim.lr=0"], capsys)
    assert "no space left on device" in line and "last.pt" in line
    assert not list(out.glob(".*tmp*"))
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert load_checkpoint(out / "last.pt")["epoch"] == 1


def test_full_disk_while_drawing_leaves_no_temp_picture(tmp_path, monkeypatch):
    from PIL import Image

    from tasks.engine.viz import draw_segmentation_grid

    def full(self, fp, *a, **k):
        Path(fp).write_bytes(b"")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(OSError, match="segmentation.png: no space left on device"):
        draw_segmentation_grid([torch.zeros(3, 8, 8, dtype=torch.uint8)], [torch.zeros(8, 8, dtype=torch.long)],
                               ["a", "b"], tmp_path / "segmentation.png")
    assert list(tmp_path.iterdir()) == []


def test_truncated_last_log_line_still_resumes_and_a_broken_one_is_named(run1, fm_dir, tmp_path):
    out = tmp_path / "r"
    shutil.copytree(run1, out)
    log = out / "metrics.jsonl"
    log.write_text(log.read_text() + '{"epoch": 2, "train_lo')  # died writing epoch 2's line
    with pytest.warns(UserWarning, match="last line is cut short"):
        classify.main(["--resume", "--output", str(out), "--epochs", "2", "--device", "cpu", "--quiet",
                       "--data-dir", str(fm_dir)])
    assert [json.loads(x)["epoch"] for x in log.read_text().splitlines()] == [1, 2]
    log.write_text("not json\n" + log.read_text())
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 1: not a JSON record"):
        classify.main(["--resume", "--output", str(out), "--epochs", "3", "--device", "cpu", "--quiet",
                       "--data-dir", str(fm_dir)])


# ----------------------------------------------------------------------------- data

def _coco(folder: Path, images: int, anns: list[dict], *, bad: int | None = None) -> Path:
    """A COCO file of 32 x 32 images, white boxes where the annotations are."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(images):
        img = np.zeros((32, 32, 3), np.uint8)
        for a in anns:
            if a["image_id"] == i:
                x, y, w, h = a["bbox"]
                img[y:y + h, x:x + w] = 255
        cv2.imwrite(str(folder / "img" / f"{i}.png"), img)
        entries.append({"id": i, "file_name": f"{i}.png", "width": 32, "height": 32})
    if bad is not None:
        (folder / "img" / f"{bad}.png").write_bytes(b"not a png")
    path = folder / "ann.json"
    path.write_text(json.dumps({"images": entries, "annotations": anns, "categories": [{"id": 1, "name": "box"}]}))
    return path


@pytest.mark.parametrize("field, value, named", [("area", "big", "area 'big' is not a finite number"),
                                                 ("iscrowd", "no", "iscrowd 'no' is not 0 or 1"),
                                                 ("area", -4, "area -4 is not a finite number >= 0")])
def test_coco_fields_cocoeval_reads_are_checked_at_load(tmp_path, field, value, named):
    from tasks.data.coco import CocoDetection
    ann = {"id": 7, "image_id": 0, "category_id": 1, "bbox": [2, 2, 10, 10], field: value}
    path = _coco(tmp_path, 1, [ann])
    with pytest.raises(ValueError, match=f"ann.json: malformed annotation id 7: {named}"):
        CocoDetection(path, tmp_path / "img")


def test_an_unreadable_validation_image_leaves_the_evaluation(tmp_path):
    """skip_bad on an evaluation set: the image is left out, ground truth and predictions alike
    (no other image's predictions scored under its id)."""
    from tasks.data.coco import CocoDetection, CocoEvaluator, collate_detection
    from tasks.data.preprocess import Preprocess
    anns = [{"id": i + 1, "image_id": i, "category_id": 1, "bbox": [2 + 3 * i, 4, 8, 10]} for i in range(4)]
    path = _coco(tmp_path, 4, anns, bad=1)
    pre = Preprocess(3, (0.5,) * 3, (0.2,) * 3, "longest", 32)
    ds = CocoDetection(path, tmp_path / "img", pre.albumentations(boxes=True), skip_bad=True, evaluation=True)
    with pytest.warns(UserWarning, match="left out of the evaluation"):
        batch = collate_detection([ds[i] for i in range(4)])
    images, targets = batch
    assert images.shape[0] == 3 and [t["image_id"] for t in targets] == [0, 2, 3]
    evaluator = CocoEvaluator(ds)
    evaluator.update([{"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"])), "labels": t["labels"]}
                      for t in targets], targets)  # perfect detections of what was evaluated
    with pytest.warns(UserWarning, match="1 validation image"):
        assert evaluator.compute()["AP"] == pytest.approx(1.0)


def test_missing_image_hint_is_the_command_line_flag(tmp_path):
    from tasks.data.coco import CocoDetection
    path = _coco(tmp_path, 2, [])
    (tmp_path / "img" / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"--set data.skip_bad=true skips missing images"):
        CocoDetection(path, tmp_path / "img")


def _tiny_detect_files(tmp_path: Path, val_images: int) -> list[str]:
    anns = [{"id": 1, "image_id": 0, "category_id": 1, "bbox": [2, 2, 12, 12]}]
    train = _coco(tmp_path / "train", 2, anns)
    val = _coco(tmp_path / "val", val_images, anns if val_images else [])
    return ["--train-ann", str(train), "--train-images", str(tmp_path / "train" / "img"), "--val-ann", str(val),
            "--val-images", str(tmp_path / "val" / "img")]


def test_empty_validation_set_is_an_error(tmp_path, capsys):
    line = cli_error(detect.main, ["--device", "cpu", "--quiet", "--config", "configs/detect/scenes_quick.yaml",
                                   "--set", "data.num_workers=0", "--set", "data.image_size=32",
                                   "--output", str(tmp_path / "r"), *_tiny_detect_files(tmp_path, 0)], capsys)
    assert "the validation set is empty" in line and "ann.json" in line


def test_user_data_runs_do_not_print_the_recipes_data_line(tmp_path, capsys):
    detect.main(["--device", "cpu", "--config", "configs/detect/scenes_quick.yaml", "--epochs", "1",
                 "--batch-size", "2", "--set", "data.num_workers=0", "--set", "data.image_size=32",
                 "--set", "model.fpn_channels=16", "--set", "model.num_convs=1", "--output", str(tmp_path / "r"),
                 *_tiny_detect_files(tmp_path, 2)])
    assert "FashionScenes" not in capsys.readouterr().out


def test_errors_in_dataloader_workers_are_one_line(tmp_path, capsys):
    from PIL import Image
    for split in ("train", "val"):
        for folder in ("images", "masks"):
            (tmp_path / split / folder).mkdir(parents=True)
        for i in range(2):
            cv2.imwrite(str(tmp_path / split / "images" / f"{i}.png"), np.zeros((32, 32, 3), np.uint8))
            Image.fromarray(np.full((32, 32), 9 if (split, i) == ("train", 1) else 1, np.uint8), mode="L").save(
                tmp_path / split / "masks" / f"{i}.png")  # class 9 of 3: a bad mask, met in a worker
    argv = ["--device", "cpu", "--quiet", "--config", "configs/segment/scenes_quick.yaml", "--epochs", "1",
            "--batch-size", "2", "--set", "model.num_classes=3", "--set", "data.num_workers=1",
            "--set", "data.image_size=32", "--output", str(tmp_path / "r")]
    for split in ("train", "val"):
        argv += [f"--{split}-images", str(tmp_path / split / "images"), f"--{split}-masks", str(tmp_path / split / "masks")]
    line = cli_error(segment.main, argv, capsys)
    assert "1.png: class ids [9] out of range" in line and "DataLoader worker" not in line


# ----------------------------------------------------------------------------- eval-only, predict, Python

def test_eval_only_keeps_the_training_runs_pictures(run1, fm_dir):
    before = (run1 / "confusion.png").read_bytes()
    classify.main(["--eval-only", "--weights", str(run1 / "best.pt"), "--device", "cpu", "--data-dir", str(fm_dir)])
    assert (run1 / "confusion.png").read_bytes() == before
    assert (run1 / "eval-best" / "confusion.png").is_file()


def test_predict_finishes_the_readable_files_and_names_the_bad_one(tmp_path, capfd):
    ckpt = write_task_checkpoint(tmp_path / "seg.pt", "segment")
    good = [tmp_path / "a.png", tmp_path / "c.png"]
    for p in good:
        cv2.imwrite(str(p), np.zeros((20, 30, 3), np.uint8))
    (tmp_path / "b.png").write_text("not an image")
    files = [str(good[0]), str(tmp_path / "b.png"), str(tmp_path / "missing.png"), str(good[1])]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: segment.main(["--predict", *files, "--weights", str(ckpt), "--device", "cpu",
                                      "--output", str(tmp_path / "o")]))
    assert exit_info.value.code == 2
    err = capfd.readouterr().err  # C-level stderr too: OpenCV's own warning lines
    assert "2 of 4 inputs could not be read (the other 2 were predicted)" in err and "b.png" in err
    assert "WARN" not in err and "Traceback" not in err
    out = tmp_path / "o" / "predictions"
    assert (out / "a_mask.png").is_file() and (out / "c_mask.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert [e["image"] for e in summary] == [files[0], files[3], files[1], files[2]]
    assert "error" in summary[2] and "error" in summary[3]


def test_models_name_wrong_inputs_and_targets():
    from backbones import resnet18
    from heads import Detector, FCNHead, FCOSHead, Segmenter
    from tasks import TASKS
    from tasks.engine.config import config_from_dict

    trunk = resnet18()
    seg = Segmenter(trunk, FCNHead(trunk.feature_info, 3)).train()
    with pytest.raises(ValueError, match="expects normalised float images.*got torch.uint8"):
        seg(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expects 3-channel images, got 1"):
        seg(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"class ids \[7\]: expected 0..2 \(num_classes=3\) or 255"):
        seg(torch.zeros(1, 3, 32, 32), torch.full((1, 32, 32), 7))
    spec = TASKS["detect"]
    cfg = config_from_dict(spec.config, {"model": {"fpn_channels": 16, "num_convs": 1}})
    det = spec.build_model(cfg, {"class_names": ["a", "b"]}).train()
    assert isinstance(det, Detector) and isinstance(det.head, FCOSHead)
    with pytest.raises(ValueError, match=r"label 5 of box 0 is outside \[0, 2\)"):
        det(torch.zeros(1, 3, 64, 64), [{"boxes": torch.tensor([[1.0, 1, 9, 9]]), "labels": torch.tensor([5])}])


def test_api_load_of_junk_is_one_error(tmp_path):
    from tasks import load
    with pytest.raises(ValueError, match="it is a text file"):
        load(_junk(tmp_path, "text"))


@pytest.mark.parametrize("argv, names", [
    (["--weights", "x.pt", "--epochs", "1"], "--weights goes with --eval-only or --predict"),
    (["--resume", "x.pt", "--eval-only"], "--resume and --eval-only do not go together"),
    (["--eval-only", "--predict", "a.png"], "--eval-only and --predict do not go together"),
])
def test_flags_that_contradict_each_other(argv, names, tmp_path, capsys):
    assert names in cli_error(classify.main, ["--device", "cpu", *argv], capsys)


def test_output_that_is_a_file(tmp_path, fm_dir, capsys):
    (tmp_path / "f").write_text("")
    line = cli_error(classify.main, QUICK + ["--data-dir", str(fm_dir), "--output", str(tmp_path / "f")], capsys)
    assert f"--output {tmp_path / 'f'} is a file, not a folder" in line


def test_checksum_of_channels_last_weights():
    """A channels_last 1x1 conv weight counts as contiguous yet strides its size-1 dims."""
    from backbones.weights import state_checksum
    w = torch.randn(8, 4, 1, 1).to(memory_format=torch.channels_last)
    v = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    plain = {"w": w.clone(memory_format=torch.contiguous_format), "v": v.clone(memory_format=torch.contiguous_format)}
    assert plain["w"].stride() != w.stride() and plain["v"].stride() != v.stride()
    assert state_checksum({"w": w, "v": v}) == state_checksum(plain)
    assert state_checksum({"w": w}) != state_checksum({"w": w + 1})
