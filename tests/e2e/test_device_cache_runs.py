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
