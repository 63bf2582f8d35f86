"""Copying, reported: rank pairs of submissions (and each against the master's solutions) by shared answer code.

    python exercises/teach.py similarity SUBMISSIONS_DIR --exercise 01_gpt_model [--out similarity.html]

The method is MOSS's: winnowed fingerprints of normalised token k-grams (S. Schleimer, D. S. Wilkerson and
A. Aiken, "Winnowing: Local Algorithms for Document Fingerprinting", SIGMOD 2003). Each code cell is read
with Python's ``tokenize``: every name becomes one token ``N`` (so renaming variables changes nothing),
every literal one token ``L``, keywords and operators stay, comments and whitespace are dropped. Every run
of ``K`` tokens is hashed, and in each window of ``WINDOW`` consecutive hashes the smallest is kept: two
cells sharing a run of at least ``K + WINDOW - 1`` tokens share a fingerprint, and a shared run shorter
than ``K`` tokens never counts. Fingerprints are per cell, so reordering cells (or the functions in them)
changes little. The starter code (the code of the student release: the skeleton, the checks) is removed
first, line by line and by fingerprint, so that what every student got counts for nobody.

Nothing is executed: the notebooks are read as JSON, by the grader's safe reading (regular files only, never
through a link, size-capped). The HTML report escapes everything it shows. A high overlap is a lead for a
person to read, not a verdict: short answers to the same question can coincide, and a copy can be disguised.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import keyword
import tokenize
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from gptlora.infra.atomic import replace_atomically
from gptlora.teaching.run_submission import code_cells

K = 7  # tokens per k-gram: a shared run shorter than this is noise and never counts
WINDOW = 4  # hashes per winnowing window: any shared run of K + WINDOW - 1 = 10 tokens is found
PAIRS_SHOWN = 30  # pairs whose matched cells the report shows side by side
DROPPED = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER,
           getattr(tokenize, "FSTRING_MIDDLE", -1), getattr(tokenize, "FSTRING_END", -1)}
LITERALS = {tokenize.NUMBER, tokenize.STRING, getattr(tokenize, "FSTRING_START", -1)}
VERDICT = ("This is a lead for a person to check, not a verdict: students answering the same short question can "
           "write the same code independently, and a disguised copy can score low.")


def normalised_tokens(source: str) -> list[tuple[str, int]]:
    """``(token, line)`` for each token of ``source``: names -> ``N``, literals -> ``L``, keywords and
    operators as they are; comments and whitespace dropped. Code that does not tokenize keeps its start."""
    tokens = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type in DROPPED or token.type == tokenize.ERRORTOKEN and not token.string.strip():
                continue
            if token.type == tokenize.NAME:
                text = token.string if keyword.iskeyword(token.string) else "N"
            else:
                text = "L" if token.type in LITERALS else token.string
            tokens.append((text, token.start[0]))
    except (tokenize.TokenError, SyntaxError):  # IndentationError is a SyntaxError: keep what was read
        pass
    return tokens


def winnow(tokens: list[tuple[str, int]]) -> dict[int, tuple[int, int]]:
    """The winnowed fingerprints of ``tokens``: ``{hash of a K-gram: (its first line, its last line)}``.

    Robust winnowing: in each window of ``WINDOW`` consecutive K-gram hashes the smallest (the rightmost of
    equal ones) is selected; a cell shorter than one window keeps its smallest hash."""
    hashes = []
    for start in range(len(tokens) - K + 1):
        gram = tokens[start:start + K]
        digest = hashlib.blake2b("\x1f".join(text for text, _ in gram).encode(), digest_size=8).digest()
        hashes.append((int.from_bytes(digest, "big"), gram[0][1], gram[-1][1]))
    if not hashes:
        return {}
    selected = {}
    for start in range(max(1, len(hashes) - WINDOW + 1)):
        window = hashes[start:start + WINDOW]
        smallest = min(range(len(window)), key=lambda i: (window[i][0], -i))
        value, first, last = window[smallest]
        selected.setdefault(value, (first, last))
    return selected


@dataclass
class Document:
    """One notebook's answer code: per code cell its lines (starter lines blanked) and its fingerprints."""

    name: str
    cells: list[list[str]] = field(default_factory=list)
    prints: list[dict[int, tuple[int, int]]] = field(default_factory=list)

    @property
    def fingerprints(self) -> set[int]:
        return set().union(*self.prints) if self.prints else set()


def document(name: str, notebook: dict, starter_lines: set[str], starter_prints: set[int]) -> Document:
    """``notebook``'s answer code: its code cells without the lines of the starter code (blanked, so that
    line numbers stay), fingerprinted, less the fingerprints of the starter code itself."""
    result = Document(name)
    for source in code_cells(notebook):
        lines = ["" if line.strip() in starter_lines else line for line in source.splitlines()]
        prints = {h: span for h, span in winnow(normalised_tokens("\n".join(lines))).items() if h not in starter_prints}
        result.cells.append(lines)
        result.prints.append(prints)
    return result


def starter_of(student_notebook: dict) -> tuple[set[str], set[int]]:
    """The lines (stripped, non-empty) and fingerprints of the student release's code: what counts for no one."""
    lines, prints = set(), set()
    for source in code_cells(student_notebook):
        lines |= {line.strip() for line in source.splitlines() if line.strip()}
        prints |= set(winnow(normalised_tokens(source)))
    return lines, prints


@dataclass(frozen=True)
class Match:
    """Two documents' shared fingerprints, and what share of each one's fingerprints that is."""

    first: Document
    second: Document
    shared: frozenset

    @property
    def shares(self) -> tuple[float, float]:
        return tuple(len(self.shared) / len(d.fingerprints) if d.fingerprints else 0.0 for d in (self.first, self.second))


def ranked_pairs(documents: list[Document]) -> list[Match]:
    """Every pair of documents, most shared fingerprints first (the larger of the two shares breaks ties)."""
    matches = [Match(a, b, frozenset(a.fingerprints & b.fingerprints)) for a, b in combinations(documents, 2)]
    return sorted(matches, key=lambda m: (-len(m.shared), -max(m.shares), m.first.name, m.second.name))


def read_notebooks(folder: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """The notebooks of ``folder`` as parsed JSON, read as ``teach.py grade`` reads them (regular files only,
    never through a link, size-capped); and, apart, the entries that could not be read, with why."""
    from scoring import MAX_NOTEBOOK_BYTES, PARSE_ERRORS, Unreadable
    from teach import submissions_in

    parsed, skipped = {}, {}
    for name, content in submissions_in(folder).items():
        if isinstance(content, Unreadable):
            skipped[name] = content.reason
            continue
        if len(content) > MAX_NOTEBOOK_BYTES:
            skipped[name] = f"larger than {MAX_NOTEBOOK_BYTES >> 20} MB"
            continue
        try:
            notebook = json.loads(content)
        except PARSE_ERRORS as error:
            skipped[name] = f"not a notebook ({type(error).__name__})"
            continue
        if not isinstance(notebook, dict) or not isinstance(notebook.get("cells"), list):
            skipped[name] = "not a notebook (no list of cells)"
            continue
        try:
            code_cells(notebook)  # a source that is a list of non-strings must cost this entry, not the report
        except TypeError:
            skipped[name] = "not a notebook (a code cell's source is not text)"
            continue
        parsed[name] = notebook
    return parsed, skipped


def compare_folder(folder: Path, student_notebook: dict, solution_notebook: dict, read=None):
    """The ranked pairs of submissions, each submission against the solutions, and the unreadable entries
    (``read``: what :func:`read_notebooks` returned for ``folder``, when it was read already)."""
    starter_lines, starter_prints = starter_of(student_notebook)
    notebooks, skipped = read or read_notebooks(folder)
    documents = [document(name, notebook, starter_lines, starter_prints) for name, notebook in sorted(notebooks.items())]
    solutions = document("the master's solutions", solution_notebook, starter_lines, starter_prints)
    against_solutions = sorted((Match(d, solutions, frozenset(d.fingerprints & solutions.fingerprints))
                                for d in documents), key=lambda m: (-m.shares[0], m.first.name))
    return ranked_pairs(documents), against_solutions, skipped


def _cell_html(lines: list[str], marked: set[int]) -> str:
    rows = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            text = html.escape(line)
            rows.append(f"<mark>{text}</mark>" if number in marked else text)
    return "<pre>" + "\n".join(rows) + "</pre>"


def _marked_lines(prints: dict[int, tuple[int, int]], shared: frozenset) -> set[int]:
    return {line for h, (first, last) in prints.items() if h in shared for line in range(first, last + 1)}


def side_by_side(match: Match) -> str:
    """The cells of ``match.first`` holding shared fingerprints, each beside the cell of ``match.second``
    that shares most with it; shared lines marked."""
    parts = []
    for index, prints in enumerate(match.first.prints):
        common = match.shared & set(prints)
        if not common:
            continue
        other = max(range(len(match.second.prints)), key=lambda j: len(common & set(match.second.prints[j])))
        parts.append("<tr><td>" + _cell_html(match.first.cells[index], _marked_lines(prints, match.shared))
                     + "</td><td>" + _cell_html(match.second.cells[other],
                                                _marked_lines(match.second.prints[other], match.shared))
                     + "</td></tr>")
    return "".join(parts)


def _percent(share: float) -> str:
    return f"{100 * share:.0f}%"


def report_html(exercise: str, pairs: list[Match], against_solutions: list[Match], skipped: dict[str, str]) -> str:
    """The report page: the verdict warning, the ranked tables, then the shared cells of the top pairs."""
    e = html.escape
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Similarity: {e(exercise)}</title>",
           "<style>td,th{border:1px solid #ccc;padding:2px 6px;vertical-align:top}table{border-collapse:collapse}"
           "mark{background:#fd8}pre{margin:0}</style></head><body>",
           f"<h1>Similarity of the answers to {e(exercise)}</h1><p><strong>{e(VERDICT)}</strong></p>",
           f"<p>Method: winnowed fingerprints of normalised code (Schleimer, Wilkerson and Aiken, SIGMOD 2003, as MOSS "
           f"does): names and literals as one token each, comments and whitespace dropped, {K}-token runs, windows "
           f"of {WINDOW}; the starter code of the student release is removed first. A percentage is the share of "
           f"that notebook's fingerprints found in the other.</p>",
           "<h2>Pairs of submissions</h2><table><tr><th>#</th><th>submission</th><th>submission</th>"
           "<th>shared fingerprints</th><th>of the first</th><th>of the second</th></tr>"]
    for rank, match in enumerate(pairs, start=1):
        if not match.shared:
            break
        link = f"<a href='#pair{rank}'>{len(match.shared)}</a>" if rank <= PAIRS_SHOWN else str(len(match.shared))
        out.append(f"<tr><td>{rank}</td><td>{e(match.first.name)}</td><td>{e(match.second.name)}</td><td>{link}</td>"
                   f"<td>{_percent(match.shares[0])}</td><td>{_percent(match.shares[1])}</td></tr>")
    out.append("</table><h2>Each submission against the master's solutions</h2><table><tr><th>submission</th>"
               "<th>shared fingerprints</th><th>of the submission</th></tr>")
    for match in against_solutions:
        out.append(f"<tr><td>{e(match.first.name)}</td><td>{len(match.shared)}</td>"
                   f"<td>{_percent(match.shares[0])}</td></tr>")
    out.append("</table>")
    if skipped:
        out.append("<h2>Not compared</h2><ul>" + "".join(f"<li>{e(name)}: {e(why)}</li>"
                                                          for name, why in sorted(skipped.items())) + "</ul>")
    for rank, match in enumerate(pairs[:PAIRS_SHOWN], start=1):
        if match.shared:
            out.append(f"<h2 id='pair{rank}'>{rank}. {e(match.first.name)} and {e(match.second.name)}</h2><table>"
                       f"<tr><th>{e(match.first.name)}</th><th>{e(match.second.name)}</th></tr>"
                       f"{side_by_side(match)}</table>")
    return "\n".join(out) + "</body></html>\n"


def report_folder(folder: Path, master: Path, out: Path, built: Path | None = None) -> str:
    """Compare the submissions in ``folder`` (answers to ``master``'s exercise) and write the HTML report
    ``out`` atomically; returns a few lines for the terminal. ``built``: the exercise's ``teach.build``
    folder (its student release and solution notebook), built here when not given."""
    import tempfile

    from scoring import safe_text
    from teach import build

    read = read_notebooks(folder)  # first: a wrong folder is said before the release is built
    with tempfile.TemporaryDirectory() as tmp:
        built = built or build(master, Path(tmp))
        student = json.loads((built / "student" / master.name).read_text())
        solution = json.loads((built / "autograder" / master.name).read_text())
    pairs, against_solutions, skipped = compare_folder(folder, student, solution, read)
    with replace_atomically(out) as tmp_html:
        # backslashreplace: a lone surrogate (a cell's "\ud800", a file name that is not UTF-8) is shown, not fatal
        tmp_html.write_text(report_html(master.stem, pairs, against_solutions, skipped), encoding="utf-8",
                            errors="backslashreplace")
    lines = [f"wrote {out}: {len(pairs)} pairs ranked. {VERDICT}"]
    for match in pairs[:5]:
        if match.shared:
            lines.append(f"  {safe_text(match.first.name)} and {safe_text(match.second.name)}: "
                         f"{_percent(match.shares[0])} / {_percent(match.shares[1])} shared")
    return "\n".join(lines)
