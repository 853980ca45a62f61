"""benchmarks/schema.py: the one result-file schema of the benchmarks, written atomically."""
import json
import os

import pytest

from benchmarks.schema import SCHEMA, command_line, write_result


def test_write_result_has_the_schema_fields(tmp_path):
    path = tmp_path / "sub" / "bench_x.json"
    doc = write_result(path, claim="ours is faster", numbers={"ours": {"img_per_s": 2.0}},
                       command="python -m benchmarks.bench classify", extra={"runs": [{"name": "a"}], "wall_s": 1.5})
    saved = json.loads(path.read_text())
    assert saved == doc
    assert list(saved)[:6] == ["schema", "claim", "numbers", "command", "env", "date"]
    assert saved["schema"] == SCHEMA == "onetrunk-bench-1"
    assert saved["claim"] == "ours is faster" and saved["numbers"] == {"ours": {"img_per_s": 2.0}}
    assert saved["command"] == "python -m benchmarks.bench classify"
    assert {"torch", "torchvision", "python", "date"} <= set(saved["env"])  # env_info() by default
    assert saved["date"][:4].isdigit() and "T" in saved["date"]
    assert saved["runs"] == [{"name": "a"}] and saved["wall_s"] == 1.5  # extra at the top level
    assert os.listdir(path.parent) == ["bench_x.json"]  # no temp file left


def test_write_result_replaces_atomically_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "r.json"
    write_result(path, claim="c", numbers={"n": 1}, command="cmd", env={"torch": "x"})
    assert json.loads(path.read_text())["env"] == {"torch": "x"}
    write_result(path, claim="c", numbers={"n": 2}, command="cmd", env={})
    assert json.loads(path.read_text())["numbers"] == {"n": 2}
    with pytest.raises(TypeError):  # not JSON: the previous file stays whole, no temp file
        write_result(path, claim="c", numbers={"n": object()}, command="cmd", env={})
    with pytest.raises(ValueError, match="schema's own keys"):
        write_result(path, claim="c", numbers={}, command="cmd", env={}, extra={"env": {}})
    with pytest.raises(ValueError, match="claim"):
        write_result(path, claim="", numbers={}, command="cmd", env={})
    assert json.loads(path.read_text())["numbers"] == {"n": 2}
    assert os.listdir(tmp_path) == ["r.json"]


def test_command_line_is_the_repeatable_command():
    assert command_line("benchmarks.bench", ["detect", "--set", "train.epochs=2"]) == \
        "python -m benchmarks.bench detect --set train.epochs=2"
    assert command_line("benchmarks.seeds", ["detect", "--variant", "a b:x=1"]) == \
        "python -m benchmarks.seeds detect --variant 'a b:x=1'"


def _sweep(path, task, runs, command):
    write_result(path, claim="c", numbers={}, command=command, env={"gpu": "x"},
                 extra={"task": task, "metric": "AP", "models": {"onetrunk": [], "peer": []}, "runs": runs})


def test_seed_merge_joins_runs_recomputes_the_summary_and_keeps_the_later_run(tmp_path):
    from benchmarks.seeds import merge

    row = lambda model, seed, metric: {"model": model, "seed": seed, "metric": metric, "guard": None,  # noqa: E731
                                       "error": None}
    _sweep(tmp_path / "a.json", "detect", [row("onetrunk", 0, 0.40), row("onetrunk", 1, 0.10)], "cmd a")
    _sweep(tmp_path / "b.json", "detect", [row("onetrunk", 1, 0.42), row("peer", 0, 0.38),
                                           row("onetrunk", 2, 0.44)], "cmd b")
    merge(tmp_path / "m.json", [tmp_path / "a.json", tmp_path / "b.json"], "merge cmd")
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["schema"] == SCHEMA and doc["command"] == "merge cmd" and doc["commands"] == ["cmd a", "cmd b"]
    ours = doc["numbers"]["onetrunk"]
    # seed 1 measured twice: the later file's 0.42, so no collapse and the median of 0.40/0.42/0.44
    assert ours["n"] == 3 and ours["collapses"] == 0 and ours["median"] == pytest.approx(0.42)
    assert doc["numbers"]["peer"]["n"] == 1
    assert [(r["model"], r["seed"]) for r in doc["runs"]] == [("onetrunk", 0), ("onetrunk", 1), ("onetrunk", 2),
                                                              ("peer", 0)]


def test_seed_merge_refuses_files_of_different_tasks(tmp_path):
    from benchmarks.seeds import merge

    _sweep(tmp_path / "a.json", "detect", [], "a")
    _sweep(tmp_path / "b.json", "segment", [], "b")
    with pytest.raises(SystemExit, match="different tasks"):
        merge(tmp_path / "m.json", [tmp_path / "a.json", tmp_path / "b.json"], "m")
