"""The pages users read name files that exist: a moved file must not leave a dead path behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: a path of this repository inside backticks: it starts at one of the top-level folders or files
CODE_PATH = re.compile(
    r"`((?:config|worker|docs|scripts|deploy|tests|requirements)/[\w./-]*\w/?|Dockerfile|compose[\w.]*\.yaml)"
)
LINK = re.compile(r"\]\(([^)#\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_path_a_page_names_exists(page: Path) -> None:
    text = page.read_text()
    named = [REPO / path for path in CODE_PATH.findall(text)]
    linked = [page.parent / target for target in LINK.findall(text) if "://" not in target]
    assert named or linked
    missing = sorted({str(path.relative_to(REPO)) for path in named + linked if not path.resolve().exists()})
    assert not missing, f"{page.name} names paths that do not exist: {missing}"
