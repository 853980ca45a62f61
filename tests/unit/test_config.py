"""Typed configs: YAML and --set override dataclass defaults; mistakes are named."""
import pytest

from tasks.classify import ClassifyConfig
from tasks.engine.config import CONFIG_ROOT, ConfigError, config_to_dict, load_config


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {depth: 34}\noptim: {lr: 1, betas: [0.8, 0.9]}\n")
    cfg = load_config(ClassifyConfig, path, ["model.depth=50", "train.compile=true", "data.data_dir=/x: y"])
    assert cfg.model.depth == 50 and cfg.train.compile is True
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.optim.betas == (0.8, 0.9)
    assert cfg.data.data_dir == "/x: y"
    assert cfg.train.epochs == ClassifyConfig().train.epochs  # untouched default
    assert config_to_dict(cfg)["optim"]["betas"] == [0.8, 0.9]


@pytest.mark.parametrize("yaml_text, overrides, match", [
    ("model: {depht: 50}", [], r"unknown key 'depht'.*valid keys: depth"),
    ("", ["optim.lrr=0.1"], r"unknown key 'lrr'.*lr"),
    ("", ["trainer.epochs=3"], r"unknown key 'trainer'.*model, data, optim, train"),
    ("model: {depth: fifty}", [], r"model.depth: expected an integer"),
    ("train: {amp: 1}", [], r"train.amp: expected true/false"),
    ("", ["train.amp_dtype=float32"], r"train.amp_dtype: 'float32' is not one of 'bfloat16', 'float16'"),
    ("", ["noequals"], r"expected key=value"),
    ("[1, 2]", [], r"mapping at the top level"),
    ("model: {depth: [}", [], r"not valid YAML"),
])
def test_config_errors_name_the_problem(tmp_path, yaml_text, overrides, match):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match):
        load_config(ClassifyConfig, path, overrides)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config(ClassifyConfig, "/nonexistent.yaml")


@pytest.mark.parametrize("path", sorted(CONFIG_ROOT.glob("classify/*.yaml")))
def test_shipped_recipes_load(path):
    cfg = load_config(ClassifyConfig, path)
    assert cfg.model.in_chans == 1 and path.read_text().startswith("# ")


def test_cli_errors_are_one_line(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "tasks.classify", "--device", "cpu", "--set", "model.depht=50",
                           "--output", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "depht" in proc.stderr and "Traceback" not in proc.stderr
