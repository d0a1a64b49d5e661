"""The README and docs/ link check: every relative link and image resolves, every #fragment names a heading, every
docs page is reachable from an index. Web links are only checked to be well-formed (the tests run offline)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache
from itertools import pairwise
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parent.parent
INDEXES = [ROOT / "README.md", ROOT / "docs" / "README.md"]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@cache
def _tokens(page: Path) -> list:
    return MarkdownIt("commonmark").enable("table").parse(page.read_text(encoding="utf-8"))


def links(page: Path) -> Iterator[str]:
    """Every link and image target of a page, in order."""
    for token in _tokens(page):
        for child in token.children or []:
            if child.type == "link_open":
                yield str(child.attrs["href"])
            elif child.type == "image":
                yield str(child.attrs["src"])


def slug(heading: str, seen: dict[str, int]) -> str:
    """GitHub's anchor for a heading: lowercase, only letters, digits, spaces, hyphens and underscores kept, spaces
    made hyphens; a repeated anchor gets -1, -2, ..."""
    base = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
    count = seen.get(base, 0)
    seen[base] = count + 1
    return f"{base}-{count}" if count else base


@cache
def anchors(page: Path) -> frozenset[str]:
    """The anchors of a Markdown page's headings (text and code spans, as GitHub renders them)."""
    tokens, seen = _tokens(page), {}
    return frozenset(
        slug("".join(c.content for c in inline.children or [] if c.type in ("text", "code_inline")), seen)
        for opening, inline in pairwise(tokens)
        if opening.type == "heading_open"
    )


def problem(page: Path, target: str) -> str | None:
    """What is wrong with one link target of `page`, or None."""
    parts = urlsplit(target)
    if parts.scheme in ("http", "https"):
        return None if parts.netloc and " " not in target else "malformed web link"
    if parts.scheme == "mailto":
        return None if "@" in parts.path else "malformed mailto link"
    if parts.scheme or parts.netloc:
        return f"unexpected scheme {parts.scheme!r}"
    path = (page.parent / unquote(parts.path)).resolve() if parts.path else page
    if not path.exists():
        return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} does not exist"
    if parts.fragment and path.suffix == ".md" and parts.fragment not in anchors(path):
        return f"no heading #{parts.fragment} in {path.relative_to(ROOT)}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_links_resolve(page: Path) -> None:
    found = list(links(page))
    assert found, f"{page.relative_to(ROOT)} has no links at all: is it parsed?"
    broken = [f"{target} ({why})" for target in found if (why := problem(page, target))]
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n  " + "\n  ".join(broken)


def test_every_docs_page_is_linked_from_an_index() -> None:
    linked = {
        (index.parent / unquote(urlsplit(target).path)).resolve()
        for index in INDEXES
        for target in links(index)
        if not urlsplit(target).scheme and urlsplit(target).path
    }
    orphans = [str(page.relative_to(ROOT)) for page in PAGES[1:] if page not in linked and page not in INDEXES]
    assert not orphans, f"docs pages linked from neither README.md nor docs/README.md: {orphans}"


def test_slug_is_githubs() -> None:
    seen: dict[str, int] = {}
    assert slug("Many tasks: residency, waiting and the tiers", seen) == "many-tasks-residency-waiting-and-the-tiers"
    assert slug("Quickstart: `make demo`", seen) == "quickstart-make-demo"
    assert [slug("History", seen) for _ in range(3)] == ["history", "history-1", "history-2"]
