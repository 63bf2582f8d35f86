"""The course website: the README, docs/, the notebooks with their outputs and the teachers' pages, built offline.

    .venv/bin/pip install -e ".[site]"
    .venv/bin/python -m gptlora.teaching.site            # writes site/; open site/index.html

mkdocs with the Material theme and mkdocs-jupyter builds it from ``mkdocs.yml`` at the repository's top.
The pages are staged in ``build/site-src`` laid out as in the repository (README.md the home page,
``docs/``, ``notebooks/``, ``exercises/README.md`` and ``GRADING.md``, ``bench/README.md``, ``CHANGELOG.md``),
so the links between them work unchanged; a link to a file the site does not hold (a module, an exercise
notebook with its solutions) is pointed at that file in the repository on GitHub, from pyproject.toml's
``[project.urls] Repository``. Each notebook page opens with "Open in Colab" and "Download" buttons in
place of the Colab badge (whose image lives on Google's server; the site loads nothing from elsewhere).
Nothing from ``../shared`` is copied.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
STAGE = REPO_ROOT / "build" / "site-src"
SITE = REPO_ROOT / "site"
# What the site holds, by repository path (a folder: its *.md, plus NN_*.ipynb for notebooks/).
PAGES = ["README.md", "docs", "notebooks", "exercises/README.md", "exercises/GRADING.md", "bench/README.md",
         "CHANGELOG.md"]
MARKDOWN_LINK = re.compile(r"(\]\()([^)\s#]+)(#[^)\s]*)?(\))")
BADGE = re.compile(r"^\[!\[Open in Colab\]\([^)]*\)\]\(([^)]*)\)\n?$")


def repository_url() -> str:
    """pyproject.toml's ``[project.urls] Repository`` (the one setting; notebooks/add_colab_cells.py reads it too)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        found = re.search(r'(?ms)^\[project\.urls\][^\[]*?^Repository\s*=\s*"([^"]*)"',
                          (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
        return found.group(1).rstrip("/")
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["urls"][
        "Repository"].rstrip("/")


def site_files() -> list[Path]:
    """The repository files the site is built from, relative to the repository."""
    files = []
    for name in PAGES:
        path = REPO_ROOT / name
        if path.is_dir():
            files += sorted(path.glob("*.md")) + sorted(path.glob("[0-9][0-9]_*.ipynb"))
        elif path.is_file():
            files.append(path)
    return [path.relative_to(REPO_ROOT) for path in files]


def rewrite_links(text: str, page: Path, staged: set[Path], url: str) -> str:
    """``text`` (markdown of ``page``) with relative links to files outside the site pointed at GitHub."""
    def replace(match):
        target = match.group(2)
        if re.match(r"[a-z]+:", target) or target.startswith("/"):
            return match.group(0)
        normal = Path(*_normalise((page.parent / target).parts))
        if normal in staged or normal == Path("."):
            return match.group(0)
        kind = "tree" if (REPO_ROOT / normal).is_dir() else "blob"
        return f"{match.group(1)}{url}/{kind}/main/{normal.as_posix()}{match.group(3) or ''}{match.group(4)}"

    return MARKDOWN_LINK.sub(replace, text)


def _normalise(parts) -> list[str]:
    out: list[str] = []
    for part in parts:
        if part == "..":
            if out:
                out.pop()
        elif part not in (".", ""):
            out.append(part)
    return out


def buttons(notebook_name: str, colab_link: str) -> str:
    """The notebook page's two buttons (HTML, so that they render in a notebook's markdown cell too)."""
    return (f'<a class="md-button md-button--primary" href="{colab_link}">Open in Colab</a> '
            f'<a class="md-button" href="{notebook_name}" download>Download</a>\n')


def stage_notebook(source: Path, destination: Path, staged: set[Path], url: str) -> None:
    """Copy a notebook with buttons in place of the badge and its markdown links rewritten."""
    nb = json.loads(source.read_text(encoding="utf-8"))
    page = source.relative_to(REPO_ROOT)
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        lines = cell["source"] if isinstance(cell["source"], list) else cell["source"].splitlines(keepends=True)
        if index == 0 and lines and BADGE.match(lines[0]):
            lines = [buttons(source.name, BADGE.match(lines[0]).group(1))] + lines[1:]
        cell["source"] = rewrite_links("".join(lines), page, staged, url)
    destination.write_text(json.dumps(nb, indent=1, ensure_ascii=False), encoding="utf-8")


def stage(target: Path = STAGE) -> Path:
    """Lay out the site's sources in ``target`` (emptied first); returns it.

    Each README.md stays a README.md: mkdocs makes it its folder's index page, and links to it keep working.
    """
    url = repository_url()
    shutil.rmtree(target, ignore_errors=True)
    files = site_files()
    for file in files:
        destination = target / file
        destination.parent.mkdir(parents=True, exist_ok=True)
        if file.suffix == ".ipynb":
            stage_notebook(REPO_ROOT / file, destination, set(files), url)
        else:
            text = (REPO_ROOT / file).read_text(encoding="utf-8")
            destination.write_text(rewrite_links(text, file, set(files), url), encoding="utf-8")
    return target


def build(site_dir: Path = SITE) -> Path:
    """Stage the pages and build the site into ``site_dir`` with mkdocs (strict: a broken link fails)."""
    from mkdocs.commands.build import build as mkdocs_build
    from mkdocs.config import load_config

    import yaml

    stage()
    settings = yaml.safe_load((REPO_ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    settings["nav"] = [{title: chapters() if pages == "CHAPTERS" else pages} for entry in settings["nav"]
                       for title, pages in entry.items()]
    for plugin in settings["plugins"]:  # mkdocs-jupyter caches its conversions in build/, not in the working folder
        if isinstance(plugin, dict) and "mkdocs-jupyter" in plugin:
            plugin["mkdocs-jupyter"]["cache_dir"] = str(REPO_ROOT / "build" / "mkdocs-jupyter-cache")
    # A link to the repository in the footer; not repo_url, with which the theme asks GitHub's API for stars.
    settings.setdefault("extra", {})["social"] = [{"icon": "fontawesome/brands/github", "link": repository_url()}]
    settings.update(docs_dir=str(STAGE), site_dir=str(Path(site_dir).resolve()))
    config = load_config(config_file=io.StringIO(yaml.safe_dump(settings, sort_keys=False)))
    config.config_file_path = str(REPO_ROOT / "mkdocs.yml")
    mkdocs_build(config)
    return site_dir


def chapters() -> list[dict]:
    """The navigation's chapters: each notebooks/NN_*.ipynb in order, titled by its first heading."""
    entries = []
    for file in sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        first = json.loads(file.read_text(encoding="utf-8"))["cells"][0]["source"]
        heading = re.search(r"^#\s+(.+)$", "".join(first), re.M)
        entries.append({heading.group(1).strip() if heading else file.stem: f"notebooks/{file.name}"})
    return entries


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site-dir", type=Path, default=SITE, help="where to write the site (default: site/)")
    args = parser.parse_args(argv)
    try:
        site = build(args.site_dir)
    except ImportError as error:
        print(f"error: {error.name} is not installed; run `.venv/bin/pip install -e \".[site]\"` first",
              file=sys.stderr)
        return 1
    print(f"built {site}; open {site / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
