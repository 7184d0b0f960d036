"""The service's JSON for a fixed set of ~70 requests on a fixed collection (fake encoder) is what it
was when tests/data/golden_answers.json was recorded (`benchmarks/golden_requests.py`): a refactor
of the routes, the engine or the stores must not change one byte of an answer. A deliberate change
of an answer re-records the file: `python benchmarks/golden_requests.py --out tests/data/golden_answers.json`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_answers_match_the_golden_file() -> None:
    spec = importlib.util.spec_from_file_location("golden_requests", ROOT / "benchmarks" / "golden_requests.py")
    assert spec is not None and spec.loader is not None
    golden = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(golden)
    before = {a["name"]: a for a in json.loads((ROOT / "tests" / "data" / "golden_answers.json").read_text())}
    after = {a["name"]: a for a in golden.run()}
    assert sorted(after) == sorted(before)
    different = [name for name in before if before[name] != after[name]]
    assert not different, {name: (before[name], after[name]) for name in different[:3]}
