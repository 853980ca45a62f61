"""python -m tasks.classify on a user's image folders end to end, bad files skipped or named, on CPU."""
import pytest
import yaml

from tasks import classify
from tasks.data.images import ImageReadError
from tests.fakes import write_image_folders


def test_classify_on_folders_with_skip_bad(tmp_path, capsys):
    root = write_image_folders(tmp_path)
    (root / "train" / "owl" / "broken.png").write_bytes(b"\x89PNG garbage")
    (root / "val" / "cat" / "cut.png").write_bytes(b"\x89PNG garbage too")
    base = ["--device", "cpu", "--quiet", "--train-images", str(root / "train"), "--val-images", str(root / "val"),
            "--epochs", "1", "--batch-size", "6", "--set", "data.image_size=16", "--set", "data.num_workers=0",
            "--set", "optim.lr=0.01"]
    with pytest.warns(UserWarning, match="skipping an unreadable image") as caught:
        metrics = classify.main([a for a in base if a != "--quiet"] + [
            "--output", str(tmp_path / "run"), "--set", "model.num_classes=3", "--set", "data.skip_bad=true",
            "--epochs", "2"])
    assert 0.0 <= metrics["acc"] <= 1.0 and (tmp_path / "run" / "confusion.png").is_file()
    # each file named once, in a line per split at the end, however often it was met (2 epochs, 3 evaluations)
    assert sum("unreadable image" in str(w.message) for w in caught) == 2
    out = capsys.readouterr().out
    assert f"skipped 1 unreadable training image (data.skip_bad): {root / 'train' / 'owl' / 'broken.png'}" in out
    assert f"skipped 1 unreadable validation image (data.skip_bad): {root / 'val' / 'cat' / 'cut.png'}" in out
    (root / "val" / "cat" / "cut.png").unlink()
    with pytest.raises(ImageReadError, match="broken.png.*skip_bad=true"):  # without skip_bad: stops, naming the file
        classify.main(base + ["--output", str(tmp_path / "run2"), "--set", "model.num_classes=3"])
    # without model.num_classes / in_chans the run takes them from the data (not the recipe's 10 / 1)
    classify.main(base + ["--output", str(tmp_path / "run3"), "--set", "data.skip_bad=true"])
    cfg = yaml.safe_load((tmp_path / "run3" / "config.yaml").read_text())
    assert (cfg["model"]["num_classes"], cfg["model"]["in_chans"], cfg["data"]["dataset"]) == (3, 3, "folders")
