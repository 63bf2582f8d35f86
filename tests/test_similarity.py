"""`teach.py similarity`: renamed and reordered copies rank high, independent answers low, starter code not at all.

Five submissions to exercise 01, each the untouched student release plus answer cells: Ann's answers, Bob's
copy of them with every name changed and other comments, Cat's copy with the functions in another order
and split across cells, Dan's own independent answers, and Eve's blank notebook. Nothing is executed.
"""

from __future__ import annotations

import html
import json
import os
import re
import sys

import nbformat

from conftest import REPO_ROOT

EXERCISE_DIR = REPO_ROOT / "exercises"
MASTER = EXERCISE_DIR / "01_gpt_model.ipynb"
sys.path.insert(0, str(EXERCISE_DIR))
import similarity  # noqa: E402  (exercises/ is a folder of scripts)

ANN = ['''
def block_parameters(cfg):
    d = cfg.emb_dim
    hidden = 4 * d
    ff = d * hidden + hidden + hidden * d + d  # two linear layers with biases
    bias = d if cfg.qkv_bias else 0
    att = 3 * (d * d + bias) + d * d + d
    return ff, att
''', '''
def total_parameters(cfg):
    ff, att = block_parameters(cfg)
    d = cfg.emb_dim
    per_block = ff + att + 4 * d
    tok = cfg.vocab_size * d
    pos = cfg.context_length * d
    return tok + pos + cfg.n_layers * per_block + 2 * d + cfg.vocab_size * d
''', '''
def set_dropout_rates(model, embedding, shortcut, attention):
    model.drop_emb.p = embedding
    for blk in model.trf_blocks:
        blk.drop_shortcut.p = shortcut
        blk.att.dropout = attention
    return model

def causal_attention_weights(scores):
    n = scores.shape[-1]
    mask = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    masked = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(masked, dim=-1)
''']

RENAMES = {"d": "width", "hidden": "inner", "ff": "feedfwd", "bias": "b_qkv", "att": "attn_count", "per_block": "blk_total",
           "tok": "token_emb", "pos": "position_emb", "blk": "layer", "n": "length", "mask": "upper", "masked": "hidden_scores"}


def renamed(source: str) -> str:
    source = re.sub(r"#.*", "# counted as in the book", source)
    return re.sub(r"\b(" + "|".join(RENAMES) + r")\b", lambda m: RENAMES[m.group(1)], source)


BOB = [renamed(cell) for cell in ANN]
CAT = [renamed(ANN[2].split("\ndef causal")[0]), "def causal" + renamed(ANN[2].split("\ndef causal")[1]),
       renamed(ANN[1]), renamed(ANN[0])]
DAN = ['''
def block_parameters(cfg):
    e = cfg.emb_dim
    linear_one = e * (4 * e) + 4 * e
    linear_two = (4 * e) * e + e
    projections = []
    for _ in range(3):
        projections.append(e * e + (e if cfg.qkv_bias else 0))
    out = e * e + e
    return linear_one + linear_two, sum(projections) + out
''', '''
def total_parameters(config):
    a, b = block_parameters(config)
    layer_norms = 2 * (2 * config.emb_dim)
    everything = config.n_layers * (a + b + layer_norms)
    everything += (config.vocab_size + config.context_length) * config.emb_dim
    everything += config.emb_dim * 2
    everything += config.emb_dim * config.vocab_size
    return everything
''', '''
def set_dropout_rates(m, e, s, a):
    m.drop_emb.p = e
    blocks = list(m.trf_blocks)
    i = 0
    while i < len(blocks):
        setattr(blocks[i].drop_shortcut, "p", s)
        setattr(blocks[i].att, "dropout", a)
        i += 1
    return m
''', '''
def causal_attention_weights(scores):
    rows, cols = scores.shape[-2:]
    allowed = torch.arange(cols)[None, :] <= torch.arange(rows)[:, None]
    weights = torch.where(allowed, scores.exp(), torch.zeros(()))
    return weights / weights.sum(-1, keepdim=True)
''']


def submission(student: str, cells: list[str]) -> str:
    notebook = nbformat.reads(student, as_version=4)
    notebook.cells += [nbformat.v4.new_code_cell(source) for source in cells]
    return nbformat.writes(notebook)


def test_copies_rank_high_independent_answers_low_and_starter_code_not_at_all(built, tmp_path):
    folder = built(MASTER)
    student = (folder / "student" / MASTER.name).read_text()
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    for name, cells in (("ann", ANN), ("bob", BOB), ("cat", CAT), ("dan", DAN), ("eve", [])):
        (submissions / f"{name}.ipynb").write_text(submission(student, cells))
    (submissions / "<img src=x onerror=alert(1)>.ipynb").write_text(submission(student, ANN[:1]))
    (submissions / "broken.ipynb").write_text("{not json")

    solution = json.loads((folder / "autograder" / MASTER.name).read_text())
    pairs, against_solutions, skipped = similarity.compare_folder(submissions, json.loads(student), solution)
    share = {frozenset((m.first.name, m.second.name)): m.shares for m in pairs}
    assert min(share[frozenset(("ann.ipynb", "bob.ipynb"))]) >= 0.9  # renamed copy
    assert min(share[frozenset(("ann.ipynb", "cat.ipynb"))]) >= 0.8  # reordered, split and renamed copy
    assert max(share[frozenset(("ann.ipynb", "dan.ipynb"))]) <= 0.2  # independent answers
    assert max(share[frozenset(("bob.ipynb", "dan.ipynb"))]) <= 0.2
    top = {frozenset((m.first.name, m.second.name)) for m in pairs[:3]}
    assert top == {frozenset(p) for p in (("ann.ipynb", "bob.ipynb"), ("ann.ipynb", "cat.ipynb"),
                                          ("bob.ipynb", "cat.ipynb"))}
    eve = [m for m in pairs if "eve.ipynb" in (m.first.name, m.second.name)]
    assert eve and all(not m.shared for m in eve)  # the starter code alone matches nothing
    assert not next(m for m in against_solutions if m.first.name == "eve.ipynb").shared
    assert skipped == {"broken.ipynb": "not a notebook (JSONDecodeError)"}

    out = tmp_path / "report.html"
    said = similarity.report_folder(submissions, MASTER, out, built=folder)
    page = out.read_text()
    assert "not a verdict" in said and "not a verdict" in page and "Schleimer" in page
    assert "<img" not in page and html.escape("<img src=x onerror=alert(1)>.ipynb") in page
    assert "<mark>" in page and "ann.ipynb and bob.ipynb" in page
    assert not list(tmp_path.glob(".report.html.tmp-*"))


def test_tokens_drop_names_literals_comments_and_whitespace():
    one = similarity.normalised_tokens("x = foo(1, 'a')  # note\n")
    other = similarity.normalised_tokens("total   = bar(2.5, \"b\")\n")
    assert [t for t, _ in one] == [t for t, _ in other] == ["N", "=", "N", "(", "L", ",", "L", ")"]
    assert similarity.normalised_tokens("def f(:\n  return") != []  # broken code keeps what tokenizes


def test_a_shared_run_of_k_plus_window_minus_one_tokens_is_always_found_and_one_shorter_than_k_never():
    """Winnowing's guarantee (Schleimer et al. 2003): a shared run of K + WINDOW - 1 = 10 tokens always shares a
    fingerprint, whatever surrounds it; a run shorter than K = 7 tokens never does."""
    assert (similarity.K, similarity.WINDOW) == (7, 4)
    shared_ten = "x = a [ b ] ( c ) . d"  # 10 tokens once normalised: N = N [ N ] ( N ) . N
    shared_six = "x = a [ b ]"  # 6 tokens
    fillers = [("while not q : pass", "lambda : None or 1"), ("yield 5", "raise E"), ("del s", "assert 3")]
    # (each pair begins and ends with other tokens, so that the shared run cannot grow into its neighbours)

    def prints(source):
        return set(similarity.winnow(similarity.normalised_tokens(source)))

    for before, after in fillers:
        assert prints(f"{before}\n{shared_ten}\n") & prints(f"{after}\n{shared_ten}\n{after}\n")
        assert not prints(f"{before}\n{shared_six}\n{before}\n") & prints(f"{after}\n{shared_six}\n{after}\n")


def test_a_malformed_notebook_or_an_unencodable_character_costs_one_entry_not_the_report(tmp_path):
    """A notebook whose cell source is not text is listed as not compared (no traceback), and a lone surrogate
    in a cell (valid JSON: "\\ud800") or a file name that is not UTF-8 still lets the report be written."""
    built = tmp_path / "built"  # an exercise with no starter code: teach.build's layout, without otter
    for part in ("student", "autograder"):
        (built / part).mkdir(parents=True)
        (built / part / MASTER.name).write_text(json.dumps({"cells": []}))
    code = "def f(x):\n    total = 0\n    for i in range(x):\n        total = total + i * i - 1\n    return total\n"

    def notebook(source) -> str:
        return json.dumps({"cells": [{"cell_type": "code", "source": source, "metadata": {}, "outputs": []}]})

    submissions = tmp_path / "submissions"
    submissions.mkdir()
    (submissions / "ann.ipynb").write_text(notebook(code))
    (submissions / "bob.ipynb").write_text(notebook(code + "s = '\ud800'\n"))  # json.dumps writes \ud800
    (submissions / "cat.ipynb").write_text(notebook([1, 2]))
    (submissions / os.fsdecode(b"\xff-dan.ipynb")).write_text(notebook(code))

    out = tmp_path / "report.html"
    said = similarity.report_folder(submissions, MASTER, out, built=built)
    page = out.read_text(encoding="utf-8")
    assert "cat.ipynb: not a notebook (a code cell&#x27;s source is not text)" in page
    assert "ann.ipynb and bob.ipynb" in page and "-dan.ipynb" in page and "ann.ipynb and bob.ipynb: 100%" in said
