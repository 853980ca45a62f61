"""data.cache=device end to end: a detection and a segmentation run on tiny FashionScenes, on CPU."""
import importlib

import pytest

from tests.fakes import tiny_scenes_args

TINY = ["--device", "cpu", "--quiet", "--batch-size", "4", "--epochs", "1"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return tiny_scenes_args(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_cache_trains_end_to_end(task, scenes, tmp_path):
    out = tmp_path / task
    metrics = importlib.import_module(f"tasks.{task}").main(TINY + scenes + ["--config", f"configs/{task}/scenes_quick.yaml",
                                                 "--set", "data.cache=device", "--output", str(out)])
    assert ("AP" if task == "detect" else "miou") in metrics
    assert (out / "best.pt").is_file()


def test_cache_skips_an_unreadable_training_image_with_skip_bad_and_names_it_without(tmp_path, capsys):
    from tasks import detect
    from tasks.data.images import ImageReadError
    from tests.fakes import write_odd_coco

    flags = write_odd_coco(tmp_path / "d", [(60, 80), (80, 60), (64, 64), (70, 90)])
    (tmp_path / "d" / "train" / "1.png").write_bytes(b"\x89PNG garbage")
    base = TINY + flags + ["--config", "configs/detect/scenes_quick.yaml", "--set", "data.image_size=64",
                           "--set", "model.fpn_channels=16", "--set", "model.num_convs=1", "--set", "data.cache=device",
                           "--set", "data.num_workers=0"]
    with pytest.raises(ImageReadError, match=r"train/1.png: .*; --set data.skip_bad=true skips unreadable images"):
        detect.main(base + ["--output", str(tmp_path / "stops")])
    with pytest.warns(UserWarning, match=r"skipping 1 unusable training image \(data.skip_bad\): .*train/1.png"):
        metrics = detect.main([a for a in base if a != "--quiet"] + ["--set", "data.skip_bad=true", "--epochs", "2",
                                                                     "--output", str(tmp_path / "run")])
    assert "AP" in metrics and (tmp_path / "run" / "best.pt").is_file()
    out = capsys.readouterr().out
    assert f"skipped 1 unreadable training image (data.skip_bad): {tmp_path / 'd' / 'train' / '1.png'}" in out
