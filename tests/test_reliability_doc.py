"""docs/RELIABILITY.md names the test that checks each promise: every name it cites must exist."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
