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
