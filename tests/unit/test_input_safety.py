"""Bad input gets one clear line, never a broken result: malformed COCO masks, truncated or
oversized images, hidden and unsupported files, non-UTF-8 file names, YAML traps and unknown
weights names. Tiny inputs only; nothing touches the network."""
import gzip
import json
import os
import struct
import time
import warnings
import zlib

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from backbones import pretrained
from backbones.pretrained import resolve, weights_info
from backbones.weights import read_checkpoint
from tasks.classify import ClassifyConfig
from tasks.data.coco import CocoDetection
from tasks.data.fashion_mnist import IDXError, read_idx
from tasks.data.folders import ImageFolderDataset, collate_skip_bad
from tasks.data import images as images_module
from tasks.data.images import ImageReadError, image_from_input, read_image, read_mask
from tasks.data.segmentation import CocoSemanticDataset, MaskFolderDataset
from tasks.data.voc import voc_coco
from tasks.engine.config import ConfigError, apply_overrides, load_config, read_yaml
from tests.fakes import in_child

H, W = 12, 16


def _png(path, h=H, w=W, channels=3, value=90):
    img = np.full((h, w, channels) if channels > 1 else (h, w), value, np.uint8)
    ok, data = cv2.imencode(".png", img)  # not cv2.imwrite: a non-UTF-8 name would crash it
    with open(path, "wb") as f:
        f.write(data.tobytes())
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(path, w, h):
    """A PNG of a few hundred bytes whose header says w x h gray pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 4096))
                     + _chunk(b"IEND", b""))
    return path


def _one_line(message: str) -> None:
    assert "\n" not in message, message
    message.encode("utf-8")  # printable: no lone surrogates from undecodable file names


# ----------------------------------------------------------------------------- 1. COCO segmentation

def _square_rle(h=H, w=W):
    m = np.zeros((h, w), np.uint8, order="F")
    m[2:6, 3:9] = 1
    rle = mask_utils.encode(m)
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def _coco(tmp_path, segmentation, **ann):
    _png(tmp_path / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "width": W, "height": H}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [3, 2, 6, 4], "iscrowd": 0,
                             "segmentation": segmentation, **ann}],
            "categories": [{"id": 1, "name": "thing"}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


GOOD = _square_rle()
BAD_SEGMENTATIONS = [
    ({"size": [H, W], "counts": "abc"}, "RLE"),                         # not what the encoder writes
    ({"size": [H, W], "counts": GOOD["counts"] + "1"}, "RLE"),          # one run too many
    ({"size": [H, W], "counts": GOOD["counts"][:-1]}, "RLE"),           # cut short
    ({"size": [H, W], "counts": "0" + GOOD["counts"]}, "RLE"),          # shifted
    ({"size": [H, W], "counts": "~~~"}, "RLE"),                         # outside the alphabet
    ({"size": [H, W], "counts": "\u00e9\u00e9"}, "RLE"),                # not ASCII
    ({"size": [H, W], "counts": "O"}, "RLE"),                           # ends inside a number
    ({"size": [float(H), float(W)], "counts": GOOD["counts"]}, "size"),
    ({"size": [H, W, 3], "counts": GOOD["counts"]}, "size"),
    ({"size": [True, W], "counts": GOOD["counts"]}, "size"),
    ({"size": [H, W], "counts": None}, "counts"),
    ({"size": [H, W], "counts": [H * W - 1, 2]}, "counts"),
    ({"size": [H, W], "counts": [H * W, -1, 1]}, "counts"),
    ([[1, 1, 5, 1, 5, 5, 1]], "polygon"),                                # odd number of coordinates
    ([[1, 1, 5, 5]], "polygon"),                                         # two points
    ([[1, 1, 5, 1, 5, float("nan")]], "polygon"),
    ([[1, 1, 5e12, 1, 5, 5]], "outside"),                                # would rasterise for ever
    ([1, 1, 5, 1, 5, 5], "polygon"),                                     # not a list of polygons
    ("1 1 5 1 5 5", "segmentation"),
]


@pytest.mark.parametrize("segmentation, what", BAD_SEGMENTATIONS)
@pytest.mark.parametrize("dataset", [CocoSemanticDataset, CocoDetection])
def test_malformed_segmentation_is_named_at_load_time(tmp_path, dataset, segmentation, what):
    ann = _coco(tmp_path, segmentation)
    with pytest.raises(ValueError, match=rf"ann\.json: malformed annotation id 7: .*{what}.*skip_bad=true drops") as err:
        dataset(ann, tmp_path)
    _one_line(str(err.value))
    with pytest.warns(UserWarning, match="1 malformed"):  # skip_bad: dropped and counted
        ds = dataset(ann, tmp_path, skip_bad=True)
    assert ds.stats["malformed"] == 1


def test_crowd_rle_counts_are_checked_too(tmp_path):
    ann = _coco(tmp_path, {"size": [H, W], "counts": "abc"}, iscrowd=1)
    with pytest.raises(ValueError, match="malformed annotation id 7: .*RLE"):
        CocoSemanticDataset(ann, tmp_path)


@pytest.mark.parametrize("fill", ["square", "empty", "full", "starts_inside"])
def test_valid_rle_passes_and_paints_what_pycocotools_decodes(tmp_path, fill):
    m = np.zeros((H, W), np.uint8, order="F")
    if fill == "square":
        m[2:6, 3:9] = 1
    elif fill == "full":
        m[:] = 1
    elif fill == "starts_inside":
        m[:5, :2] = 1
    rle = mask_utils.encode(m)
    ann = _coco(tmp_path, {"size": rle["size"], "counts": rle["counts"].decode()})
    ds = CocoSemanticDataset(ann, tmp_path)
    np.testing.assert_array_equal(ds.semantic_mask(0), m)
    assert len(CocoDetection(ann, tmp_path)) == 1


def test_rle_check_agrees_with_pycocotools_on_random_masks(tmp_path):
    from tasks.data.coco import segmentation_problem
    rng = np.random.default_rng(0)
    for i in range(20):
        h, w = rng.integers(1, 70, 2)
        m = np.asfortranarray(rng.random((h, w)) < rng.random())
        rle = mask_utils.encode(m.astype(np.uint8))
        assert segmentation_problem(rle, int(h), int(w)) is None
        assert segmentation_problem({**rle, "counts": rle["counts"].decode()}, int(h), int(w)) is None
        assert segmentation_problem(rle, int(h) + 1, int(w)) is not None


@pytest.mark.parametrize("text, match", [
    ('{"images": [], "images": [], "annotations": [], "categories": []}', "key 'images' appears twice"),
    ('{"images": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
])
def test_coco_json_duplicate_keys_and_deep_nesting(tmp_path, text, match):
    (tmp_path / "ann.json").write_text(text)
    with pytest.raises(ValueError, match=rf"ann\.json: .*{match}") as err:
        CocoDetection(tmp_path / "ann.json", tmp_path)
    _one_line(str(err.value))


def test_coco_file_name_with_a_nul_byte_is_named(tmp_path):
    ann = _coco(tmp_path, [])
    data = json.loads(ann.read_text())
    data["images"][0]["file_name"] = "a\u0000.png"
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"ann\.json: image id 1: 'file_name' is 'a\\x00\.png'"):
        CocoDetection(ann, tmp_path)


def test_detection_accepts_no_or_empty_segmentation(tmp_path):
    for segmentation in ([], [[]], [[1, 1, 5, 1, 5, 5]], GOOD):
        ds = CocoDetection(_coco(tmp_path, segmentation), tmp_path)
        assert ds.stats["annotations"] == 1
    data = json.loads((tmp_path / "ann.json").read_text())
    del data["annotations"][0]["segmentation"]
    (tmp_path / "ann.json").write_text(json.dumps(data))
    assert CocoDetection(tmp_path / "ann.json", tmp_path).stats["annotations"] == 1


# ----------------------------------------------------------------------------- 2. files: truncated, hidden, GIF

def _encoded(ext, **kw):
    y, x = np.mgrid[0:40, 0:48]
    img = np.stack([x * 5, y * 6, (x + y) * 3], -1).astype(np.uint8)  # smooth: a realistic JPEG
    ok, data = cv2.imencode(ext, img, *kw.values())
    return data.tobytes()


@pytest.mark.parametrize("ext, cut", [(".jpg", 0.6), (".jpg", -2), (".png", 0.6), (".png", -12)])
def test_truncated_image_is_refused_naming_the_file(tmp_path, ext, cut):
    data = _encoded(ext)
    path = tmp_path / f"cut{ext}"
    path.write_bytes(data[:int(len(data) * cut)] if cut > 0 else data[:cut])
    with pytest.raises(ImageReadError, match=rf"cut\{ext}: .*truncated") as err:
        read_image(path)
    _one_line(str(err.value))
    (tmp_path / f"whole{ext}").write_bytes(data)
    assert read_image(tmp_path / f"whole{ext}").shape == (40, 48, 3)


def test_progressive_jpeg_and_trailing_bytes_still_read(tmp_path):
    data = _encoded(".jpg", params=[cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    (tmp_path / "p.jpg").write_bytes(data + b"\0" * 7)  # some cameras pad after the end marker
    ref = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    np.testing.assert_array_equal(read_image(tmp_path / "p.jpg"), ref)


def _class_tree(root):
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            _png(root / name / f"{i}.png")
    return root


def test_truncated_image_skipped_and_counted_with_skip_bad(tmp_path):
    root = _class_tree(tmp_path / "tree")
    data = _encoded(".jpg")
    (root / "dog" / "cut.jpg").write_bytes(data[:len(data) // 2])
    ds = ImageFolderDataset(root, skip_bad=True)
    idx = [os.path.basename(p) for p, _ in ds.samples].index("cut.jpg")
    images, labels, skipped = collate_skip_bad([ds[idx], ds[0]])
    assert [b.path for b in skipped] == [str(root / "dog" / "cut.jpg")] and "truncated" in skipped[0].reason
    assert images.shape[0] == 1
    with pytest.raises(ImageReadError, match="cut.jpg: .*truncated.*data.skip_bad=true"):
        ImageFolderDataset(root)[idx]


def test_hidden_entries_are_ignored(tmp_path):
    root = _class_tree(tmp_path / "tree")
    (root / ".ipynb_checkpoints").mkdir()
    _png(root / ".ipynb_checkpoints" / "0-checkpoint.png")
    (root / "cat" / ".ipynb_checkpoints").mkdir()
    _png(root / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png")
    (root / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
    (root / "dog" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # hidden files are not even worth a warning
        ds = ImageFolderDataset(root)
        val = ImageFolderDataset(root, classes=["cat", "dog"])
    assert ds.classes == val.classes == ["cat", "dog"] and len(ds) == 4
    assert not any("/." in p for p, _ in ds.samples)
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    _png(images / "a.png")
    _png(masks / "a.png", channels=1, value=1)
    (images / "._a.png").write_bytes(b"\x00\x05\x16\x07")
    assert len(MaskFolderDataset(images, masks, num_classes=2)) == 1


def test_unsupported_files_are_skipped_with_one_warning_naming_them(tmp_path):
    from PIL import Image
    root = _class_tree(tmp_path / "tree")
    for i in range(5):
        Image.new("RGB", (8, 8)).save(root / "cat" / f"anim{i}.gif")
    with pytest.warns(UserWarning) as record:
        ds = ImageFolderDataset(root)
    messages = [str(w.message) for w in record if "skipp" in str(w.message)]
    assert len(messages) == 1 and "5 files" in messages[0] and "anim0.gif" in messages[0], messages
    _one_line(messages[0])
    assert len(ds) == 4
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    _png(images / "a.png")
    _png(masks / "a.png", channels=1, value=1)
    Image.new("RGB", (8, 8)).save(images / "b.gif")
    with pytest.warns(UserWarning, match=r"b\.gif"):
        assert len(MaskFolderDataset(images, masks, num_classes=2)) == 1


# ----------------------------------------------------------------------------- 3. YAML

@pytest.mark.parametrize("text, key, lines", [
    ("train:\n  epochs: 3\n  batch_size: 4\n  epochs: 5\n", "epochs", (2, 4)),
    ("model: {depth: 18}\ndata: {}\nmodel: {depth: 50}\n", "model", (1, 3)),
])
def test_duplicate_yaml_keys_are_refused(tmp_path, text, key, lines):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"dup\.yaml: .*duplicate key '{key}'.* {lines[0]} and {lines[1]}") as err:
        load_config(ClassifyConfig, path)
    _one_line(str(err.value))


def test_yaml_merge_keys_still_override(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {depth: 18, stem: cifar}\nmodel:\n  <<: *b\n  depth: 34\n")
    assert read_yaml(path)["model"] == {"depth": 34, "stem": "cifar"}


def test_duplicate_keys_in_a_set_value_are_refused():
    with pytest.raises(ConfigError, match="duplicate key 'depth' at line 1, columns 2 and 13"):
        apply_overrides({}, ["model={depth: 18, depth: 50}"])


@pytest.mark.parametrize("text", ["a: " + "[" * 20000 + "]" * 20000,
                                  "a:\n" + "".join(" " * i + "- \n" for i in range(3000))])
def test_deeply_nested_yaml_is_one_line(tmp_path, text):
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"deep\.yaml: .*nest") as err:
        read_yaml(path)
    _one_line(str(err.value))
    with pytest.raises(ConfigError, match="nest"):
        apply_overrides({}, ["a=" + "[" * 20000 + "]" * 20000])


@pytest.mark.parametrize("content, match", [
    (b"model: {depth: [}\n", r"not valid YAML .*line 1"),
    (b"model:\n  depth: 18\n bad indent: 1\n", r"not valid YAML .*line 3"),
    (b"\xff\xfe\x00m\x00o", "not UTF-8"),
    (b"a: !!python/object:os.system {}\n", "not valid YAML"),
])
def test_yaml_errors_name_the_file_on_one_line(tmp_path, content, match):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"r\.yaml: {match}") as err:
        load_config(ClassifyConfig, path)
    _one_line(str(err.value))


def test_billion_laughs_value_fails_fast_and_short(tmp_path):
    # each anchor ten of the one before: the last stands for 10**7 numbers (shared, so cheap to
    # load), which an error message quoting the whole value would take seconds to print
    levels = ["&a0 [" + ", ".join(["1"] * 10) + "]"]
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    path = tmp_path / "lol.yaml"
    path.write_text(f"train: {{epochs: [{', '.join(levels)}]}}\n")
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=r"lol\.yaml: train\.epochs: expected an integer") as err:
        load_config(ClassifyConfig, path)
    assert time.perf_counter() - t < 1 and len(str(err.value)) < 300, len(str(err.value))
    _one_line(str(err.value))


# ----------------------------------------------------------------------------- 4. non-UTF-8 file names

def test_non_utf8_file_name_reads_without_crashing(tmp_path):
    name = os.path.join(os.fsencode(tmp_path), b"\xff\xfe.png")
    _png(name)
    gray = os.path.join(os.fsencode(tmp_path), b"m\xff.png")
    _png(gray, channels=1, value=1)
    junk = os.path.join(os.fsencode(tmp_path), b"j\xff.png")
    with open(junk, "wb") as f:
        f.write(b"not an image")

    def read():
        assert read_image(os.fsdecode(name)).shape == (H, W, 3)
        assert read_image(name, 1).shape == (H, W, 1)  # bytes paths too
        assert read_mask(os.fsdecode(gray)).shape == (H, W)

    assert in_child(read) == 0  # cv2.imread of such a name is a segfault (exit 139)
    with pytest.raises(ImageReadError, match=r"j\\xff\.png: cannot decode") as err:
        read_image(os.fsdecode(junk))
    _one_line(str(err.value))
    with pytest.raises(FileNotFoundError, match=r"\\xfe") as err:
        read_image(os.fsdecode(name) + "\udcfe")
    _one_line(str(err.value))


def test_non_utf8_names_in_datasets(tmp_path):
    root = tmp_path / "tree"
    (root / "cat").mkdir(parents=True)
    os.mkdir(os.path.join(os.fsencode(root), b"caf\xe9"))
    _png(os.path.join(os.fsencode(root), b"caf\xe9", b"x.png"))
    _png(os.path.join(os.fsencode(root / "cat"), b"\xe9t\xe9.png"))
    _png(root / "cat" / "b.png")
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    _png(os.path.join(os.fsencode(images), b"\xe9.png"))
    _png(os.path.join(os.fsencode(masks), b"\xe9.png"), channels=1, value=1)

    def load():
        ds = ImageFolderDataset(root)
        assert ds.classes == ["caf\\xe9", "cat"]  # printable: checkpoints, plots and logs can show it
        assert len(ds) == 3 and all(ds[i][0].shape == (3, H, W) for i in range(3))
        assert len(ImageFolderDataset(root, classes=ds.classes)) == 3
        seg = MaskFolderDataset(images, masks, num_classes=2)
        assert seg.image_sizes() == [(H, W)] and int(seg[0][1].sum()) == H * W

    assert in_child(load) == 0


# ----------------------------------------------------------------------------- 5. pixel limit

def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    bomb = _bomb_png(tmp_path / "bomb.png", 100_000, 69_000)  # 6.9 G pixels from a few hundred bytes
    assert bomb.stat().st_size < 1000
    limit = getattr(images_module, "MAX_IMAGE_PIXELS", 0)
    with pytest.raises(ImageReadError, match=rf"bomb\.png: 100000x69000 .*6,900,000,000 pixels.*limit of {limit:,}"
                                             r".*ONETRUNK_MAX_IMAGE_PIXELS") as err:
        read_image(bomb)
    _one_line(str(err.value))
    with pytest.raises(ImageReadError, match=r"bomb\.png: 100000x69000"):
        read_mask(bomb)
    with pytest.raises(ValueError, match=r"input 0: .*bomb\.png.*limit"):
        image_from_input(str(bomb), 3, "input 0")
    assert images_module.read_image_size(bomb) == (69_000, 100_000)  # the header alone: no pixels decoded


def test_devices_and_huge_files_are_not_read(tmp_path):
    with pytest.raises(ImageReadError, match="/dev/zero: not a regular file"):
        read_image("/dev/zero")  # would be read for ever
    sparse = tmp_path / "huge.png"
    with open(sparse, "wb") as f:
        f.truncate(3 << 30)  # 3 GiB of nothing, no disk used
    t = time.perf_counter()
    with pytest.raises(ImageReadError, match=r"huge\.png: 3,221,225,472 bytes, more than any image"):
        read_image(sparse)
    assert time.perf_counter() - t < 0.5


def test_over_opencv_limit_is_one_line(tmp_path):
    bomb = _bomb_png(tmp_path / "big.png", 40_000, 40_000)  # above OpenCV's own 2**30 pixels
    with pytest.raises(ImageReadError, match=r"big\.png: 40000x40000"):
        read_image(bomb)


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    path = _png(tmp_path / "a.png")
    jpg = tmp_path / "a.jpg"
    jpg.write_bytes(_encoded(".jpg"))
    monkeypatch.setenv("ONETRUNK_MAX_IMAGE_PIXELS", str(H * W))
    assert read_image(path).shape == (H, W, 3)
    monkeypatch.setenv("ONETRUNK_MAX_IMAGE_PIXELS", str(H * W - 1))
    with pytest.raises(ImageReadError, match=rf"a\.png: {W}x{H} = {H * W} pixels.*limit of {H * W - 1}"):
        read_image(path)
    with pytest.raises(ImageReadError, match=r"a\.jpg: 48x40"):
        read_image(jpg)
    with pytest.raises(ImageReadError, match="limit"):
        read_mask(path)
    monkeypatch.setenv("ONETRUNK_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="ONETRUNK_MAX_IMAGE_PIXELS='lots'"):
        read_image(path)


def test_bomb_in_a_mask_folder_is_skipped_or_named(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    _png(images / "a.png")
    _bomb_png(masks / "a.png", 60_000, 60_000)
    _bomb_png(images / "b.png", 50_000, 40_000)
    _png(masks / "b.png", channels=1, value=1)
    (images / "c.png").write_bytes(b"\x89PNG not really")
    _png(masks / "c.png", channels=1, value=1)
    ds = MaskFolderDataset(images, masks, num_classes=2)
    with pytest.raises(ImageReadError, match=r"masks/a\.png: 60000x60000"):
        ds[0]
    with pytest.raises(ImageReadError, match=r"images/b\.png: 50000x40000"):
        ds[1]
    with pytest.raises(ImageReadError, match=r"c\.png: no image size"):  # the aspect sampler's sizes
        ds.image_sizes()
    skipping = MaskFolderDataset(images, masks, num_classes=2, skip_bad=True, evaluation=True)
    assert skipping.image_sizes() == [(H, W), (40_000, 50_000), (1, 1)]  # headers only: nothing decoded
    with pytest.warns(UserWarning, match="a.png"):
        assert skipping[0] is None and skipping.stats["unreadable"] == 1


# ----------------------------------------------------------------------------- 6. weights names

@pytest.mark.parametrize("spec, match", [
    ("timm:resnet18.nonexistent", r"'timm:resnet18\.nonexistent'.*no pretrained tag.*timm:resnet18\.a1_in1k"),
    ("timm:nonexistent_tag", r"'timm:nonexistent_tag'.*timm has no model 'nonexistent_tag'.*timm:resnet18\.a1_in1k"),
    ("timm:", r"'timm:'.*timm:resnet18\.a1_in1k"),
    ("timm:resnet18.a1_in1k ", r"timm:resnet18\.a1_in1k"),
    ("torchvision:NOPE", r"'torchvision:NOPE'.*torchvision:IMAGENET1K_V1"),
    ("torchvision:imagenet1k_v1", r"did you mean torchvision:IMAGENET1K_V1"),
])
def test_unknown_weights_names_are_one_line_listing_valid_ones(spec, match):
    with pytest.raises(ValueError, match=match) as err:
        weights_info(spec, "resnet18")
    _one_line(str(err.value))


def test_misspelled_weights_name_says_what_names_look_like():
    for spec in ("torchvison:IMAGENET1K_V1", "ImageNet"):
        with pytest.raises(FileNotFoundError, match=r"torchvision:<ENUM>, timm:<arch>\.<tag> or imagenet"):
            read_checkpoint(spec)


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("ONETRUNK_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(pretrained, "_reachable", lambda url: True)

    def bad_hash(url, dst, hash_prefix=None, progress=True):
        raise RuntimeError('invalid hash value (expected "f37072fd", got "0000")')

    monkeypatch.setattr(torch.hub, "download_url_to_file", bad_hash)
    with pytest.raises(FileNotFoundError, match=r"torchvision:IMAGENET1K_V1: .*invalid hash value") as err:
        resolve("torchvision:IMAGENET1K_V1", "resnet18")
    _one_line(str(err.value))

    import huggingface_hub

    def no_hub(repo, filename, cache_dir=None, local_files_only=False, **kw):
        raise OSError(f"404 Client Error.\n\nRepository Not Found for url: https://huggingface.co/{repo}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    with pytest.raises(FileNotFoundError, match=r"timm:resnet18\.a1_in1k: .*404") as err:
        resolve("timm:resnet18.a1_in1k", "resnet18")
    _one_line(str(err.value))


def test_corrupt_cached_hub_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = tmp_path / "hf" / "hub" / "models--timm--resnet18.a1_in1k" / "snapshots" / "c0ffee"
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("c0ffee")
    (snap / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")
    with pytest.raises(ValueError, match=r"model\.safetensors.*corrupt") as err:
        resolve("timm:resnet18.a1_in1k", "resnet18")
    _one_line(str(err.value))


# ----------------------------------------------------------------------------- other readers of the same classes

def test_corrupt_gzip_idx_is_named(tmp_path):
    data = gzip.compress(b"\0\0\x08\x01" + (64).to_bytes(4, "big") + bytes(range(64)), mtime=0)
    path = tmp_path / "t-labels-idx1-ubyte.gz"
    path.write_bytes(data[:12] + bytes(b ^ 0x55 for b in data[12:-8]) + data[-8:])
    with pytest.raises(IDXError, match=r"t-labels-idx1-ubyte\.gz: cannot read"):
        read_idx(path)


def test_idx_header_claiming_more_than_the_data_is_bounded(tmp_path):
    path = tmp_path / "big-idx3-ubyte.gz"  # claims 60000 x 60000 x 60000 bytes, holds 16
    path.write_bytes(gzip.compress(b"\0\0\x08\x03" + struct.pack(">III", 60000, 60000, 60000) + b"\0" * 16))
    with pytest.raises(IDXError, match=r"big-idx3-ubyte\.gz: .*60000"):
        read_idx(path)


def test_fashion_mnist_download_failure_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets

    from tasks.data import fashion_mnist

    class Offline:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://...\n<urlopen error>")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST download into .* failed .*Error downloading") as err:
        fashion_mnist.download(tmp_path)
    _one_line(str(err.value))


def _voc(tmp_path, xml: str):
    voc = tmp_path / "VOC2012"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("a\n")
    (voc / "Annotations" / "a.xml").write_text(xml)
    return voc


@pytest.mark.parametrize("xml, match", [
    ("<annotation>" + "<a>" * 3000 + "</a>" * 3000 + "</annotation>", "nested"),
    ("<annotation><size><width>nan</width><height>10</height></size></annotation>", "'width' is 'nan'"),
    ("<annotation><size><width>inf</width><height>10</height></size></annotation>", "'width' is 'inf'"),
    ("<annotation><size>big</size></annotation>", "'width' is None"),
])
def test_voc_xml_problems_are_one_line(tmp_path, xml, match):
    voc = _voc(tmp_path, xml)
    with pytest.raises(ValueError, match=rf"a\.xml: .*{match}") as err:
        voc_coco(voc, "train")
    _one_line(str(err.value))
