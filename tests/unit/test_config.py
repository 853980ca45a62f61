"""Typed configs: YAML and --set override dataclass defaults; mistakes are named; removed keys
say why; recipes state only what differs from the defaults. (Every key's one-line help, as the
commands list it: tests/e2e/test_config_cli.py.)"""
import dataclasses
import re
from pathlib import Path

import pytest
import torch
import yaml

from tasks.classify import ClassifyConfig
from tasks.engine.config import (CONFIG_ROOT, REMOVED_KEYS, ConfigError, config_from_dict, config_keys,
                                 config_to_dict, load_config, upgrade_saved_config)
from tasks.engine.registry import TASKS, spec_for_checkpoint

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((task, path) for task in TASKS for path in CONFIG_ROOT.glob(f"{task}/*.yaml"))


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {depth: 34}\noptim: {lr: 1}\n")
    cfg = load_config(ClassifyConfig, path, ["model.depth=50", "train.compile=true", "data.data_dir=/x: y"])
    assert cfg.model.depth == 50 and cfg.train.compile is True
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.data_dir == "/x: y"
    assert cfg.train.epochs == ClassifyConfig().train.epochs  # untouched default
    seg = load_config(TASKS["segment"].config, None, ["data.min_size=[480, 512]", "data.scenes_aspect=[0.5, 2]"])
    assert seg.data.min_size == (480, 512) and seg.data.scenes_aspect == (0.5, 2.0)
    assert config_to_dict(seg)["data"]["min_size"] == [480, 512]
    with pytest.raises(ConfigError, match=r"data.scenes_aspect\[1\].*finite number"):
        load_config(TASKS["segment"].config, None, ["data.scenes_aspect=[0.5, .nan]"])


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


@pytest.mark.parametrize("task, path", RECIPES, ids=[f"{t}/{p.stem}" for t, p in RECIPES])
def test_recipes_load_and_state_only_what_differs_from_the_defaults(task, path):
    """Every key a recipe sets differs from its default (a default restated is one more line to
    read, and goes stale when the default moves); each recipe opens with a comment line."""
    cls = TASKS[task].config
    load_config(cls, path)
    assert path.read_text().startswith("# ")
    data = yaml.safe_load(path.read_text())
    defaults = config_to_dict(cls())
    same = [f"{section}.{key}" for section, part in data.items() for key, value in part.items()
            if config_to_dict(config_from_dict(cls, {section: {key: value}}))[section][key] == defaults[section][key]]
    assert not same, f"{path.name} restates defaults: {same}"
    if task == "classify":
        assert load_config(cls, path).model.in_chans == 1


def test_a_recipe_that_graphs_training_graphs_evaluation_too():
    """train.cuda_graph (the step) and train.graph_eval (evaluation) are separate keys: every
    recipe that graphs its step evaluates through graphs as well, as before the split."""
    for task, path in RECIPES:
        cfg = load_config(TASKS[task].config, path)
        assert cfg.train.cuda_graph == cfg.train.graph_eval, path


# ----------------------------------------------------------------------------- removed keys

def _tasks_with_section(key: str) -> list[str]:
    section = key.partition(".")[0]
    return [t for t in TASKS if section in {f.name for f in dataclasses.fields(TASKS[t].config)}]


@pytest.mark.parametrize("key", sorted(REMOVED_KEYS))
def test_a_removed_key_fails_with_why_and_where(tmp_path, key):
    doc = (ROOT / "docs" / "CONFIG.md").read_text()
    assert f"`{key}`" in doc  # documented with its reason
    for task in _tasks_with_section(key):
        cls = TASKS[task].config
        assert key.partition(".")[2] not in {k.partition(".")[2] for k, _, _ in config_keys(cls)
                                             if k.partition(".")[0] == key.partition(".")[0]}
        with pytest.raises(ConfigError) as e:
            load_config(cls, None, [f"{key}=1"])
        line = str(e.value)
        assert "\n" not in line and f"{key} was removed" in line and REMOVED_KEYS[key] in line
        assert "docs/CONFIG.md" in line
        section, _, name = key.partition(".")
        path = tmp_path / f"{task}.yaml"
        path.write_text(f"{section}:\n  {name}: 1\n")
        with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: {re.escape(key)} was removed \("):
            load_config(cls, path)


def test_an_old_checkpoint_config_loads_without_its_removed_keys(tmp_path):
    """A checkpoint written while the keys existed: they are dropped when it is read, and a key
    split from another (train.graph_eval from train.cuda_graph) takes the value it ran with."""
    import tasks
    from tasks.engine.checkpoint import atomic_save, load_checkpoint
    from tests.fakes import write_task_checkpoint

    path = write_task_checkpoint(tmp_path / "seg.pt", "segment")
    ckpt = load_checkpoint(path)
    ckpt["config"]["model"].update(dice_weight=0.5, dropout=0.2)
    ckpt["config"]["optim"].update(betas=[0.9, 0.99], final_lr_ratio=0.01)
    ckpt["config"]["train"].update(cudnn_benchmark_limit=4, cuda_graph=True)
    del ckpt["config"]["train"]["graph_eval"]
    atomic_save(ckpt, path)
    predictor = tasks.load(path, device="cpu")
    assert predictor.predict([torch.zeros(3, 64, 64, dtype=torch.uint8)])[0]["mask"].shape == (64, 64)
    saved = load_checkpoint(path)
    spec_for_checkpoint(saved, path)
    assert "dice_weight" not in saved["config"]["model"] and "cudnn_benchmark_limit" not in saved["config"]["train"]
    assert saved["config"]["train"]["graph_eval"] is True
    cfg = config_from_dict(TASKS["segment"].config, saved["config"])
    assert cfg.train.cuda_graph is True and cfg.train.graph_eval is True
    # a key of today's schema is never dropped, whatever the table says
    data = {"model": {"depth": 18}}
    assert upgrade_saved_config(ClassifyConfig, data) == {"model": {"depth": 18}}


def test_removed_keys_are_not_keys_of_any_task():
    current = {k for t in TASKS for k, _, _ in config_keys(TASKS[t].config)}
    assert not set(REMOVED_KEYS) & current


# ----------------------------------------------------------------------------- resolved switches

def test_switches_this_run_cannot_use_resolve_to_false_with_a_reason():
    from tasks.engine.runner import resolve_switches
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # resolve_switches reads the type only
    cls = TASKS["detect"].config

    def cfg(**train):
        return config_from_dict(cls, {"train": train})

    # on the CPU: every CUDA switch off; a line only for what was asked beyond the defaults
    c = cfg(cuda_graph=True, graph_eval=True, compile_inference=True)
    lines = resolve_switches(c, cpu)
    assert (c.train.amp, c.train.cuda_graph, c.train.graph_eval, c.train.cudnn_benchmark,
            c.train.compile_inference) == (False,) * 5
    assert lines == ["train.cuda_graph, train.graph_eval: false (CUDA only; the device is cpu)",
                     "train.compile_inference: false (it compiles what train.graph_eval replays, and that is off)"]
    plain = cfg()
    assert resolve_switches(plain, cpu) == [] and not plain.train.amp and not plain.train.cudnn_benchmark
    # on CUDA with batches of varying shape: eager steps, no graphs, no autotuning; amp stays
    c = cfg(cuda_graph=True, graph_eval=True)
    lines = resolve_switches(c, cuda, fixed_shapes=False)
    assert c.train.amp and not (c.train.cuda_graph or c.train.graph_eval or c.train.cudnn_benchmark)
    assert lines == ["train.cuda_graph, train.graph_eval, train.cudnn_benchmark: false (the batches of "
                     "data.resize=aspect vary in shape: eager steps, no autotuning)"]
    # syncbn under torchrun: the step cannot be graphed, evaluation can
    c = config_from_dict(cls, {"model": {"norm": "syncbn"}, "train": {"cuda_graph": True, "graph_eval": True}})
    assert resolve_switches(c, cuda, world=2) == [
        "train.cuda_graph: false (model.norm=syncbn under torchrun runs its collectives inside the forward)"]
    assert c.train.graph_eval and not c.train.cuda_graph
    # what a GPU with fixed shapes can use is left as asked
    c = cfg(cuda_graph=True, graph_eval=True, compile_inference=True)
    assert resolve_switches(c, cuda) == [] and c.train == cfg(cuda_graph=True, graph_eval=True,
                                                             compile_inference=True).train


def test_evaluation_graphs_follow_graph_eval_not_cuda_graph():
    from tasks.engine.graphs import GraphedInference, inference_model
    from tests.fakes import TINY_MODELS, task_meta

    cls = TASKS["segment"].config
    model = TASKS["segment"].build_model(config_from_dict(cls, TINY_MODELS["segment"]),
                                         task_meta("segment", cls())).eval()
    cuda = torch.device("cuda")  # building the wrapper touches no device
    step_only = config_from_dict(cls, {"train": {"cuda_graph": True}})
    assert inference_model(model, step_only, cuda) is model
    eval_only = config_from_dict(cls, {"train": {"graph_eval": True, "compile_inference": False}})
    assert isinstance(inference_model(model, eval_only, cuda), GraphedInference)
    assert inference_model(model, eval_only, torch.device("cpu")) is model
