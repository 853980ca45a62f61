"""The seed-sweep benchmark (python -m benchmarks.seeds): its collapse rule, and one tiny CPU run."""
import json

from benchmarks import seeds
from tests.fakes import tiny_scenes_args


def _row(model, seed, metric, guard=None):
    return {"model": model, "seed": seed, "metric": metric, "guard": guard, "error": None}


def test_collapse_is_under_half_the_median_zero_or_a_guard_stop():
    rows = [_row("a", s, m) for s, m in enumerate([0.80, 0.78, 0.38, 0.81, 0.0])]
    rows += [_row("b", 0, 0.5), _row("b", 1, None, guard="the loss term 'x' stayed at 1"), _row("b", 2, 0.52)]
    summary = seeds.summarise(rows)
    assert summary["a"]["collapsed_seeds"] == [2, 4] and summary["a"]["median"] == 0.78
    assert summary["a"]["min"] == 0.0 and summary["a"]["max"] == 0.81
    assert summary["b"] == {**summary["b"], "n": 3, "collapses": 1, "collapsed_seeds": [1], "guard_fired": 1,
                            "median": 0.51}
    table = seeds.table(summary, "AP")
    assert "| a | 5 | 0.0000 | 0.7800 | 0.8100 |" in table and "2 (2, 4)" in table


def test_tiny_detection_sweep_runs_and_writes_its_result(tmp_path):
    data = tiny_scenes_args(tmp_path / "data")
    sets = [a for a, prev in zip(data, [None] + data) if prev == "--set"]
    fm = data[data.index("--data-dir") + 1]
    argv = ["detect", "--recipe", "configs/detect/scenes_quick.yaml", "--seed-list", "3", "--epochs", "2",
            "--stop-after", "1", "--no-peer", "--out", str(tmp_path / "out"),
            "--variant", "narrow:model.fpn_channels=8"]
    for item in sets + [f"data.data_dir={fm}", "model.fpn_channels=16", "model.num_convs=1", "train.batch_size=4",
                        "train.device=cpu"]:
        argv += ["--set", item]
    result = seeds.main(argv)
    saved = json.loads((tmp_path / "out" / "seeds_detect.json").read_text())
    assert [r["model"] for r in saved["runs"]] == ["onetrunk", "narrow"]
    for r in saved["runs"]:
        assert r["error"] is None and r["seed"] == 3 and r["epochs_run"] == 1 and 0.0 <= r["metric"] <= 1.0
    assert set(result["summary"]) == {"onetrunk", "narrow"} and saved["stop_after"] == 1
    # the result schema (benchmarks/schema.py)
    assert saved["schema"] == "onetrunk-bench-1" and saved["claim"] and saved["date"] and "torch" in saved["env"]
    assert saved["command"] == "python -m benchmarks.seeds " + " ".join(argv)  # no argument needs quoting here
    assert saved["numbers"] == saved["summary"] == result["summary"]
