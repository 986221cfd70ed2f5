"""The docs against the tree: a short README, links that resolve, a file map that lists every module.

No imports of the project: these read Markdown and list files, so they run in any environment in
milliseconds.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
LAYOUT = DOCS / "layout.md"
PACKAGES = ("train", "convert", "edge_runtime", "benchmarks")
README_MAX_LINES = 250  # issue 22: a README read in five minutes; the rest lives in docs/

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
# [text](target) and ![alt](target), with an optional "title"; <img src="target">.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMG_SRC = re.compile(r"<img\s[^>]*\bsrc=\"([^\"]+)\"")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _prose(text: str) -> str:
    """The text with fenced code blocks blanked: a `#` comment in a bash block is not a heading."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays, its target goes
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(_prose(path.read_text())):
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
    return out


def links(path: Path) -> list[str]:
    text = _prose(path.read_text())
    return LINK.findall(text) + IMG_SRC.findall(text)


def test_slug_follows_github():
    assert slug("The released field model: `malaria-field`") == "the-released-field-model-malaria-field"
    assert slug("The malaria model on the phone itself (LiteRT.js), the device as fallback") == (
        "the-malaria-model-on-the-phone-itself-litertjs-the-device-as-fallback")
    assert slug("1. Split by patient") == "1-split-by-patient"


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, (
        f"README.md has {n} lines (at most {README_MAX_LINES}): move the detail to a page under docs/ and link it")


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(md: Path):
    broken = []
    for target in links(md):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ... not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        dest = (md.parent / file_part).resolve() if file_part else md
        if not dest.exists():
            broken.append(f"{target}: no such file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{md.relative_to(ROOT)} has links that do not resolve:\n  " + "\n  ".join(broken)


def file_map() -> list[str]:
    """Every backticked path in the table under layout.md's "Which file owns what" heading."""
    text = LAYOUT.read_text()
    start = text.index("## Which file owns what")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end != -1 else None]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [t for row in rows for t in re.findall(r"`([^`\s]+)`", row) if t.split("/", 1)[0] in PACKAGES]


def test_layout_file_map_lists_every_module():
    named = {t for t in file_map() if t.endswith(".py")}
    modules = {p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    missing = sorted(modules - named)
    assert not missing, "docs/layout.md's file map does not name: " + ", ".join(missing)


def test_layout_file_map_names_only_files_that_exist():
    gone = sorted(t for t in file_map() if not (ROOT / t).exists())
    assert not gone, "docs/layout.md's file map names files that do not exist: " + ", ".join(gone)
