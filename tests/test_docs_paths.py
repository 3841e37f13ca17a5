"""Every repository path and image that README.md and docs/*.md name exists.

A path is a markdown link or image target without a scheme, or a backticked word that starts
with one of the repository's top-level folders (or names a top-level file) — `models/...`,
`speckle_kernels/...`, `csrc/...`, `benchmarks/...`, `tests/...`, `docs/...`. Placeholders
(<device>, DIR, *, ...) and the run outputs the tools write (runs/, OUT/) are not paths.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("models/", "speckle_kernels/", "csrc/", "benchmarks/", "tests/", "docs/", ".ci/")
TOP_FILES = ("setup.py", "pyproject.toml", "README.md")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"`([^`\s]+)`")
PLACEHOLDER = re.compile(r"[<>*{}$]|\bDIR\b|\bFILE\b|\.\.\.")


def named_paths(text: str) -> list[tuple[int, str]]:
    """(line number, path) of every path the markdown text names."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for target in LINK.findall(line):
            if "://" in target or target.startswith(("#", "mailto:")):
                continue
            found.append((number, target.split("#", 1)[0]))
        for word in CODE.findall(line):
            word = word.rstrip(".,:;")
            if word.startswith(TOP) or word in TOP_FILES:
                found.append((number, word))
    return [(n, p) for n, p in found if p and not PLACEHOLDER.search(p)]


def resolve(doc: Path, target: str) -> Path:
    # links resolve against the document's folder; backticked repository paths against the root
    relative = (doc.parent / target)
    return relative if relative.exists() else ROOT / target


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_named_path_exists(doc):
    missing = [f"{doc.relative_to(ROOT)}:{n}: {p}" for n, p in named_paths(doc.read_text()) if not resolve(doc, p).exists()]
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(missing)


def test_the_check_sees_paths():
    # The check must find the paths it is meant to check (a regex that matched nothing would
    # pass every document): the README names docs pages and at least one committed figure.
    named = {p for _, p in named_paths((ROOT / "README.md").read_text())}
    assert any(p.startswith("docs/") and p.endswith(".md") for p in named), named
    assert any(p.endswith(".png") for p in named), named
    assert not (ROOT / "tests/no/such/file.py").exists()
    assert [p for _, p in named_paths("see `tests/no/such/file.py` and ![x](docs/none.png)")] == \
        ["docs/none.png", "tests/no/such/file.py"]

