"""RELIABILITY.md names a test for every bad input and fault: each named test must exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEST_ID = re.compile(r"`(test_\w+\.py)::(test_\w+)(?:\[([^\]`]+)\])?`")


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")
    }


def test_every_test_named_in_reliability_md_exists():
    text = (ROOT / "RELIABILITY.md").read_text(encoding="utf-8")
    named = TEST_ID.findall(text)
    assert len(named) > 80  # the table is not empty or unparsed
    missing = []
    for file, name, case in named:
        found = sorted((ROOT / "tests").rglob(file))  # tests/unit, tests/model or tests/system
        path = found[0] if len(found) == 1 else ROOT / "tests" / file
        if not path.is_file() or name not in defined_tests(path):
            missing.append(f"{file}::{name}")
        elif case and case not in path.read_text(encoding="utf-8"):
            missing.append(f"{file}::{name}[{case}] (no such case in the file)")
    assert not missing, "RELIABILITY.md names tests that do not exist: " + ", ".join(missing)
