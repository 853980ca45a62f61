"""The task commands' config surface end to end: --list-keys, --list-recipes, --help as typed, one-line errors."""
import importlib
import os
import re
import subprocess
import sys

import pytest
import yaml

from tasks.engine.config import CONFIG_ROOT, config_keys
from tasks.engine.registry import TASKS


@pytest.mark.parametrize("task", list(TASKS))
def test_list_keys_names_every_key_with_its_default_and_help(task, capsys):
    keys = config_keys(TASKS[task].config)
    assert len(keys) > 40 and all(text.strip() and "\n" not in text for _, _, text in keys), \
        [k for k, _, text in keys if not text.strip()]
    parser = TASKS[task]  # through the task's own CLI
    module = importlib.import_module(f"tasks.{task}")
    with pytest.raises(SystemExit) as e:
        module.main(["--list-keys"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(keys)
    for line, (key, default, text) in zip(lines, keys):
        assert line.startswith(f"{key} = ") and line.endswith(text)
        shown = line[len(key) + 3:-len(text)].strip()
        assert yaml.safe_load(shown) == default, (key, shown)
    assert parser.name == task


@pytest.mark.parametrize("task", list(TASKS))
def test_list_recipes_names_each_recipe_with_its_first_comment(task, capsys):
    module = importlib.import_module(f"tasks.{task}")
    with pytest.raises(SystemExit) as e:
        module.main(["--list-recipes"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    paths = sorted(CONFIG_ROOT.glob(f"{task}/*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        first = path.read_text().splitlines()[0].lstrip("# ").strip()
        assert re.search(rf"^  {path.stem} +{re.escape(first)}$", out, re.M), (path.stem, out)
    assert all(name in out.splitlines()[0] for name in TASKS[task].recipes)  # the defaults named


def test_onetrunk_help_names_the_command_as_typed(capsys):
    from tasks import cli
    with pytest.raises(SystemExit) as e:
        cli.main(["classify", "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: onetrunk classify ")
    from tasks import classify
    assert classify.get_args_parser().prog == "python -m tasks.classify"  # the module form, outside it
    with pytest.raises(SystemExit):
        cli.main(["segment", "--list-keys"])
    assert "model.aux_weight = 0.4" in capsys.readouterr().out


def test_cli_warnings_are_one_line_each():
    code = ("import warnings; from tasks.engine.runner import run_cli; "
            "run_cli(lambda: (warnings.warn('skipping a.png:\\n  truncated'), warnings.warn('soon', FutureWarning)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "warning: skipping a.png: truncated\nFutureWarning: soon\n"
    debug = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "ONETRUNK_DEBUG": "1"})
    assert "UserWarning: skipping a.png:" in debug.stderr  # Python's own form, with where it came from


def test_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tasks.classify", "--device", "cpu", "--set", "model.depht=50",
                           "--output", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "depht" in proc.stderr and "Traceback" not in proc.stderr
