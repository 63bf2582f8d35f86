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

import http.client
import json
import re
import string
import urllib.error
import urllib.parse
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


def check_judge_url(url: str) -> str:
    """``url`` if it is an http(s) address with a host (the judge API's base); else a one-line ValueError."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--judge-url {url!r} is not an http(s) address with a host; expected the API's base, "
                         "e.g. http://localhost:11434/v1 (Ollama)")
    return url


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """Refuse to follow redirects: the judge is one local server, a redirect is an error (an HTTPError 3xx)."""

    def redirect_request(self, *args, **kwargs):
        return None


# No proxies (the judge is local: an http_proxy variable must not send the responses elsewhere), no redirects.
JUDGE_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirects)


def ask_judge(prompt: str, judge_url: str, judge_model: str, timeout_s: float = 120.0) -> str:
    """The judge's reply to ``prompt`` (greedy, seed 123) from an OpenAI-compatible chat-completions server.

    ``judge_url`` must be an http(s) address (see :func:`check_judge_url`); it is asked
    directly, without proxies, and a redirect is not followed. A server that cannot be
    reached or answers oddly is a ConnectionError of one line.
    """
    url = check_judge_url(judge_url).rstrip("/") + "/chat/completions"
    body = dict(model=judge_model, messages=[{"role": "user", "content": prompt}], temperature=0, seed=123)
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with JUDGE_OPENER.open(request, timeout=timeout_s) as response:
            reply = json.loads(response.read().decode("utf-8"))
        content = reply["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise TypeError("content is not a string")
        return content
    except urllib.error.HTTPError as error:
        if 300 <= error.code < 400:
            raise ConnectionError(f"the judge at {url} answered HTTP {error.code} (a redirect to "
                                  f"{error.headers.get('Location')}), which is not followed; pass the final "
                                  "address as --judge-url") from None
        raise ConnectionError(f"the judge at {url} answered HTTP {error.code} ({error.reason}); is {judge_model!r} "
                              "a model it serves?") from None
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConnectionError(f"cannot reach the judge at {url} ({reason}); start the server (e.g. `ollama "
                              "serve`) or leave out --judge-url for the offline scores") from None
    except http.client.HTTPException as error:  # e.g. BadStatusLine: what answered is not an HTTP server
        raise ConnectionError(f"the judge at {url} does not answer in HTTP ({type(error).__name__}); is --judge-url "
                              "the address of an OpenAI-compatible server?") from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise ConnectionError(f"the judge at {url} did not answer in the chat-completions format "
                              "(choices[0].message.content, a string); is --judge-url the API's base, e.g. "
                              "http://localhost:11434/v1?") from None


SCORE_REPLY = re.compile(r"\s*(\d{1,3})\.?\s*")


def parse_score(reply: str) -> int | None:
    """The judge's score if the whole reply is a whole number from 0 to 100 (white space and one final
    period allowed, "85."), else None: the book keeps ``int(reply)`` and skips replies it cannot read.
    ("On a scale from 0 to 100, I'd give it 85", "-20" and "7.5" are all None: not guessed from.)"""
    match = SCORE_REPLY.fullmatch(reply)
    return int(match.group(1)) if match and int(match.group(1)) <= 100 else None


def offline_scores(records: list[dict]) -> dict:
    """The scores that need no server, of records with ``output`` and ``model_response``: ``exact_match`` and
    ``token_f1`` (0 to 1) per record (``per_record``) and their means, and ``records``, their number."""
    per_record = [dict(exact_match=exact_match(entry["model_response"], entry["output"]),
                       token_f1=token_f1(entry["model_response"], entry["output"])) for entry in records]
    summary = {name: sum(s[name] for s in per_record) / len(per_record) if per_record else float("nan")
               for name in ("exact_match", "token_f1")}
    return dict(summary, records=len(per_record), per_record=per_record)


def with_judge_scores(scores: dict, records: list[dict], judge_url: str, judge_model: str = "llama3",
                      timeout_s: float = 120.0) -> dict:
    """``scores`` (from :func:`offline_scores` of the same ``records``) with the judge's added: ``judge`` per
    record (0 to 100, the book's score; None for a reply that is not one) and ``judge`` (the mean of the
    numbers), ``judge_model`` and ``judge_unparsed`` (replies left out of the mean) in the summary.

    A judge that fails is a one-line ConnectionError: compute and keep the offline scores first.
    """
    judged = [parse_score(ask_judge(judge_prompt(entry), judge_url, judge_model, timeout_s)) for entry in records]
    numbers = [score for score in judged if score is not None]
    return dict(scores, judge=sum(numbers) / len(numbers) if numbers else float("nan"), judge_model=judge_model,
                judge_unparsed=len(judged) - len(numbers),
                per_record=[dict(own, judge=score) for own, score in zip(scores["per_record"], judged)])


def score_responses(records: list[dict], judge_url: str | None = None, judge_model: str = "llama3",
                    timeout_s: float = 120.0) -> dict:
    """:func:`offline_scores` of ``records``, and with ``judge_url`` :func:`with_judge_scores` too.

    A judge that fails raises (a one-line ConnectionError) and the offline scores are lost:
    a caller that must keep them calls the two functions itself.
    """
    scores = offline_scores(records)
    return with_judge_scores(scores, records, judge_url, judge_model, timeout_s) if judge_url else scores
