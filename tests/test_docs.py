"""The docs: a strict site build (every link and anchor valid), every page in the nav, the README the door."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"

# The CI script runs the first word for word; the second is what a newcomer types first.
TEST_COMMAND = "python3.11 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/pytest"
DEMO_COMMAND = "python3.11 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/shapline demo"


def nav_pages(entries: object) -> list[str]:
    """The page paths of an mkdocs nav, at any depth."""
    if isinstance(entries, str):
        return [entries]
    if isinstance(entries, list):
        return [page for entry in entries for page in nav_pages(entry)]
    if isinstance(entries, dict):
        return [page for value in entries.values() for page in nav_pages(value)]
    return []


def readme_docs_links() -> list[tuple[str, str]]:
    """The README's markdown links into docs/, as (page, anchor or "")."""
    targets = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    return [
        (page, anchor) for page, _, anchor in (t.partition("#") for t in targets) if page.startswith("docs/")
    ]


def heading_anchors(page: Path) -> set[str]:
    """The ids of a page's headings as mkdocs' toc (and, for plain headings, GitHub) makes them."""
    anchors, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#{1,6} (.+)", line)):
            anchors.add(slugify(re.sub(r"[`*]", "", heading.group(1)), "-"))
    return anchors


def test_the_site_builds_strict(tmp_path: Path) -> None:
    # --strict turns mkdocs.yml's `validation` warnings (a link to a missing page or anchor, a page
    # outside the nav) into a failed build.
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", "mkdocs.yml"]
        + ["--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stderr}\n{built.stdout}"
    assert (tmp_path / "site" / "config" / "index.html").is_file()


def test_every_page_is_in_the_nav() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    in_nav = nav_pages(config["nav"])
    pages = sorted(path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md"))
    assert sorted(set(pages) - set(in_nav)) == [], "docs pages missing from mkdocs.yml's nav"
    assert sorted(set(in_nav) - set(pages)) == [], "nav entries without a page in docs/"


def test_the_readmes_links_into_docs_exist() -> None:
    links = readme_docs_links()
    assert links, "the README links no docs page"
    missing = sorted({page for page, _ in links if not (ROOT / page).is_file()})
    assert missing == [], f"README links to docs pages that do not exist: {missing}"
    broken = sorted(
        f"{page}#{anchor}" for page, anchor in links if anchor and anchor not in heading_anchors(ROOT / page)
    )
    assert broken == [], f"README links to anchors no heading of the page makes: {broken}"
    linked = {page.removeprefix("docs/") for page, _ in links}
    unlinked = sorted(
        page
        for page in (path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md"))
        if page != "index.md" and page not in linked
    )
    assert unlinked == [], f"docs pages the README's 'Where to read on' does not link: {unlinked}"


def test_the_readme_is_a_short_front_door() -> None:
    size = README.stat().st_size
    assert size < 10_000, f"README.md is {size} bytes: move the detail into docs/"
    readme = README.read_text()
    assert TEST_COMMAND in readme, "the quick-start test command changed: the CI script runs it verbatim"
    assert DEMO_COMMAND in readme, "the quick-start demo command changed"
