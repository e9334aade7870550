"""docs/security.md names the test behind each defence: every test it names exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cited_tests() -> list[tuple[str, str]]:
    text = (REPO / "docs" / "security.md").read_text()
    cited, current = [], None
    for match in re.finditer(r"`(tests/[\w/]+\.py)?::(\w+)", text):
        current = match.group(1) or current
        cited.append((current, match.group(2)))
    return cited


def test_every_defence_names_tests_that_exist():
    cited = cited_tests()
    assert len(cited) > 40
    missing = [
        f"{path}::{name}"
        for path, name in cited
        if not re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M)
    ]
    assert missing == []


def test_every_section_names_a_test():
    text = (REPO / "docs" / "security.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    defences = [s for s in sections if "**Defence.**" in s]
    assert len(defences) >= 15
    assert [s.splitlines()[0] for s in defences if "tests/" not in s and "::" not in s] == []
