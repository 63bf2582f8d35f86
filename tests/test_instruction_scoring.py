"""Scoring instruction responses: the offline metrics, and the judge against a loopback fake server."""

import http.server
import json
import socket
import threading

import pytest

from gptlora.instruction_scoring import (check_judge_url, exact_match, judge_prompt, normalize_answer, offline_scores,
                                         parse_score, score_responses, token_f1, with_judge_scores)

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
                if judge.status in (301, 302, 307, 308):  # a redirect to the same server's other path
                    self.send_response(judge.status)
                    self.send_header("Location", "/elsewhere/chat/completions")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
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
    with FakeJudge(["85", " 40.\n"]) as judge:
        scores = score_responses(RECORDS, judge.url, "llama3")
    assert [s["judge"] for s in scores["per_record"]] == [85, 40] and scores["judge"] == 62.5
    path, body = judge.asked[0]
    assert path == "/v1/chat/completions" and body["model"] == "llama3" and body["temperature"] == 0
    assert body["messages"] == [{"role": "user", "content": judge_prompt(RECORDS[0])}]
    assert judge_prompt(RECORDS[0]).startswith("Given the input `Below is an instruction that describes a task.")
    assert "score the model response `the capital of France is Paris` on a scale from 0 to 100" in \
        judge_prompt(RECORDS[0])


def test_replies_without_a_score_are_counted_and_left_out():
    assert [parse_score(r) for r in ("100", "7.", " 0 ", "I would say 250", "none")] == [100, 7, 0, None, None]
    # Only a reply that is the number is read (the book: int(reply)); a number somewhere in it is not the score.
    for reply in ("On a scale from 0 to 100, I'd give it 85", "-20", "7.5", "101", "85..", "Score: 40 out of 100"):
        assert parse_score(reply) is None, reply
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
    assert status == 0 and out.strip().splitlines() == ["test split (2 records): exact match 50.0%, token F1 0.786",
                                                        "judge (llama3): 62.5/100"]


def test_the_score_command_keeps_the_offline_line_when_the_judge_fails(run_cli, tmp_path, capsys):
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(RECORDS))
    with FakeJudge([], status=500) as judge:
        status, out = run_cli(["score", str(path), "--judge-url", judge.url])
    assert status == 1 and out.strip() == "test split (2 records): exact match 50.0%, token F1 0.786"
    assert "answered HTTP 500" in capsys.readouterr().err


def test_the_score_command_refuses_judging_records_without_an_instruction(run_cli, tmp_path, capsys):
    path = tmp_path / "responses.json"
    path.write_text(json.dumps([{key: value for key, value in record.items() if key != "instruction"}
                                for record in RECORDS]))
    status, _ = run_cli(["score", str(path), "--judge-url", "http://127.0.0.1:9/v1"])
    errors = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(errors) == 1 and "records without a text field instruction" in errors[0]
    status, _ = run_cli(["score", str(path), "--judge-url", "file:///etc/passwd"])
    assert status == 1 and "http" in capsys.readouterr().err


class NotHTTP:
    """A TCP server on 127.0.0.1 that answers every connection with a line that is not HTTP."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/v1"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:  # closed
                return
            with connection:
                connection.recv(65536)
                connection.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.close()


def test_a_server_that_does_not_speak_http_or_sends_no_text_is_one_clear_error():
    with NotHTTP() as server:
        with pytest.raises(ConnectionError, match="does not answer in HTTP"):
            score_responses(RECORDS, server.url)
    with FakeJudge([None]) as judge:  # {"content": null}
        with pytest.raises(ConnectionError, match="did not answer in the chat-completions format"):
            score_responses(RECORDS, judge.url)


def test_the_judge_url_must_be_http_and_redirects_and_proxies_are_not_followed(monkeypatch):
    assert check_judge_url("https://judge.example:8443/v1") == "https://judge.example:8443/v1"
    for bad in ("file:///etc/passwd", "localhost:11434/v1", "http:///v1", "ftp://host/v1", ""):
        with pytest.raises(ValueError, match="is not an http\\(s\\) address with a host"):
            check_judge_url(bad)
        with pytest.raises(ValueError, match="is not an http"):
            score_responses(RECORDS, bad or "x")
    with FakeJudge([], status=302) as judge:
        with pytest.raises(ConnectionError, match="answered HTTP 302 .*not followed"):
            score_responses(RECORDS, judge.url)
    assert [path for path, _ in judge.asked] == ["/v1/chat/completions"]  # asked once, not at /elsewhere
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # a proxy that is not there: not used
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with FakeJudge(["70", "30"]) as judge:
        assert score_responses(RECORDS, judge.url)["judge"] == 50


def test_the_offline_scores_are_computed_before_and_kept_without_the_judge():
    scores = offline_scores(RECORDS)
    assert scores == score_responses(RECORDS)
    with FakeJudge([], status=500) as judge:
        with pytest.raises(ConnectionError):
            with_judge_scores(scores, RECORDS, judge.url)
    assert "judge" not in scores and scores["exact_match"] == 0.5  # what a caller wrote first stays as it was
    with FakeJudge(["85", "no"]) as judge:
        judged = with_judge_scores(scores, RECORDS, judge.url)
    assert judged["exact_match"] == 0.5 and judged["judge"] == 85 and judged["judge_unparsed"] == 1
    assert [s["judge"] for s in judged["per_record"]] == [85, None] and "judge" not in scores["per_record"][0]
