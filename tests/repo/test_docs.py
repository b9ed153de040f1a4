"""The repository explains itself: every `DESIGN.md §N` cited in code or docs exists in
docs/DESIGN.md, and nothing points to the team's notes outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DESIGN = REPO / "docs" / "DESIGN.md"


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    keep = (".py", ".md", ".yml", ".yaml", ".sh", ".toml", "Makefile", "Dockerfile", "run")
    return [REPO / p for p in out if p.endswith(keep) and not p.startswith("benchmarks/results")
            and (REPO / p).is_file()]


def design_sections() -> set[str]:
    """'1', '1.4', ... from headings `## 1. Title` and `### 1.4 Title`."""
    heads = re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", DESIGN.read_text(), re.M)
    return set(heads)


def test_every_cited_design_section_exists():
    sections = design_sections()
    assert {"1", "1.4", "2", "3", "4", "5", "9"} <= sections
    cited = []
    for path in tracked_text_files():
        for m in re.finditer(r"DESIGN(?:\.md)? §([\d.]+(?:/§[\d.]+)*)", path.read_text()):
            for ref in m.group(1).split("/§"):
                cited.append((path.relative_to(REPO), ref.rstrip(".")))
    assert cited, "no citations found: the pattern is wrong"
    missing = [(str(p), ref) for p, ref in cited if ref not in sections]
    assert not missing, f"cited sections not in docs/DESIGN.md: {missing}"


def test_design_citations_name_the_file():
    """A bare section citation once meant a document outside the repository; name the file."""
    pattern = re.compile(r"\bDESIGN" + r" §[\d.]+|where DESIGN" + r" is\b")  # split: no self-match
    bare = [(str(p.relative_to(REPO)), m.group(0)) for p in tracked_text_files()
            for m in pattern.finditer(p.read_text())]
    assert not bare


def test_nothing_points_outside_the_repository():
    outside = ("../" + "shared", "shared/" + "DESIGN")  # spelled apart so this file passes
    offenders = [str(p.relative_to(REPO)) for p in tracked_text_files()
                 if any(o in p.read_text() for o in outside)]
    assert not offenders
