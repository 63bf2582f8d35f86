"""Scoring instruction responses: the offline metrics, and the judge against a loopback fake server."""

import http.server
import json
import threading

import pytest

from gptlora.instruction_scoring import (exact_match, judge_prompt, normalize_answer, parse_score, score_responses,
                                         token_f1)

RECORDS = [
    {"instruction": "Name the capital of France.", "input": "", "output": "The capital of France is Paris.",
     "model_response": "the capital of France is Paris"},
    {"instruction": "Convert 5 km to meters.", "input": "", "output": "5 kilometers is 5000 meters.",
     "model_response": "5000 meters."},
]


class FakeJudge:
    """A chat-completions endpoint on 127.0.0.1 answering ``replies`` in turn; records what it was asked."""

    def __init__(self, replies, status=200):
        self.replies, self.asked, self.status = list(replies), [], status
        judge = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.asked.append((self.path, body))
                if judge.status != 200:
                    self.send_error(judge.status)
                    return
                answer = json.dumps({"choices": [{"message": {"role": "assistant",
                                                              "content": judge.replies.pop(0)}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_exact_match_and_token_f1():
    assert normalize_answer("The  Capital, of France!") == "capital of france"
    assert exact_match(RECORDS[0]["model_response"], RECORDS[0]["output"]) == 1.0
    assert exact_match("Paris", "The capital of France is Paris.") == 0.0
    # "5000 meters" vs "5 kilometers is 5000 meters": 2 words in common, precision 2/2, recall 2/5.
    assert token_f1("5000 meters.", "5 kilometers is 5000 meters.") == pytest.approx(2 * 1 * 0.4 / 1.4)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("a b", "c d") == 0.0


def test_scores_without_a_server():
    scores = score_responses(RECORDS)
    assert scores["records"] == 2 and scores["exact_match"] == 0.5
    assert scores["token_f1"] == pytest.approx((1.0 + 2 * 0.4 / 1.4) / 2)
    assert "judge" not in scores


def test_the_judge_is_asked_the_books_question_and_its_numbers_are_averaged():
    with FakeJudge(["85", "Score: 40 out of 100, because"]) as judge:
        scores = score_responses(RECORDS, judge.url, "llama3")
    assert [s["judge"] for s in scores["per_record"]] == [85, 40] and scores["judge"] == 62.5
    path, body = judge.asked[0]
    assert path == "/v1/chat/completions" and body["model"] == "llama3" and body["temperature"] == 0
    assert body["messages"] == [{"role": "user", "content": judge_prompt(RECORDS[0])}]
    assert judge_prompt(RECORDS[0]).startswith("Given the input `Below is an instruction that describes a task.")
    assert "score the model response `the capital of France is Paris` on a scale from 0 to 100" in \
        judge_prompt(RECORDS[0])


def test_replies_without_a_score_are_counted_and_left_out():
    assert [parse_score(r) for r in ("100", "7.", "I would say 250", "none")] == [100, 7, None, None]
    with FakeJudge(["no idea", "90"]) as judge:
        scores = score_responses(RECORDS, judge.url)
    assert scores["judge"] == 90 and scores["judge_unparsed"] == 1


def test_an_unreachable_or_failing_judge_is_one_clear_error():
    with FakeJudge([], status=404) as judge:
        with pytest.raises(ConnectionError, match="answered HTTP 404"):
            score_responses(RECORDS, judge.url, "missing-model")
        url = judge.url
    with pytest.raises(ConnectionError, match="cannot reach the judge at"):
        score_responses(RECORDS, url)


def test_the_score_command(run_cli, tmp_path):
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(RECORDS))
    status, out = run_cli(["score", str(path)])
    assert status == 0 and out.strip() == "test split (2 records): exact match 50.0%, token F1 0.786"
    with FakeJudge(["85", "40"]) as judge:
        status, out = run_cli(["score", str(path), "--judge-url", judge.url])
    assert status == 0 and out.strip().endswith("judge (llama3) 62.5/100")
