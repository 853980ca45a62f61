"""``--predict`` and the Python API as a careless user drives them: outputs never overwrite an
input or another input's outputs, never go through a link, memory stays bounded for a big
folder, every wrong argument is one line, and a model that holds NaN / inf serves nothing."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from tasks import TASKS, load
from tasks.data.images import image_from_input
from tasks.engine.predict import Predictor, predict_files, predict_images
from tasks.engine.runner import run_cli
from tests.fakes import write_flat_image

ALL = ["classify", "detect", "segment", "multitask"]
WRITERS = ["detect", "segment", "multitask"]  # the tasks whose --predict writes files


_image = write_flat_image


def _predict(task, ckpt, paths, out, capfd=None):
    """``python -m tasks.<task> --predict ...``: (exit code, stderr)."""
    module = importlib.import_module(f"tasks.{task}")
    argv = ["--predict", *map(str, paths), "--weights", str(ckpt), "--device", "cpu", "--output", str(out)]
    code = 0
    try:
        run_cli(lambda: module.main(argv))
    except SystemExit as e:
        code = e.code
    return code, (capfd.readouterr().err if capfd is not None else "")


def _mask(path):
    """A palette mask's class ids (PIL: OpenCV would give the palette's colours)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def _tree(folder):
    """{name: bytes} of the regular files of a folder (links left out)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink()}


# ----------------------------------------------------------------------------- 1. inputs in the output folder

@pytest.mark.parametrize("task", WRITERS)
def test_second_run_over_its_own_outputs_skips_them_and_overwrites_no_input(ckpts, task, tmp_path, capfd):
    """``--predict out/predictions/*.png --output out``: the inputs are the first run's outputs."""
    out = tmp_path / "out"
    assert _predict(task, ckpts[task], [_image(tmp_path / "a.png", 90)], out, capfd)[0] == 0
    folder = out / "predictions"
    before = _tree(folder)
    inputs = sorted(str(p) for p in folder.glob("*.png"))
    assert inputs
    code, err = _predict(task, ckpts[task], inputs, out, capfd)
    assert code == 2
    after = _tree(folder)
    for path in inputs:  # never read as an input, never written over
        name = os.path.basename(path)
        assert after[name] == before[name], name
        assert f"{path}" in err and "inside the output folder" in err
    assert set(after) == set(before)  # nothing predicted from its own outputs (no a_mask_mask.png ...)
    summary = json.loads((folder / "summary.json").read_text())
    assert sorted(e["image"] for e in summary) == inputs and all("error" in e for e in summary)


def test_inputs_inside_the_output_folder_are_skipped_the_others_predicted(ckpts, tmp_path, capfd):
    out = tmp_path / "out"
    folder = out / "predictions"
    inside = _image(folder / "old.png", 10)
    linked = tmp_path / "link.png"  # outside by name, inside once resolved
    linked.symlink_to(folder / "old.png")
    good = _image(tmp_path / "new.png", 200)
    code, err = _predict("detect", ckpts["detect"], [inside, str(linked), good], out, capfd)
    assert code == 2
    skipped = [line for line in err.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 2 and all("inside the output folder" in line for line in skipped)
    assert inside in skipped[0] and str(linked) in skipped[1]
    assert "2 of 3 inputs" in err and "(the other 1 were predicted)" in err
    assert (folder / "new.json").is_file() and (folder / "old.png").read_bytes() == open(inside, "rb").read()
    assert not (folder / "old.json").exists() and not (folder / "link.json").exists()


def test_a_folder_holding_the_output_folder_is_read_without_it(ckpts, tmp_path, capfd):
    """``--predict photos --output photos/run`` twice: the second run reads the photos, never
    the first run's outputs; the output folder named as an input is named, not read."""
    photos = tmp_path / "photos"
    wanted = sorted([_image(photos / "x.png", 120), _image(photos / "sub" / "y.png", 60, size=(30, 50))])
    out = photos / "run"
    assert _predict("segment", ckpts["segment"], [str(photos)], out, capfd)[0] == 0
    folder = out / "predictions"
    before = _tree(folder)
    assert {"x_mask.png", "y_mask.png", "x_overlay.png", "y_overlay.png"} <= set(before)
    with pytest.warns(UserWarning, match="leaving out 4 files inside the output folder"):
        code, _ = _predict("segment", ckpts["segment"], [str(photos)], out, capfd)
    assert code == 0 and set(_tree(folder)) == set(before)  # no x_mask_mask.png ...
    assert sorted(e["image"] for e in json.loads((folder / "summary.json").read_text())) == wanted
    code, err = _predict("segment", ckpts["segment"], [str(folder)], out, capfd)
    assert code == 2 and "inside the output folder" in err and set(_tree(folder)) == set(before)


# ----------------------------------------------------------------------------- 2. one name, two inputs

NAMES = [("a", "img.png"), ("b", "img.png"), ("c", "img_mask.png"), ("d", "IMG.png"), ("e", "img.jpg"),
         ("f", "summary.png"), ("g", "img_overlay.png"), ("h", "img-2.png"), ("i", ".img.png"),
         ("j", "coco_results.png")]


@pytest.mark.parametrize("task", ALL)
def test_inputs_of_one_name_each_get_their_own_files(ckpts, task, tmp_path, capfd):
    gray = task == "classify"
    # each input its own size: a mask's size says which input it came from
    paths = [_image(tmp_path / sub / name, 20 * i + 10, size=(30 + i, 40 + 2 * i), gray=gray)
             for i, (sub, name) in enumerate(NAMES)]
    code, _ = _predict(task, ckpts[task], paths, tmp_path / "out", capfd)
    assert code == 0
    folder = tmp_path / "out" / "predictions"
    written = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    summary = json.loads((folder / "summary.json").read_text())
    assert [e["image"] for e in summary] == paths
    if task == "classify":  # nothing but the summary, which holds each input's classes
        assert written == ["summary.json"] and all(len(e["top3"]) == 3 and e["files"] == [] for e in summary)
        return
    for i, entry in enumerate(summary):  # the mask an entry names is its input's (not another's picture)
        if "mask" in entry:
            assert _mask(entry["mask"]).shape == (30 + i, 40 + 2 * i), entry
    files = [os.path.basename(f) for e in summary for f in e["files"]]
    assert len(files) == len(set(files)) == len({f.casefold() for f in files})  # also on a case-blind disk
    own = ["summary.json"] + (["coco_images.json", "coco_results.json"] if task in ("detect", "multitask") else [])
    assert sorted(files + own) == written
    for i, entry in enumerate(summary):
        for f in entry["files"]:
            assert os.path.dirname(f) == str(folder)
            if f.endswith(".json"):
                assert json.loads(open(f).read())["image"] == paths[i]
        if "mask" in entry:
            assert entry["mask"] in entry["files"]


def test_a_folder_in_the_way_and_a_very_long_name(ckpts, tmp_path, capfd):
    folder = tmp_path / "out" / "predictions"
    (folder / "img.json").mkdir(parents=True)  # the user's folder: left alone, the input gets img-2.*
    (folder / "img.json" / "keep.txt").write_text("mine")
    paths = [_image(tmp_path / "img.png", 80), _image(tmp_path / ("x" * 240 + ".png"), 160)]
    code, _ = _predict("detect", ckpts["detect"], paths, tmp_path / "out", capfd)
    assert code == 0 and (folder / "img.json" / "keep.txt").read_text() == "mine"
    summary = json.loads((folder / "summary.json").read_text())
    assert [os.path.basename(f) for f in summary[0]["files"]] == ["img-2.json", "img-2.png"]
    assert all(len(os.path.basename(f).encode()) < 128 for f in summary[1]["files"])


def test_the_api_gives_same_named_files_their_own_results(ckpts, tmp_path):
    model = load(ckpts["segment"], device="cpu")
    paths = [_image(tmp_path / "a" / "img.png", 0, size=(20, 24)), _image(tmp_path / "b" / "img.png", 255, (30, 28))]
    results = model.predict(paths, batch_size=1)
    assert [tuple(r["mask"].shape) for r in results] == [(20, 24), (30, 28)]


# ----------------------------------------------------------------------------- 3. links in the output folder

@pytest.mark.parametrize("task", WRITERS)
def test_outputs_replace_links_never_write_through_them(ckpts, task, tmp_path, capfd):
    folder = tmp_path / "out" / "predictions"
    folder.mkdir(parents=True)
    victims = {}
    names = {"detect": ["img.json", "img.png"], "segment": ["img_mask.png", "img_overlay.png"],
             "multitask": ["img.json", "img.png", "img_mask.png"]}[task] + ["summary.json"]
    # the temp names too: a write that goes through a temp file must not open a planted one
    names += [f".{n.rsplit('.', 1)[0]}.tmp{os.getpid()}.{n.rsplit('.', 1)[1]}" for n in names]
    for i, name in enumerate(names):
        victim = tmp_path / "elsewhere" / f"victim{i}"
        victim.parent.mkdir(exist_ok=True)
        victim.write_bytes(b"the user's file")
        (folder / name).symlink_to(victim)
        victims[name] = victim
    code, _ = _predict(task, ckpts[task], [_image(tmp_path / "img.png", 128)], tmp_path / "out", capfd)
    assert code == 0
    for name, victim in victims.items():
        assert victim.read_bytes() == b"the user's file", name
    for name in names[:len(names) // 2]:  # the outputs: new regular files in the folder
        assert (folder / name).is_file() and not (folder / name).is_symlink(), name


def test_pictures_replace_links_too(tmp_path):
    from tasks.engine.viz import save_palette_mask

    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep")
    (tmp_path / "mask.png").symlink_to(victim)
    save_palette_mask(np.zeros((4, 4), np.uint8), tmp_path / "mask.png", 3)
    assert victim.read_bytes() == b"keep" and not (tmp_path / "mask.png").is_symlink()


# ----------------------------------------------------------------------------- 4. streaming

def _count_reads_and_batches(monkeypatch, predictor):
    """Events: ("read", decoded) per file decode (files are read as bytes and decoded from
    memory; ``decoded`` is False for one that does not decode), ("batch", n) per model call."""
    events = []
    real_imdecode = cv2.imdecode

    def imdecode(buf, *a, **k):
        image = real_imdecode(buf, *a, **k)
        events.append(("read", image is not None))
        return image

    real_forward = predictor.forward

    def forward(images):
        events.append(("batch", images.shape[0]))
        return real_forward(images)

    monkeypatch.setattr(cv2, "imdecode", imdecode)
    monkeypatch.setattr(predictor, "forward", forward)
    return events


def _most_held(events):
    """The most images decoded and not yet through the model, at any model call (files that
    do not decode left out)."""
    held = most = 0
    for kind, n in events:
        if kind == "read":
            held += bool(n)
        else:
            most, held = max(most, held), held - n
    return most


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_predict_files_streams_and_keeps_results(ckpts, task, tmp_path, monkeypatch, capfd):
    sizes = [(30, 40), (44, 36), (30, 40), (50, 50), (30, 40), (28, 64), (30, 40)]
    paths = [_image(tmp_path / "in" / f"{i}.png", 30 * i, size=s) for i, s in enumerate(sizes)]
    (tmp_path / "in" / "bad.png").write_text("not an image")
    paths.insert(5, str(tmp_path / "in" / "bad.png"))  # in the third chunk of 2
    predictor = load(ckpts[task], device="cpu")
    alone = [predictor.predict(p)[0] for p in paths if "bad" not in p]
    events = _count_reads_and_batches(monkeypatch, predictor)
    with pytest.raises(ValueError, match=r"1 of 8 inputs could not be read \(the other 7 were predicted\).*bad.png"):
        predict_files(predictor, paths, tmp_path / "out", batch_size=2)
    assert _most_held(events) <= 2  # read, predicted and written two at a time, not all first
    assert sum(1 for kind, _ in events if kind == "read") == 8
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [e["image"] for e in summary] == [p for p in paths if "bad" not in p] + [paths[5]]
    for entry, want, size in zip(summary, alone, sizes):  # what each image gives alone
        if task == "detect":  # (scores agree to float precision: batches of other sizes than before)
            assert (entry["height"], entry["width"]) == size and len(entry["detections"]) == len(want["scores"])
            assert entry["detections"][0]["score"] == pytest.approx(float(want["scores"][0]), abs=2e-4)
        else:
            assert np.array_equal(_mask(entry["mask"]), want["mask"].numpy())


def test_api_streams_paths_and_checks_every_input_first(ckpts, tmp_path, monkeypatch):
    paths = [_image(tmp_path / f"{i}.png", 40 * i, size=(30 + 3 * i, 40)) for i in range(5)]
    predictor = load(ckpts["detect"], device="cpu")
    # what predict() gave before it streamed: every file decoded, then batched by padded shape
    before = predict_images(predictor, [image_from_input(p, 3, "x") for p in paths], 2)
    events = _count_reads_and_batches(monkeypatch, predictor)
    results = predictor.predict(paths, batch_size=2)
    assert _most_held(events) <= 2
    for got, want in zip(results, before, strict=True):  # one padded shape: the same batches, the same bits
        assert torch.equal(got["boxes"], want["boxes"]) and torch.equal(got["scores"], want["scores"])
    # a file that is not an image, anywhere in the list, is named before the model runs
    (tmp_path / "notes.png").write_text("not an image")
    events.clear()
    with pytest.raises(ValueError, match=r"input 5: .*notes.png: cannot decode image"):
        predictor.predict(paths + [str(tmp_path / "notes.png")], batch_size=2)
    assert not [e for e in events if e[0] == "batch"]


# ----------------------------------------------------------------------------- 5. wrong arguments

def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize("call, error, match", [
    (lambda c: load([]), ValueError, r"load\(\[\]\)|empty"),
    (lambda c: load(None), ValueError, "checkpoint path"),
    (lambda c: load(123), ValueError, "checkpoint path"),
    (lambda c: load([123]), ValueError, r"checkpoint 0 .*int"),
    (lambda c: load(""), ValueError, "empty"),
    (lambda c: load(c, task="nope"), ValueError, r"task='nope'.*classify"),
    (lambda c: load(c, task=3), ValueError, r"task=3"),
    (lambda c: load(c, device="cpu", amp="x"), ValueError, r"amp='x'"),
    (lambda c: load(c, device=[1]), ValueError, r"device=\[1\]"),
], ids=["empty-list", "None", "int", "list-of-int", "empty-path", "task-name", "task-int", "amp", "device-list"])
def test_wrong_arguments_to_load_are_one_line(ckpts, call, error, match):
    with pytest.raises(error, match=match) as e:
        call(ckpts["detect"])
    _one_line(e)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
@pytest.mark.parametrize("device", [3, torch.device("cuda"), "cuda:1"])
def test_a_device_this_machine_lacks_is_one_line(ckpts, device):
    with pytest.raises(ValueError, match="CUDA is not available") as e:
        load(ckpts["classify"], device=device)
    _one_line(e)


def _exhausted():
    gen = (x for x in [np.zeros((8, 8, 3), np.uint8)])
    list(gen)
    return gen


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((), {}, ValueError, r"predict\(\) needs inputs"),
    (([],), {}, ValueError, "empty"),
    ((None,), {}, ValueError, "None"),
    (("no/such/file.png",), {}, FileNotFoundError, r"input 0 \(no/such/file.png\): no such file"),
    (("",), {}, ValueError, r"input 0: an empty path"),
    ((b"photo.png",), {}, ValueError, r"input 0: a bytes"),
    ((np.zeros((8, 8, 2), np.uint8),), {}, ValueError, r"2 channel\(s\)"),
    ((np.zeros((8, 8, 3), np.float32),), {}, ValueError, "dtype float32"),
    ((_exhausted(),), {}, ValueError, "used up"),
    ((np.zeros((8, 8, 3), np.uint8),), {"batch_size": 0}, ValueError, "batch_size=0"),
    ((np.zeros((8, 8, 3), np.uint8),), {"batch_size": 1.5}, ValueError, "batch_size=1.5"),
    ((np.zeros((8, 8, 3), np.uint8),), {"batch_size": True}, ValueError, "batch_size=True"),
    ((np.zeros((8, 8, 3), np.uint8),), {"tile": True}, ValueError, r"unknown option\(s\) tile"),
    ((np.zeros((8, 8, 3), np.uint8),), {"score_thresh": "a"}, ValueError, r"score_thresh='a'"),
    ((np.zeros((8, 8, 3), np.uint8),), {"score_thresh": float("nan")}, ValueError, r"score_thresh=nan"),
    ((np.zeros((8, 8, 3), np.uint8),), {"score_thresh": 50}, ValueError, r"score_thresh=50"),
], ids=["nothing", "empty", "None", "missing", "empty-path", "bytes", "2-channel", "float", "exhausted",
        "batch-0", "batch-float", "batch-bool", "unknown-option", "thresh-str", "thresh-nan", "thresh-percent"])
def test_wrong_arguments_to_predict_are_one_line(ckpts, args, kwargs, error, match):
    model = load(ckpts["detect"], device="cpu")
    with pytest.raises(error, match=match) as e:
        model.predict(*args, **kwargs)
    _one_line(e)


@pytest.mark.parametrize("task, options, match", [
    ("classify", {"topk": True}, "topk=True"),
    ("classify", {"topk": 0}, "topk=0"),
    ("segment", {"tile": "yes"}, "tile='yes'"),
    ("segment", {"tile": True, "overlap": "a"}, "overlap='a'"),
    ("segment", {"tile": True, "overlap": 1.0}, "overlap=1.0"),
])
def test_wrong_task_options_are_one_line(ckpts, task, options, match):
    model = load(ckpts[task], device="cpu")
    with pytest.raises(ValueError, match=match) as e:
        model.predict(np.zeros((8, 8) if task == "classify" else (8, 8, 3), np.uint8), **options)
    _one_line(e)


def test_right_arguments_of_other_types_still_work(ckpts):
    model = load(ckpts["classify"], device=torch.device("cpu"))
    images = (np.full((8, 8), v, np.uint8) for v in (0, 255))  # a generator of inputs
    results = model.predict(images, batch_size=np.int64(1), topk=np.int64(2))
    assert len(results) == 2 and all(len(r["top"]) == 2 for r in results)


# ----------------------------------------------------------------------------- 6. NaN / inf weights

def _poisoned(ckpts, tmp_path, task, key_part, value, entry="model"):
    ckpt = torch.load(ckpts[task], weights_only=True)
    if entry == "ema":
        ckpt["ema"] = {k: v.clone() for k, v in ckpt["model"].items()}
    state = ckpt[entry]
    key = next(k for k in state if key_part in k)
    state[key] = state[key].clone()
    state[key].view(-1)[0] = value
    path = tmp_path / f"{task}-{entry}-poisoned.pt"
    torch.save(ckpt, path)
    return path, key


@pytest.mark.parametrize("task, key_part, value, entry", [
    ("classify", "conv1.weight", float("nan"), "model"),
    ("detect", "running_var", float("inf"), "model"),
    ("segment", "running_mean", float("-inf"), "ema"),  # the EMA is what predicts
    ("multitask", "running_var", -1.0, "model"),        # a negative variance: NaN after the sqrt
])
def test_a_checkpoint_holding_nan_or_inf_is_refused_naming_file_and_tensor(ckpts, tmp_path, task, key_part, value,
                                                                          entry):
    path, key = _poisoned(ckpts, tmp_path, task, key_part, value, entry)
    with pytest.raises(ValueError, match=rf"{path}.*{key}") as e:
        load(path, device="cpu")
    _one_line(e)
    with pytest.raises(ValueError, match=key):
        Predictor.from_checkpoint(path, "cpu")


def test_the_cli_and_the_merged_model_refuse_it_too(ckpts, tmp_path, capfd):
    path, key = _poisoned(ckpts, tmp_path, "detect", "cls_logits", float("nan"))
    code, err = _predict("detect", path, [_image(tmp_path / "a.png", 50)], tmp_path / "out", capfd)
    assert code == 2 and key in err and "NaN" in err
    assert not (tmp_path / "out" / "predictions").exists()  # nothing served
    with pytest.raises(ValueError, match=rf"{path}.*{key}"):
        load([path, ckpts["segment"]], device="cpu")


def test_checkpoint_normalisation_must_be_finite(ckpts, tmp_path):
    ckpt = torch.load(ckpts["detect"], weights_only=True)
    ckpt["meta"]["std"] = [0.0, 1.0, 1.0]
    torch.save(ckpt, tmp_path / "std0.pt")
    with pytest.raises(ValueError, match=r"std0.pt.*std") as e:
        load(tmp_path / "std0.pt", device="cpu")
    _one_line(e)


class NaNLogits(nn.Module):
    def forward(self, x):
        return torch.full((x.shape[0], 3), float("nan"))


def test_a_model_whose_output_is_nan_serves_nothing(ckpts):
    meta = load(ckpts["classify"], device="cpu").meta
    predictor = Predictor(TASKS["classify"], NaNLogits(), meta, "cpu")
    with pytest.raises(ValueError, match="NaN or inf") as e:
        predictor.predict(np.zeros((8, 8), np.uint8))
    _one_line(e)


def test_file_names_that_are_not_utf8_are_predicted(ckpts, tmp_path):
    folder = os.path.join(os.fsencode(tmp_path), b"in")
    os.mkdir(folder)
    name = os.path.join(folder, b"\xff\xfe.png")
    ok, data = cv2.imencode(".png", np.full((30, 40, 3), 90, np.uint8))  # cv2.imwrite would crash on the name
    data.tofile(os.fsdecode(name))
    # in a new process (a fork of this one, with torch's threads running, can deadlock): a
    # segfault there (cv2.imread / cv2.haveImageReader on such a name) fails the test, not the
    # session; one process for both tasks (each start imports torch: ~5 s on 2 cores)
    outs = {task: str(tmp_path / task) for task in ("detect", "segment")}
    code = (f"import os, sys\nfrom tasks import load\nfrom tasks.engine.predict import predict_files\n"
            f"name = os.fsdecode({name!r})\n"
            f"for ckpt, out in {[(str(ckpts[t]), o) for t, o in outs.items()]!r}:\n"
            f"    p = load(ckpt, device='cpu')\n"
            f"    assert len(p.predict(name)) == 1\n    predict_files(p, [name], out, batch_size=1)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, errors="backslashreplace", timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    for out in outs.values():
        summary = json.loads((Path(out) / "summary.json").read_text())
        # the name as Python's os.fsdecode gives it: os.fsencode of it opens the file again
        assert len(summary) == 1 and os.fsencode(summary[0]["image"]) == name


def test_predict_without_weights_never_picks_a_model_silently(tmp_path, ckpts, capfd, monkeypatch):
    """No --weights: refused with one line (naming the newest run as a hint), unless --output
    names a run folder, whose best.pt is used and named on the console."""
    import shutil

    from tasks import classify

    monkeypatch.setenv("ONETRUNK_RUNS", str(tmp_path / "runs"))
    image = _image(tmp_path / "in" / "a.png", 90, gray=True)
    newest = tmp_path / "runs" / "classify" / "fashion_mnist_quick"  # a trained run of the default recipe
    newest.mkdir(parents=True)
    for name in ("best.pt", "last.pt"):
        shutil.copy(ckpts["classify"], newest / name)

    def predict(*extra):
        code = 0
        try:
            run_cli(lambda: classify.main(["--predict", image, "--device", "cpu", *extra]))
        except SystemExit as e:
            code = e.code
        return code, capfd.readouterr()
    code, out = predict()
    assert code == 2 and "--predict needs --weights CKPT" in out.err and len(out.err.strip().splitlines()) == 1
    assert f"--weights {newest / 'best.pt'}" in out.err and not (newest / "predictions").exists()
    run = tmp_path / "myrun"
    run.mkdir()
    shutil.copy(ckpts["classify"], run / "best.pt")
    code, out = predict("--output", str(run))
    assert code == 0 and f"the run folder's model, {run / 'best.pt'}" in out.out
