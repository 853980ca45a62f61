"""The docs cite tests, result files and benchmark modules: every one they cite must exist."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_test_the_reliability_table_cites_exists():
    text = (ROOT / "docs" / "RELIABILITY.md").read_text()
    cited, missing = 0, []
    for row in text.splitlines():
        if not row.startswith("|"):
            continue
        module = None
        for ref in re.findall(r"`([^`]*::test_\w+)`", row):
            file, _, name = ref.rpartition("::")
            module = file or module
            assert module, f"{ref}: no test file named before it in its row"
            source = (ROOT / "tests" / module).read_text()
            cited += 1
            if not re.search(rf"^def {name}\(", source, re.M):
                missing.append(f"{module}::{name}")
    assert cited > 30 and not missing, missing


def test_every_result_file_and_benchmark_the_benchmarks_table_cites_exists():
    text = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    # result files by name (in benchmarks/results/) or by path
    files = {f if "/" in f else f"benchmarks/results/{f}"
             for f in re.findall(r"`((?:benchmarks/results/)?[\w.\-]+\.(?:json|jsonl|txt|log))`", text)}
    modules = set(re.findall(r"python3? -m (benchmarks\.\w+)", text))
    files.discard("benchmarks/results/metrics.jsonl")  # a run folder's log, named in the prose
    assert len(files) > 10 and modules, (files, modules)
    assert not [f for f in files if not (ROOT / f).is_file()]
    assert not [m for m in modules if not (ROOT / (m.replace(".", "/") + ".py")).is_file()]
    assert "docs/bench/" not in text
