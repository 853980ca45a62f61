"""The installable package, checked without building it: every import is declared, the recipes
ship in the wheel and are found where an installed package puts them, the ``onetrunk`` console
script dispatches every command. (.ci/package_check.sh builds, installs and runs the wheel.)"""
from __future__ import annotations

import ast
import fnmatch
import re
import sys
import types
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from tasks import cli
from tasks.engine.config import CONFIG_ROOT, locate_recipe, recipe_root
from tasks.engine.runner import find_config

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
INSTALLED = ("backbones", "heads", "tasks")  # the packages the wheel installs (first-party imports)

# import name -> distribution name (PyPI), for every third-party package the code may import
DISTRIBUTION = {
    "torch": "torch", "torchvision": "torchvision", "timm": "timm", "albumentations": "albumentations",
    "pycocotools": "pycocotools", "yaml": "pyyaml", "tqdm": "tqdm", "matplotlib": "matplotlib",
    "cv2": "opencv-python-headless", "numpy": "numpy", "PIL": "pillow", "huggingface_hub": "huggingface-hub",
    "safetensors": "safetensors", "onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript",
    "tensorboard": "tensorboard",
}
# modules that import a distribution of their own: torch.utils.tensorboard needs tensorboard
IMPLIES = {"torch.utils.tensorboard": "tensorboard"}
COMMANDS = {"classify", "detect", "segment", "multitask", "export", "bench"}


def _dist(requirement: str) -> str:
    """``"opencv-python-headless>=4.8"`` -> ``"opencv-python-headless"``, normalised (PEP 503)."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports(source: str, filename: str = "<source>") -> list[tuple[str, int, bool]]:
    """``(module, line, in_function)`` for every absolute import in ``source``: module level,
    inside functions and classes, under ``if`` / ``try`` alike."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module, child.lineno, in_function))
                found.extend((f"{child.module}.{a.name}", child.lineno, in_function) for a in child.names)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(source, filename), False)
    return found


def _sources() -> list[Path]:
    files = [f for pkg in INSTALLED for f in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 30, files  # the scan sees the packages
    return files


def _required(module: str) -> str | None:
    """The distribution an import needs, None for the standard library and first-party code."""
    for prefix, dist in IMPLIES.items():
        if module == prefix or module.startswith(prefix + "."):
            return dist
    top = module.partition(".")[0]
    if top in sys.stdlib_module_names or top in INSTALLED:
        return None
    return DISTRIBUTION.get(top, f"? {top}")


def test_import_scan_sees_every_kind_of_import():
    source = ("import os, numpy as np\nfrom cv2 import imread\nfrom . import sibling\n"
              "def f():\n    try:\n        import huggingface_hub\n    except ImportError:\n        pass\n"
              "class C:\n    def g(self):\n        from safetensors.torch import load_file\n"
              "if True:\n    from torch.utils.tensorboard import SummaryWriter\n")
    found = {(m, fn) for m, _, fn in _imports(source)}
    assert {("os", False), ("numpy", False), ("cv2", False), ("huggingface_hub", True),
            ("safetensors.torch", True), ("torch.utils.tensorboard", False)} <= found
    assert not any(m == "sibling" or m.startswith(".") for m, _ in found)
    assert _required("huggingface_hub") == "huggingface-hub" and _required("os") is None
    assert _required("torch.utils.tensorboard.writer") == "tensorboard" and _required("tasks.engine") is None
    assert _required("somethingnew").startswith("?")


def test_every_third_party_import_is_declared():
    """Core dependencies or an extra (not dev: that is for the tests); a distribution only an
    extra brings is imported inside functions only, so importing the module never needs it."""
    core = {_dist(r) for r in PYPROJECT["project"]["dependencies"]}
    extras = {_dist(r) for name, reqs in PYPROJECT["project"]["optional-dependencies"].items() if name != "dev"
              for r in reqs}
    problems = []
    for path in _sources():
        rel = path.relative_to(ROOT)
        for module, line, in_function in _imports(path.read_text(), str(rel)):
            dist = _required(module)
            if dist is None or dist in core:
                continue
            if dist.startswith("?"):
                problems.append(f"{rel}:{line}: import {module}: add its distribution to DISTRIBUTION here "
                                f"and to pyproject.toml (dependencies or an extra)")
            elif dist not in extras:
                problems.append(f"{rel}:{line}: import {module}: {dist} is not declared in pyproject.toml")
            elif not in_function:
                problems.append(f"{rel}:{line}: import {module} at module level, but {dist} is only an extra")
    assert not problems, "\n".join(problems)


def test_the_named_imports_are_declared():
    """The issue's three: Pillow (masks, EXIF: the default paths) and huggingface_hub /
    safetensors (named timm weights; timm itself requires them) are core dependencies."""
    core = {_dist(r) for r in PYPROJECT["project"]["dependencies"]}
    assert {"pillow", "huggingface-hub", "safetensors"} <= core


def test_every_package_is_listed():
    """pyproject lists the packages by name (configs/ is mapped in): a new subpackage is not
    left out of the wheel."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for pkg in INSTALLED for p in (ROOT / pkg).rglob("__init__.py")}
    assert on_disk | {"tasks.configs"} == listed


def test_every_recipe_ships_in_the_wheel():
    tool = PYPROJECT["tool"]["setuptools"]
    assert tool["package-dir"]["tasks.configs"] == "configs" and "tasks.configs" in tool["packages"]
    patterns = tool["package-data"]["tasks.configs"]
    recipes = sorted((ROOT / "configs").rglob("*.yaml"))
    assert len(recipes) >= 11
    for recipe in recipes:
        rel = recipe.relative_to(ROOT / "configs").as_posix()
        # setuptools globs per path segment: "*" never crosses a "/"
        assert any(fnmatch.fnmatch(rel, p) and rel.count("/") == p.count("/") for p in patterns), rel


def test_recipe_lookup_finds_every_recipe():
    assert CONFIG_ROOT == ROOT / "configs"  # a checkout reads its top-level configs/
    recipes = sorted((ROOT / "configs").rglob("*.yaml"))
    assert recipes
    for recipe in recipes:
        task, name = recipe.parent.name, recipe.stem
        assert find_config(task, name) == recipe


def test_every_task_default_recipe_exists():
    from tasks.engine.registry import TASKS

    assert {"classify", "detect", "segment", "multitask"} <= set(TASKS)
    for name in TASKS:
        for recipe in TASKS[name].recipes:
            assert find_config(name, recipe).is_file(), (name, recipe)


def test_recipe_root_of_an_installed_package(tmp_path):
    site = tmp_path / "site-packages" / "tasks"
    (site / "configs" / "classify").mkdir(parents=True)
    assert recipe_root(site) == site / "configs"  # the wheel's tasks/configs/
    checkout = tmp_path / "repo" / "tasks"
    checkout.mkdir(parents=True)
    assert recipe_root(checkout) == tmp_path / "repo" / "configs"


def test_config_flag_finds_a_shipped_recipe_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = "configs/classify/fashion_mnist_quick.yaml"
    assert locate_recipe(rel) == CONFIG_ROOT / "classify" / "fashion_mnist_quick.yaml"
    assert locate_recipe("configs/classify/nope.yaml") == Path("configs/classify/nope.yaml")
    assert locate_recipe("my.yaml") == Path("my.yaml")
    own = tmp_path / rel  # a user's own file of that name wins
    own.parent.mkdir(parents=True)
    own.write_text("model: {depth: 18}\n")
    assert locate_recipe(rel) == Path(rel)


# ----------------------------------------------------------------------------- the console script

def test_console_script_is_declared():
    assert PYPROJECT["project"]["scripts"]["onetrunk"] == "tasks.cli:main"


def test_dispatch_table_covers_every_command():
    assert set(cli.COMMANDS) == COMMANDS
    for name, (module, about) in cli.COMMANDS.items():
        # bench: the benchmarks/ of a checkout, not installed (not a package pyproject lists)
        expected = "benchmarks.bench" if name == "bench" else f"tasks.{name}"
        assert module == expected and about and "\n" not in about
        tree = ast.parse((ROOT / Path(*module.split("."))).with_suffix(".py").read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" and n.args.args for n in tree.body), name
    assert not any(p == "benchmarks" or p.startswith("benchmarks.") for p in PYPROJECT["tool"]["setuptools"]["packages"])


def test_help_lists_every_command(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert len([line for line in out.splitlines() if line.strip().startswith(name + " ")]) == 1, name
    with pytest.raises(SystemExit) as e:
        cli.main([])
    err = capsys.readouterr().err
    assert e.value.code == 2 and all(name in err for name in COMMANDS)


def test_unknown_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["clasify", "--epochs", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "'clasify'" in err and "classify" in err


def test_command_runs_the_task_main(monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("fake_task")

    def main(argv):
        calls.append(argv)
        if argv == ["--bad"]:
            raise ValueError("bad input")
        return {}

    fake.main = main
    monkeypatch.setitem(sys.modules, "fake_task", fake)
    monkeypatch.setitem(cli.COMMANDS, "classify", ("fake_task", "a fake"))
    cli.main(["classify", "--epochs", "1", "--set", "model.depth=18"])
    assert calls == [["--epochs", "1", "--set", "model.depth=18"]]
    with pytest.raises(SystemExit) as e:  # run_cli, as python -m tasks.<name>: one line, exit 2
        cli.main(["classify", "--bad"])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == "error: bad input"


def test_bench_runs_the_checkouts_benchmarks(monkeypatch):
    calls = []
    from benchmarks import bench

    monkeypatch.setattr(bench, "main", lambda argv: calls.append(argv) or {})
    cli.main(["bench", "classify", "--no-peer"])
    assert calls == [["classify", "--no-peer"]]


@pytest.mark.parametrize("argv, code", [(["bench", "classify"], 2), (["bench"], 2), (["bench", "--help"], 0)])
def test_bench_without_a_checkout_is_one_line(monkeypatch, capsys, argv, code):
    """An installed package has no benchmarks/: one line saying where they are; exit 2 (0 for
    --help, which CI's package check asks of every command)."""
    monkeypatch.setitem(sys.modules, "benchmarks", None)  # import benchmarks fails, as without a checkout
    monkeypatch.setitem(sys.modules, "benchmarks.bench", None)
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out = capsys.readouterr()
    text = (out.out if code == 0 else out.err).strip()
    assert e.value.code == code and text == cli.BENCH_MISSING and len(text.splitlines()) == 1
    assert "benchmarks/" in text and "checkout" in text
