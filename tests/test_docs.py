"""The documentation points at things that exist: every relative link of the README and the pages
beside it reaches a file (and its #anchor a heading of that file), every module path written as
``gptlora/...py`` or ``gptlora.xxx`` names a module of the package (and, when it goes on past the
module, a name that module defines), and every test named (``test_x.py::test_y``) is in tests/.
Reads files only; imports nothing of gptlora.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "gptlora"
DOCS = sorted([REPO_ROOT / "README.md", REPO_ROOT / "CHANGELOG.md", REPO_ROOT / "bench" / "README.md",
               REPO_ROOT / "exercises" / "README.md", *(REPO_ROOT / "docs").glob("*.md")])
IDS = [str(path.relative_to(REPO_ROOT)) for path in DOCS]

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FILE_PATH = re.compile(r"(?<![\w./-])gptlora/[\w/]+\.py\b")
DOTTED_PATH = re.compile(r"(?<![\w./-])gptlora(?:\.\w+)+")
TEST_NAME = re.compile(r"(?<![\w./-])(?:tests/)?(test_\w+\.py)(?:::(\w+))?")


def prose_lines(text: str) -> list[str]:
    """The lines of a Markdown text outside fenced code blocks (indented code blocks are kept: the
    commands they hold name modules that must exist too)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def heading_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: the rendered text lower-cased, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays, its target goes
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 ... for repeated headings."""
    found: set[str] = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug, n = heading_slug(match.group(1)), 0
            while (slug if n == 0 else f"{slug}-{n}") in found:
                n += 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def broken_links(path: Path) -> list[str]:
    problems = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not ours to check offline
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                problems.append(f"{target}: no file {linked}")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                problems.append(f"{target}: no heading '#{anchor}' in {linked.name} "
                                f"(its anchors: {', '.join(sorted(anchors(linked)))})")
    return problems


def module_file(parts: list[str]) -> Path | None:
    """The file of the module ``gptlora.<parts>``, or None."""
    base = PACKAGE.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def top_level_names(path: Path) -> set[str]:
    """Names a module defines or imports at its top level (read with ast, never imported)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for target in targets for t in ast.walk(target) if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def missing_modules(path: Path) -> list[str]:
    problems = []
    text = "\n".join(prose_lines(path.read_text(encoding="utf-8")))
    for written in sorted(set(FILE_PATH.findall(text))):
        if not (REPO_ROOT / written).is_file():
            problems.append(f"{written}: no such file")
    for written in sorted(set(DOTTED_PATH.findall(text))):
        parts = written.split(".")[1:]
        depth = max((n for n in range(1, len(parts) + 1) if module_file(parts[:n])), default=0)
        if depth == 0:
            problems.append(f"{written}: no module gptlora.{parts[0]}")
        elif depth < len(parts):
            module = module_file(parts[:depth])
            name = parts[depth]
            if name not in top_level_names(module) and module_file(parts[:depth] + [name]) is None:
                problems.append(f"{written}: gptlora.{'.'.join(parts[:depth])} defines no '{name}'")
    return problems


def missing_tests(path: Path) -> list[str]:
    """``test_file.py`` and ``test_file.py::test_function`` named in a page that tests/ does not hold."""
    problems = []
    text = "\n".join(prose_lines(path.read_text(encoding="utf-8")))
    for file_name, function in sorted(set(TEST_NAME.findall(text))):
        test_file = REPO_ROOT / "tests" / file_name
        if not test_file.is_file():
            problems.append(f"{file_name}: no such file in tests/")
        elif function and function not in top_level_names(test_file):
            problems.append(f"{file_name}::{function}: no such test function")
    return problems


@pytest.mark.parametrize("path", DOCS, ids=IDS)
def test_relative_links_reach_a_file_and_a_heading(path):
    problems = broken_links(path)
    assert not problems, f"{path.relative_to(REPO_ROOT)}: broken links:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("path", DOCS, ids=IDS)
def test_module_paths_name_modules_that_exist(path):
    problems = missing_modules(path)
    assert not problems, f"{path.relative_to(REPO_ROOT)}: module paths that do not exist:\n  " + \
        "\n  ".join(problems)


@pytest.mark.parametrize("path", DOCS, ids=IDS)
def test_named_tests_exist(path):
    """docs/numbers.md names the test of every number; a renamed test must not leave a dead name there."""
    problems = missing_tests(path)
    assert not problems, f"{path.relative_to(REPO_ROOT)}: tests that do not exist:\n  " + "\n  ".join(problems)


def test_the_checks_catch_what_they_look_for(tmp_path):
    """A page with a dead link, a dead anchor, a moved module and a renamed function is caught on each."""
    (tmp_path / "other.md").write_text("# A heading, with `code`\n\ntext\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-heading-with-code) [gone](missing.md) [bad](other.md#nope) [self](#top)\n"
                    "# Top\n`gptlora/cli.py`, `gptlora/cli/app.py`, `gptlora.classifier.finetune_spam`, "
                    "`gptlora.recipes.finetune.finetune_spam`, `gptlora.nothing`\n"
                    "`test_docs.py::test_named_tests_exist`, `tests/test_docs.py::test_gone`, `test_gone.py`\n"
                    "```\n[fenced](nowhere.md) gptlora/fenced_only.py\n```\n", encoding="utf-8")
    links = broken_links(page)
    assert [problem.split(":")[0] for problem in links] == ["missing.md", "other.md#nope"], links
    modules = missing_modules(page)
    assert [problem.split(":")[0] for problem in modules] == \
        ["gptlora/cli.py", "gptlora.classifier.finetune_spam", "gptlora.nothing"], modules
    tests = missing_tests(page)
    assert [problem.split(":")[0] for problem in tests] == ["test_docs.py", "test_gone.py"], tests


def test_every_page_is_reachable_from_the_readme():
    """A page nobody links to is a page nobody finds."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    linked = {(REPO_ROOT / target.partition("#")[0]).resolve() for target in LINK.findall(readme)}
    unlinked = [str(path.relative_to(REPO_ROOT)) for path in DOCS
                if path != REPO_ROOT / "README.md" and path.resolve() not in linked]
    assert not unlinked, f"pages the README does not link to: {unlinked}"
