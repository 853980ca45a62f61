"""``--predict`` and the Python API on what users have: folders, glob patterns, ``.txt`` lists
and videos, mixed in one call, for every task; one JSON for the call (and COCO results for
detection), pictures on request, one line for an argument that names nothing usable, and
memory that stays bounded for a video of any length."""
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

from tasks import load
from tasks.engine import predict as predict_module
from tasks.engine.inputs import Video, expand
from tasks.engine.predict import predict_files
from tasks.engine.runner import run_cli
from tests.fakes import write_flat_image

ALL = ["classify", "detect", "segment", "multitask"]


_image = write_flat_image


def _video(path, frames=5, size=(32, 48)):
    """A small MJPG .avi (frame i all of value 40 * i), or the test is skipped with the reason."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (w, h))
    if not writer.isOpened():
        pytest.skip(f"this OpenCV build ({cv2.__version__}) cannot write an MJPG .avi: no video codec to test with")
    for i in range(frames):
        writer.write(np.full((h, w, 3), 40 * i, np.uint8))
    writer.release()
    cap = cv2.VideoCapture(str(path))
    readable = cap.isOpened() and cap.read()[0]
    cap.release()
    if not readable:
        pytest.skip(f"this OpenCV build ({cv2.__version__}) cannot read back the MJPG .avi it wrote")
    return str(path)


def _cli(task, inputs, out, capfd, *extra, weights=None, ckpts=None):
    """``python -m tasks.<task> --predict ...``: (exit code, stdout, stderr)."""
    module = importlib.import_module(f"tasks.{task}")
    argv = ["--predict", *map(str, inputs), "--weights", str(weights or ckpts[task]), "--device", "cpu",
            "--output", str(out), *extra]
    code = 0
    try:
        run_cli(lambda: module.main(argv))
    except SystemExit as e:
        code = e.code
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def _summary(out):
    return json.loads((Path(out) / "predictions" / "summary.json").read_text())


# ----------------------------------------------------------------------------- folders, patterns, lists

def test_a_folder_is_read_recursively_without_hidden_entries_and_names_what_it_skips(ckpts, tmp_path, capfd):
    photos = tmp_path / "photos"
    wanted = sorted([_image(photos / "a.png", 10), _image(photos / "deep" / "er" / "b.jpg", 90),
                     _image(photos / "c.PNG", 200)])
    _image(photos / ".hidden.png", 30)                 # hidden: a tool's leftover, never an input
    _image(photos / ".cache" / "d.png", 30)            # inside a hidden folder
    (photos / "notes.md").write_text("not an image")   # named in one warning
    (photos / "anim.gif").write_bytes(b"GIF89a")
    with pytest.warns(UserWarning, match=r"skipping 2 files .*anim\.gif, notes\.md") as record:
        code, _, err = _cli("detect", [photos], tmp_path / "out", capfd, ckpts=ckpts)
    assert code == 0, err
    assert len([w for w in record if "skipping" in str(w.message)]) == 1
    assert [e["image"] for e in _summary(tmp_path / "out")] == wanted
    # the API reads the same folder the same way, in the same order
    model = load(ckpts["detect"], device="cpu")
    with pytest.warns(UserWarning, match="skipping 2 files"):
        names = [name for name, _ in model.stream(str(photos), batch_size=2)]
    assert names == wanted


def test_a_quoted_glob_pattern_spans_folders(ckpts, tmp_path, capfd):
    photos = tmp_path / "photos"
    wanted = sorted([_image(photos / "x.jpg", 10), _image(photos / "2024" / "y.jpg", 90),
                     _image(photos / "2024" / "may" / "z.jpg", 150)])
    _image(photos / "2024" / "other.png", 10)  # not matched by *.jpg
    code, _, err = _cli("segment", [f"{photos}/**/*.jpg"], tmp_path / "out", capfd, ckpts=ckpts)
    assert code == 0, err
    assert [e["image"] for e in _summary(tmp_path / "out")] == wanted
    assert len(load(ckpts["segment"], device="cpu").predict(str(photos / "*" / "*.jpg"))) == 1


def test_a_list_file_reads_paths_relative_to_itself_and_ignores_comments(ckpts, tmp_path, capfd, monkeypatch):
    data = tmp_path / "data"
    a, b = _image(data / "img" / "a.png", 10, gray=True), _image(tmp_path / "elsewhere" / "b.png", 50, gray=True)
    sub = sorted([_image(data / "more" / "c.png", 90, gray=True), _image(data / "more" / "d.png", 130, gray=True)])
    (data / "list.txt").write_text(f"# photos to check\n\nimg/a.png\n  {b}  \n# more/ignored.png\nmore\n\r\n")
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative to the list file, not to the working folder
    code, out, err = _cli("classify", [data / "list.txt"], tmp_path / "out", capfd, ckpts=ckpts)
    assert code == 0, err
    assert [e["image"] for e in _summary(tmp_path / "out")] == [str(data / "img" / "a.png"), b, *sub]
    assert a in out and all(len(e["top3"]) == 3 for e in _summary(tmp_path / "out"))
    assert len(load(ckpts["classify"], device="cpu").predict(str(data / "list.txt"))) == 4


# ----------------------------------------------------------------------------- videos

@pytest.mark.parametrize("task", ALL)
def test_a_video_is_predicted_frame_by_frame_for_every_task(ckpts, task, tmp_path, capfd):
    clip = _video(tmp_path / "clip.avi")
    model = load(ckpts[task], device="cpu")
    frames = model.read(clip)
    assert len(frames) == 5 and frames[0].shape == (32, 48, 1 if task == "classify" else 3)
    assert [int(f.mean()) for f in frames] == pytest.approx([0, 40, 80, 120, 160], abs=4)  # in order
    results = model.predict(clip, batch_size=2)
    assert len(results) == 5
    for got, frame in zip(results, frames):  # a frame's result is the result of that frame as an image
        want = model.predict(frame)[0]
        key = {"classify": "probs", "detect": "scores", "segment": "mask"}.get(task)
        if key is not None:
            torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=0)
    code, _, err = _cli(task, [clip], tmp_path / "out", capfd, "--video-stride", "2", ckpts=ckpts)
    assert code == 0, err
    summary = _summary(tmp_path / "out")
    assert [(e["image"], e["video"], e["frame"]) for e in summary] == [
        (f"{clip}#frame{n}", clip, n) for n in (0, 2, 4)]
    if task != "classify":  # each frame's files carry its name
        assert all(os.path.basename(f).startswith(f"clip_frame{e['frame']}") for e in summary for f in e["files"])


def test_a_video_is_decoded_as_it_is_predicted(ckpts, tmp_path, monkeypatch):
    """Never more than batch_size frames decoded and not yet through the model; the first
    results come before the last frame is decoded."""
    clip = Video(_video(tmp_path / "clip.avi", frames=7), stride=1)
    model = load(ckpts["segment"], device="cpu")
    events = []
    real_capture, real_forward = cv2.VideoCapture, model.forward

    class CountingCapture:
        def __init__(self, *args):
            self.cap = real_capture(*args)

        def read(self):
            ok, frame = self.cap.read()
            if ok:
                events.append(("read", 1))
            return ok, frame

        def __getattr__(self, name):
            return getattr(self.cap, name)

    def forward(images):
        events.append(("batch", images.shape[0]))
        return real_forward(images)

    monkeypatch.setattr(cv2, "VideoCapture", CountingCapture)
    monkeypatch.setattr(model, "forward", forward)
    stream = model.stream([clip], batch_size=2)
    name, _ = next(stream)
    assert name.endswith("#frame0") and sum(n for kind, n in events if kind == "read") == 2
    assert len([name for name, _ in stream]) == 6
    held = most = 0
    for kind, n in events:
        if kind == "read":
            held += n
        else:
            most, held = max(most, held), held - n
    assert most <= 2 and held == 0 and sum(n for kind, n in events if kind == "read") == 7


def test_a_video_file_name_that_is_not_utf8_is_one_error_not_a_crash(tmp_path):
    name = os.path.join(os.fsencode(tmp_path), b"\xff.avi")
    with open(name, "wb") as f:
        f.write(b"RIFF")
    # in a new process: cv2.VideoCapture segfaults on such a name, which must fail the test, not the session
    code = (f"import os\nfrom tasks.engine.inputs import expand\ntry:\n    expand([os.fsdecode({name!r})])\n"
            f"except ValueError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, errors="backslashreplace", timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "\\xff.avi: OpenCV cannot open a video whose file name is not valid UTF-8" in proc.stdout


# ----------------------------------------------------------------------------- mixed, results, progress

def test_mixed_inputs_in_one_call_keep_every_output_distinct(ckpts, tmp_path, capfd):
    """A file, a folder, a pattern, a list and a video in one call; a frame and a file whose
    names collide (``clip_frame0``) still get distinct outputs."""
    one = _image(tmp_path / "one.png", 10)
    folder = sorted([_image(tmp_path / "dir" / "clip_frame0.png", 60), _image(tmp_path / "dir" / "k.png", 90)])
    pattern = [_image(tmp_path / "pat" / "p.jpg", 120)]
    listed = _image(tmp_path / "listed" / "one.png", 150)  # the same name as the first input
    (tmp_path / "listed" / "inputs.txt").write_text("one.png\n")
    clip = _video(tmp_path / "clip.avi", frames=3)
    inputs = [one, tmp_path / "dir", f"{tmp_path}/pat/*.jpg", tmp_path / "listed" / "inputs.txt", clip]
    code, _, err = _cli("multitask", inputs, tmp_path / "out", capfd, ckpts=ckpts)
    assert code == 0, err
    summary = _summary(tmp_path / "out")
    assert [e["image"] for e in summary] == [one, *folder, *pattern, listed, *(f"{clip}#frame{n}" for n in range(3))]
    files = [os.path.basename(f) for e in summary for f in e["files"]]
    assert len(files) == len(set(files)) == 3 * len(summary)  # json, picture, mask each
    # the API takes the same mix, with images in memory among them
    model = load(ckpts["multitask"], device="cpu")
    names = [name for name, _ in model.stream([np.zeros((20, 30, 3), np.uint8), *map(str, inputs)])]
    assert names == ["input 0", one, *folder, *pattern, listed, *(f"{clip}#frame{n}" for n in range(3))]


@pytest.mark.parametrize("task", ["detect", "multitask"])
def test_detections_come_as_coco_results_that_pycocotools_loads(ckpts, task, tmp_path, capfd):
    from pycocotools.coco import COCO

    paths = [_image(tmp_path / "in" / f"{i}.png", 40 * i + 20, size=(30 + 8 * i, 50)) for i in range(3)]
    clip = _video(tmp_path / "in" / "v.avi", frames=2)
    code, _, err = _cli(task, [tmp_path / "in"], tmp_path / "out", capfd, ckpts=ckpts)
    assert code == 0, err
    folder = tmp_path / "out" / "predictions"
    summary = _summary(tmp_path / "out")
    gt = COCO(str(folder / "coco_images.json"))
    dt = gt.loadRes(str(folder / "coco_results.json"))
    images = gt.dataset["images"]
    assert [im["file_name"] for im in images] == paths + [f"{clip}#frame{n}" for n in range(2)]
    assert [(im["width"], im["height"]) for im in images[:3]] == [(50, 30), (50, 38), (50, 46)]
    assert images[3]["video"] == clip and images[4]["frame"] == 1
    names = {c["id"]: c["name"] for c in gt.dataset["categories"]}
    assert names == {1: "shirt", 5: "boot", 9: "bag"}  # the dataset's own category ids
    total = 0
    for image, entry in zip(images, summary, strict=True):
        anns = dt.loadAnns(dt.getAnnIds(imgIds=[image["id"]]))
        assert len(anns) == len(entry["detections"])
        for ann, det in zip(anns, entry["detections"]):
            x1, y1, x2, y2 = det["box_xyxy"]
            assert ann["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.02)
            assert names[ann["category_id"]] == det["class"] and ann["score"] == pytest.approx(det["score"], abs=1e-4)
        total += len(anns)
    assert 0 < total == len(json.loads((folder / "coco_results.json").read_text()))


def test_the_progress_bar_counts_files_and_frames(ckpts, tmp_path, monkeypatch):
    bars = []

    class Bar:
        def __init__(self, iterable, *, total=None, desc="", quiet=False):
            self.total, self.quiet, self.n = total, quiet, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            self.n += n

    monkeypatch.setattr(predict_module, "progress_bar", Bar)
    paths = [_image(tmp_path / f"{i}.png", 50 * i) for i in range(3)]
    clip = _video(tmp_path / "clip.avi", frames=5)
    model = load(ckpts["detect"], device="cpu")
    model.predict([*paths, clip], batch_size=2, progress=True)
    assert (bars[-1].total, bars[-1].n, bars[-1].quiet) == (8, 8, False)
    model.predict([*paths, clip], video_stride=2)  # off unless asked for
    assert (bars[-1].total, bars[-1].n, bars[-1].quiet) == (6, 6, True)
    predict_files(model, [*paths, clip], tmp_path / "out", batch_size=2, progress=True)
    assert (bars[-1].total, bars[-1].n, bars[-1].quiet) == (8, 8, False)


def test_the_real_bar_stays_off_when_stderr_is_not_a_terminal(ckpts, tmp_path, capfd):
    code, _, err = _cli("detect", [_image(tmp_path / "a.png", 90)], tmp_path / "out", capfd, ckpts=ckpts)
    assert code == 0 and "predict" not in err and "it/s" not in err


@pytest.mark.parametrize("task, kept", [
    ("classify", []), ("detect", []), ("segment", ["a_mask.png"]), ("multitask", ["a_mask.png"])])
def test_no_images_writes_the_json_and_the_masks_only(ckpts, task, kept, tmp_path, capfd, monkeypatch):
    image = _image(tmp_path / "a.png", 90, gray=task == "classify")

    def drawn(*args, **kwargs):
        raise AssertionError("--no-images drew a picture")

    for name in ("tasks.detect", "tasks.segment", "tasks.multitask"):  # nothing is drawn to be deleted later
        module = importlib.import_module(name)
        for attr in ("draw_detection_grid", "draw_segmentation_grid", "_draw"):
            if hasattr(module, attr):
                monkeypatch.setattr(module, attr, drawn)
    code, out, err = _cli(task, [image], tmp_path / "out", capfd, "--no-images", ckpts=ckpts)
    assert code == 0, err
    folder = tmp_path / "out" / "predictions"
    own = ["summary.json"] + (["coco_images.json", "coco_results.json"] if task in ("detect", "multitask") else [])
    assert sorted(p.name for p in folder.iterdir()) == sorted(own + kept)
    (entry,) = _summary(tmp_path / "out")
    assert [os.path.basename(f) for f in entry["files"]] == kept and image not in out  # no line per image
    assert f"done: 1 image -> {folder / 'summary.json'}" in out  # the closing line, also without pictures
    if kept:
        assert entry["mask"] == str(folder / "a_mask.png")


# ----------------------------------------------------------------------------- arguments that name nothing

def _junk_video(tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    return tmp_path / "broken.mp4"


def _empty_folder(tmp_path):
    (tmp_path / "empty" / ".cache").mkdir(parents=True)
    (tmp_path / "empty" / ".DS_Store").write_text("x")
    return tmp_path / "empty"


def _list_with_a_missing_entry(tmp_path):
    _image(tmp_path / "there.png", 10)
    (tmp_path / "list.txt").write_text("there.png\n# a comment\n\nnot-there.png\n")
    return tmp_path / "list.txt"


@pytest.mark.parametrize("make, error, line", [
    (lambda t: f"{t}/nothing/*.jpg", FileNotFoundError,
     r"nothing/\*\.jpg: no such file, and as a pattern it matches no file"),
    (_empty_folder, ValueError, r"empty: a folder with no image or video files"),
    (_list_with_a_missing_entry, FileNotFoundError, r"list\.txt line 4: not-there\.png: no such file"),
    (_junk_video, ValueError, r"broken\.mp4: cannot read this video"),
], ids=["pattern", "empty-folder", "list-entry", "video"])
def test_an_argument_that_names_nothing_usable_is_one_line(ckpts, tmp_path, capfd, make, error, line):
    import re

    argument = make(tmp_path)
    good = _image(tmp_path / "good.png", 100)
    code, out, err = _cli("detect", [good, argument], tmp_path / "out", capfd, ckpts=ckpts)
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(line, err), err
    assert err.startswith("error: ") and not (tmp_path / "out" / "predictions").exists()  # nothing predicted
    with pytest.raises(error, match=line) as e:
        load(ckpts["detect"], device="cpu").predict([good, str(argument)])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("argv, line", [
    (["--video-stride", "2"], "--video-stride and --images / --no-images go with --predict"),
    (["--no-images"], "go with --predict"),
])
def test_predict_flags_without_predict_are_refused(ckpts, tmp_path, capfd, argv, line):
    from tasks import detect

    with pytest.raises(SystemExit) as e:
        run_cli(lambda: detect.main(["--device", "cpu", "--output", str(tmp_path / "run"), *argv]))
    err = capfd.readouterr().err
    assert e.value.code == 2 and line in err and len(err.strip().splitlines()) == 1


def test_a_video_stride_below_one_is_refused(ckpts, tmp_path, capfd):
    code, _, err = _cli("detect", [_image(tmp_path / "a.png", 9)], tmp_path / "out", capfd, "--video-stride", "0",
                        ckpts=ckpts)
    assert code == 2 and "--video-stride 0: expected a positive number" in err
    with pytest.raises(ValueError, match="video_stride=0"):
        load(ckpts["detect"], device="cpu").predict(str(tmp_path / "a.png"), video_stride=0)


def test_expanding_decodes_nothing(tmp_path, monkeypatch):
    """Expansion lists paths and opens each video once (its first frame); images are not read."""
    for i in range(20):
        _image(tmp_path / "many" / f"{i:02d}.png", i)
    _video(tmp_path / "many" / "v.avi", frames=4)
    monkeypatch.setattr(cv2, "imdecode", lambda *a, **k: pytest.fail("an image was decoded while expanding"))
    items = expand([tmp_path / "many"], video_stride=3)
    assert len(items) == 21 and isinstance(items[-1], Video) and items[-1].expected() == 2


def test_predict_reads_batch_size_images_at_a_time(ckpts, tmp_path, capfd, monkeypatch):
    from tasks.engine.predict import Predictor

    seen, real = [], Predictor.predict_items

    def recording(self, items, batch_size, *args, **kwargs):
        seen.append(batch_size)
        return real(self, items, batch_size, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict_items", recording)
    images = [_image(tmp_path / f"{i}.png", 60 + i) for i in range(5)]
    code, _, err = _cli("detect", images, tmp_path / "out", capfd, "--batch-size", "2", ckpts=ckpts)
    assert code == 0, err
    assert seen == [2] and len(_summary(tmp_path / "out")) == 5
