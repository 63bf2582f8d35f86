"""Scoring instruction responses: offline overlap metrics, and a larger model as judge (book, section 7.8).

The book scores each test response by asking a larger model (Llama 3 through
Ollama) for "a score from 0 to 100" against the reference output. That needs a
server; so that a class without one still gets a number, two metrics need nothing:

- *exact match*: 1 if the response equals the reference after normalising
  (lower case, punctuation and articles removed, white space collapsed), else 0;
- *token F1*: the harmonic mean of precision and recall of the normalised words
  the response shares with the reference (the SQuAD metric, Rajpurkar et al., 2016).

Both are crude for free-form answers ("The capital is Paris." vs "Paris") but
comparable between runs. The judge speaks the OpenAI-compatible chat-completions
protocol that Ollama, llama.cpp's server, vLLM and LM Studio serve locally:
``judge_url`` is the API's base, e.g. ``http://localhost:11434/v1``.
"""

from __future__ import annotations

import json
import re
import string
import urllib.error
import urllib.request
from collections import Counter

from .instruction_data import format_input

ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, without punctuation and articles, single spaces: what the overlap metrics compare."""
    text = "".join(char for char in text.lower() if char not in string.punctuation)
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(response: str, reference: str) -> float:
    """1.0 when the normalised response and reference are equal, else 0.0."""
    return float(normalize_answer(response) == normalize_answer(reference))


def token_f1(response: str, reference: str) -> float:
    """F1 of the normalised words in common (counted with multiplicity); 1.0 when both are empty."""
    said, wanted = normalize_answer(response).split(), normalize_answer(reference).split()
    if not said or not wanted:
        return float(said == wanted)
    common = sum((Counter(said) & Counter(wanted)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(said), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def judge_prompt(entry: dict) -> str:
    """The book's request to the judge for a record with ``model_response``: an integer from 0 to 100."""
    return (f"Given the input `{format_input(entry)}` and correct output `{entry['output']}`, score the model "
            f"response `{entry['model_response']}` on a scale from 0 to 100, where 100 is the best score. "
            "Respond with the integer number only.")


def ask_judge(prompt: str, judge_url: str, judge_model: str, timeout_s: float = 120.0) -> str:
    """The judge's reply to ``prompt`` (greedy, seed 123) from an OpenAI-compatible chat-completions server.

    A server that cannot be reached or answers oddly is a ConnectionError of one line.
    """
    url = judge_url.rstrip("/") + "/chat/completions"
    body = dict(model=judge_model, messages=[{"role": "user", "content": prompt}], temperature=0, seed=123)
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            reply = json.loads(response.read().decode("utf-8"))
        return reply["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as error:
        raise ConnectionError(f"the judge at {url} answered HTTP {error.code} ({error.reason}); is {judge_model!r} "
                              "a model it serves?") from None
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConnectionError(f"cannot reach the judge at {url} ({reason}); start the server (e.g. `ollama "
                              "serve`) or leave out --judge-url for the offline scores") from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise ConnectionError(f"the judge at {url} did not answer in the chat-completions format "
                              "(choices[0].message.content); is --judge-url the API's base, e.g. "
                              "http://localhost:11434/v1?") from None


def parse_score(reply: str) -> int | None:
    """The first whole number from 0 to 100 in the judge's reply; None if there is none (the book skips those)."""
    match = re.search(r"\b(100|\d{1,2})\b", reply)
    return int(match.group(1)) if match else None


def score_responses(records: list[dict], judge_url: str | None = None, judge_model: str = "llama3",
                    timeout_s: float = 120.0) -> dict:
    """Scores of records with ``output`` and ``model_response``: per record and their means.

    Always the offline ``exact_match`` and ``token_f1`` (0 to 1); with ``judge_url``
    also ``judge`` (0 to 100, the book's score; replies without a number are counted
    in ``judge_unparsed`` and left out of the mean).
    """
    per_record = []
    for entry in records:
        scores = dict(exact_match=exact_match(entry["model_response"], entry["output"]),
                      token_f1=token_f1(entry["model_response"], entry["output"]))
        if judge_url:
            scores["judge"] = parse_score(ask_judge(judge_prompt(entry), judge_url, judge_model, timeout_s))
        per_record.append(scores)
    summary = {name: sum(s[name] for s in per_record) / len(per_record) if per_record else float("nan")
               for name in ("exact_match", "token_f1")}
    if judge_url:
        judged = [s["judge"] for s in per_record if s["judge"] is not None]
        summary.update(judge=sum(judged) / len(judged) if judged else float("nan"), judge_model=judge_model,
                       judge_unparsed=len(per_record) - len(judged))
    return dict(summary, records=len(per_record), per_record=per_record)
