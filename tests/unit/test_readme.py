"""The README's Python examples run as written."""
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.fakes import write_task_checkpoint

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
API = next(i for i, b in enumerate(BLOCKS) if "from tasks import load" in b)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


def _api_files(root: Path) -> None:
    """What the Python API example reads: small untrained checkpoints under the names the
    README uses (the two frozen-trunk ones share their trunk: same seed, same trunk), a photo
    and a Fashion-MNIST-sized image."""
    write_task_checkpoint(root / "runs/detect/scenes_fcos_resnet18/best.pt", "detect")
    write_task_checkpoint(root / "runs/segment/scenes_fcn_resnet18/best.pt", "segment")
    write_task_checkpoint(root / "runs/classify/fashion_mnist_resnet18/best.pt", "classify")
    write_task_checkpoint(root / "runs/det-frozen/best.pt", "detect", seed=3)
    write_task_checkpoint(root / "runs/seg-frozen/best.pt", "segment", seed=3)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(root / "street.jpg"), rng.integers(0, 255, (150, 200, 3), dtype=np.uint8))
    cv2.imwrite(str(root / "shirt.png"), rng.integers(0, 255, (28, 28), dtype=np.uint8))


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs(i, capsys, tmp_path, monkeypatch):
    if i == API:
        _api_files(tmp_path)
        monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[i], f"README.md block {i}", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    if "feature_info" in BLOCKS[i] and "print" in BLOCKS[i]:
        assert "c5        2048     32  (1, 2048, 7, 7)" in out
    if i == API:
        assert "['detect', 'segment']" in out and re.search(r"\[\('\w+', 0\.\d+\)", out)


COMMANDS = [line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
            for line in block.splitlines() if line.strip().startswith("python -m tasks.")]


def test_readme_commands_exist():
    assert len(COMMANDS) >= 8


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_commands_parse(command):
    """Every ``python -m tasks.<task> ...`` line of the README names flags its parser takes."""
    import importlib
    import shlex

    words = shlex.split(command)
    parser = importlib.import_module(words[2]).get_args_parser()  # a wrong flag exits (SystemExit: fails)
    parser.parse_args(words[3:])
