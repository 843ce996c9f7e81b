"""The README's code-to-paper table points at real lines: each `name` or `Class.name` (file:line) is a def or
class of that name at that line, inside that class when one is named, so the table cannot go stale silently."""
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))


def test_code_to_paper_table_points_at_the_definitions():
    text = open(os.path.join(HERE, "README.md")).read()
    table = text[text.index("## Where the method is"):text.index("## Differences from the authors' code")]
    refs = re.findall(r"`(?:(\w+)\.)?(\w+)` \((\w+\.py):(\d+)\)", table)
    assert len(refs) >= 20, refs
    for owner, name, path, line in refs:
        lines = open(os.path.join(HERE, path)).read().split("\n")[:int(line)]
        assert re.match(rf"\s*(def|class) {name}\b", lines[-1]), f"{path}:{line} is not {name}: {lines[-1]!r}"
        if owner:                                                       # the nearest class above it
            cls = next(s for s in reversed(lines) if s.startswith("class "))
            assert re.match(rf"class {owner}\b", cls), f"{path}:{line} is not in class {owner}: {cls!r}"
