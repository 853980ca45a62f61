"""python -m tasks.data.scenes end to end: the FashionScenes generator's command on a tiny fake Fashion-MNIST."""
import json

import pytest
from PIL import Image

from tasks.data import scenes
from tests.fakes import write_blob_fashion_mnist


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory):
    return write_blob_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


def test_cli_writes_dataset_and_preview(fake_fmnist, tmp_path, capsys):
    out, preview = tmp_path / "ds", tmp_path / "preview.png"
    scenes.main(["--out", str(out), "--train", "2", "--val", "4", "--size", "64", "--seed", "1",
                 "--data-dir", str(fake_fmnist), "--workers", "1", "--quiet", "--preview", str(preview)])
    assert json.loads((out / "DONE.json").read_text())["args"]["val"] == 4
    with Image.open(preview) as img:
        # 4 scenes -> a 2 x 2 grid of scenes beside a 2 x 2 grid of label maps (4 px padding)
        assert img.mode == "RGB" and img.size == (2 * (2 * 64 + 3 * 4), 2 * 64 + 3 * 4)
    with pytest.raises(SystemExit):
        scenes.main(["--out", str(tmp_path / "bad"), "--size", "16", "--data-dir", str(fake_fmnist), "--quiet"])
    assert "size=16" in capsys.readouterr().err
