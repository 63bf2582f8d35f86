"""download_file against a loopback HTTP server: resume, retries, verification, mirrors, offline."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from gptlora.infra import atomic
from gptlora.infra import download
from gptlora.infra.download import DownloadError, OfflineError, download_file

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 serving ``files`` (URL path -> bytes) from memory.

    Misbehaviour is scripted per path:
      ``statuses[path]``: a list of status codes answered (and consumed) before serving normally;
      ``drop_after[path]``: on the first request, send this many bytes, then close the connection;
      ``corrupt``: paths whose body has one byte flipped (headers still describe the true file);
      ``ignore_range``: answer 200 with the whole file even when a Range header comes;
      ``redirects[path] = target``: answer 302 to ``target`` with the Hub's X-Linked-* headers;
      ``linked_headers``: send X-Linked-Size / X-Linked-Etag on direct answers too.
    ``requests`` records (path, Range header or None) for every request.
    """

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.statuses: dict[str, list[int]] = {}
        self.drop_after: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.ignore_range = False
        self.redirects: dict[str, str] = {}
        self.linked_headers = False
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                server.handle(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def _send_linked(self, handler, body: bytes):
        handler.send_header("X-Linked-Size", str(len(body)))
        handler.send_header("X-Linked-Etag", f'"{hashlib.sha256(body).hexdigest()}"')

    def handle(self, handler):
        path, range_header = handler.path, handler.headers.get("Range")
        self.requests.append((path, range_header))
        if self.statuses.get(path):
            handler.send_error(self.statuses[path].pop(0))
            return
        if path in self.redirects:
            handler.send_response(302)
            handler.send_header("Location", self.redirects[path])
            self._send_linked(handler, self.files[self.redirects[path]])
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if path not in self.files:
            handler.send_error(404)
            return
        body = self.files[path]
        start = int(range_header.removeprefix("bytes=").rstrip("-")) if range_header and not self.ignore_range else 0
        sent = body[start:]
        if path in self.corrupt:
            sent = bytes([sent[0] ^ 0xFF]) + sent[1:]
        handler.send_response(206 if start else 200)
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        if self.linked_headers:
            self._send_linked(handler, body)
        handler.send_header("Content-Length", str(len(sent)))
        handler.end_headers()
        if path in self.drop_after:
            handler.wfile.write(sent[: self.drop_after.pop(path)])
            handler.wfile.flush()
            handler.close_connection = True
            return
        handler.wfile.write(sent)


@pytest.fixture
def server():
    with LoopbackServer({"/files/data.bin": PAYLOAD, "/cdn/data.bin": PAYLOAD}) as srv:
        yield srv


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch):
    monkeypatch.setattr(download, "DEFAULT_BACKOFF_S", 0.0)
    monkeypatch.delenv(download.OFFLINE_ENV, raising=False)


def test_clean_download_verifies_and_leaves_no_part(server, tmp_path):
    dest = tmp_path / "sub" / "data.bin"
    result = download_file([server.url + "/files/data.bin"], dest, expected_size=len(PAYLOAD),
                           expected_sha256=PAYLOAD_SHA256)
    assert result == dest and dest.read_bytes() == PAYLOAD
    assert list(dest.parent.iterdir()) == [dest]
    assert server.requests == [("/files/data.bin", None)]


def test_dropped_connection_is_resumed_with_a_range_request(server, tmp_path):
    server.drop_after["/files/data.bin"] = 40_000
    dest = download_file([server.url + "/files/data.bin"], tmp_path / "data.bin", expected_sha256=PAYLOAD_SHA256)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/files/data.bin", None), ("/files/data.bin", "bytes=40000-")]


def test_existing_part_is_resumed_and_a_server_ignoring_range_restarts_it(server, tmp_path):
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:1000])
    download_file([server.url + "/files/data.bin"], dest)
    assert server.requests[-1] == ("/files/data.bin", "bytes=1000-") and dest.read_bytes() == PAYLOAD

    dest.unlink()
    (tmp_path / "data.bin.part").write_bytes(b"x" * 1000)  # garbage: must be overwritten, not appended to
    server.ignore_range = True
    download_file([server.url + "/files/data.bin"], dest, expected_size=len(PAYLOAD))
    assert server.requests[-1] == ("/files/data.bin", "bytes=1000-") and dest.read_bytes() == PAYLOAD


@pytest.mark.parametrize("check", ["sha256-argument", "sha256-header", "size-argument"])
def test_corrupt_or_wrong_sized_body_is_rejected_and_deleted(server, tmp_path, check):
    dest = tmp_path / "data.bin"
    if check == "size-argument":
        kwargs, expected_message = dict(expected_size=len(PAYLOAD) + 1), "expected 102401"
    else:
        server.corrupt.add("/files/data.bin")
        server.linked_headers = check == "sha256-header"
        kwargs = dict(expected_sha256=PAYLOAD_SHA256) if check == "sha256-argument" else {}
        expected_message = f"expected {PAYLOAD_SHA256}"
    with pytest.raises(DownloadError, match=expected_message) as error:
        download_file([server.url + "/files/data.bin"], dest, **kwargs)
    assert "it was deleted" in str(error.value)
    assert list(tmp_path.iterdir()) == []  # neither data.bin nor data.bin.part


def test_hash_from_the_hubs_redirect_headers_is_checked(server, tmp_path):
    server.redirects["/resolve/data.bin"] = "/cdn/data.bin"
    dest = download_file([server.url + "/resolve/data.bin"], tmp_path / "good.bin")
    assert dest.read_bytes() == PAYLOAD
    server.corrupt.add("/cdn/data.bin")
    with pytest.raises(DownloadError, match="SHA-256"):
        download_file([server.url + "/resolve/data.bin"], tmp_path / "bad.bin")
    assert not (tmp_path / "bad.bin").exists()


def test_404_is_not_retried_and_the_error_names_url_status_and_remedy(server, tmp_path):
    url = server.url + "/files/missing.bin"
    with pytest.raises(DownloadError) as error:
        download_file([url], tmp_path / "missing.bin")
    message = str(error.value)
    assert url in message and "HTTP 404" in message and "check the name and the base URL" in message
    assert str(tmp_path.resolve()) in message and "missing.bin" in message
    assert len(server.requests) == 1


def test_500_is_retried_then_succeeds_or_gives_up_with_a_clear_error(server, tmp_path):
    server.statuses["/files/data.bin"] = [500, 503]
    download_file([server.url + "/files/data.bin"], tmp_path / "data.bin", retries=2)
    assert len(server.requests) == 3

    server.statuses["/files/data.bin"] = [500] * 3
    with pytest.raises(DownloadError, match=r"HTTP 500 .*try again later.*gave up after 3 attempts"):
        download_file([server.url + "/files/data.bin"], tmp_path / "other.bin", retries=2)
    assert not (tmp_path / "other.bin").exists()


def test_mirrors_are_tried_in_order(server, tmp_path):
    urls = [server.url + "/files/missing.bin", "http://127.0.0.1:9/data.bin", server.url + "/cdn/data.bin"]
    dest = download_file(urls, tmp_path / "data.bin", retries=0)
    assert dest.read_bytes() == PAYLOAD
    assert [path for path, _ in server.requests] == ["/files/missing.bin", "/cdn/data.bin"]


def test_unreachable_network_says_where_to_place_the_file(tmp_path):
    with pytest.raises(DownloadError) as error:
        download_file(["http://127.0.0.1:9/weights.bin"], tmp_path / "w" / "weights.bin", retries=1)
    message = str(error.value)
    assert "network error" in message and "http://127.0.0.1:9/weights.bin" in message
    assert f"put these files in the directory {(tmp_path / 'w').resolve()}" in message and "weights.bin" in message


def test_offline_mode_never_touches_the_network(server, tmp_path, monkeypatch):
    monkeypatch.setenv(download.OFFLINE_ENV, "1")
    with pytest.raises(OfflineError, match=rf"(?s)GPTLORA_OFFLINE=1.*{tmp_path.resolve()}.*data.bin"):
        download_file([server.url + "/files/data.bin"], tmp_path / "data.bin")
    (tmp_path / "data.bin").write_bytes(PAYLOAD)  # placed by hand
    assert download_file([server.url + "/files/data.bin"], tmp_path / "data.bin") == tmp_path / "data.bin"
    assert server.requests == []


def test_existing_file_failing_a_pinned_check_is_downloaded_again(server, tmp_path):
    dest = tmp_path / "data.bin"
    dest.write_bytes(PAYLOAD[:10])
    download_file([server.url + "/files/data.bin"], dest, expected_sha256=PAYLOAD_SHA256)
    assert dest.read_bytes() == PAYLOAD and len(server.requests) == 1


def test_replace_atomically_keeps_the_old_file_when_writing_fails(tmp_path):
    dest = tmp_path / "out.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.replace_atomically(dest) as tmp:
            Path(tmp).write_text("half")
            raise RuntimeError("crash while writing")
    assert dest.read_text() == "old" and list(tmp_path.iterdir()) == [dest]
    with atomic.replace_atomically(dest) as tmp:
        Path(tmp).write_text("new")
    assert dest.read_text() == "new" and list(tmp_path.iterdir()) == [dest]


def test_a_stale_check_outside_the_lock_never_deletes_a_file_another_process_just_downloaded(
        server, tmp_path, monkeypatch):
    # Process C starts checking a damaged data.bin; meanwhile process A (holding the lock) replaces it with a
    # good copy. C's verdict "damaged" is stale by the time it returns: C must not delete A's good file.
    dest = tmp_path / "data.bin"
    dest.write_bytes(PAYLOAD[:10])
    real_check, calls = download._verification_problem, []

    def check_while_another_process_replaces_the_file(path, size, sha256):
        calls.append(path)
        verdict = real_check(path, size, sha256)
        if len(calls) == 1:  # C's first check, made without the lock
            good = tmp_path / "from-process-a"
            good.write_bytes(PAYLOAD)
            good.replace(dest)  # what A's download_file does when it finishes
        return verdict

    monkeypatch.setattr(download, "_verification_problem", check_while_another_process_replaces_the_file)
    result = download_file([server.url + "/files/data.bin"], dest, expected_sha256=PAYLOAD_SHA256)
    assert result == dest and dest.read_bytes() == PAYLOAD
    assert server.requests == []  # under the lock C found A's verified file and used it
