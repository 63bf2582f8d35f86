"""Verified, resumable file downloads with the standard library (urllib) and tqdm.

A download that breaks halfway must never be mistaken later for a complete file,
so :func:`download_file` keeps a strict rule: bytes go to ``<dest>.part``, and only
a file whose size (and SHA-256, when known) checks out is renamed to ``dest``.
An interrupted ``.part`` is resumed with an HTTP ``Range`` request next time.

Nothing here knows about GPT-2: callers pass the URLs (mirrors, tried in order)
and whatever they know about the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from .locks import exclusive_lock, lock_path_for

OFFLINE_ENV = "GPTLORA_OFFLINE"
USER_AGENT = "gptlora-downloader/0.1"
CHUNK_BYTES = 1 << 20
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 1.0  # first wait between attempts; doubles after each failure
DEFAULT_TIMEOUT_S = 30.0  # per connection attempt and per read, not for the whole file


class DownloadError(RuntimeError):
    """A file could not be downloaded (or verified); the message says what to do."""


class OfflineError(DownloadError):
    """Downloads are switched off (``GPTLORA_OFFLINE=1``) and a needed file is missing."""


def offline_mode() -> bool:
    """True when the environment asks for no network access (``GPTLORA_OFFLINE=1``)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes")


def place_by_hand_hint(directory: Path, sources: dict[str, list[str]]) -> str:
    """Instructions for installing files manually: ``sources`` maps file name -> URLs it comes from."""
    lines = [f"To install by hand, put these files in the directory {Path(directory).resolve()}:"]
    for name, urls in sources.items():
        lines.append(f"  {name}" + (f"   (from {urls[0]})" if urls else ""))
    lines.append("then run again; a file already there is used without touching the network.")
    return "\n".join(lines)


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    urls: list[str],
    dest: Path,
    *,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    desc: str | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff_s: float | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Download one file to ``dest`` from the first of ``urls`` that works; return ``dest``.

    ``expected_size`` (bytes) and ``expected_sha256`` (hex) are checked when given;
    otherwise the server's ``X-Linked-Size`` / ``X-Linked-Etag`` headers (the Hugging
    Face Hub sends them, on the redirect to its CDN) or ``Content-Length`` are used.
    A ``dest`` that already exists and passes the given checks is returned without
    touching the network. Transient failures (connection errors, timeouts, HTTP 5xx
    and 429) are retried ``retries`` times per URL, waiting ``backoff_s`` seconds,
    doubled each time (default :data:`DEFAULT_BACKOFF_S`); an attempt that made
    progress does not count. Raises :class:`OfflineError` when ``GPTLORA_OFFLINE=1``
    and the file is missing, :class:`DownloadError` when every URL failed.

    Safe under concurrency: processes asking for the same ``dest`` at once take turns
    on the lock ``<dest>.lock`` (see :mod:`gptlora.infra.locks`); the first downloads, the
    others then find the verified file and return it without downloading.
    """
    dest = Path(dest)
    # Without the lock a file may only be accepted, never deleted: another process may be replacing a damaged
    # copy with a good one while this check runs, and deleting on a stale verdict would remove the good one.
    if dest.is_file() and _verification_problem(dest, expected_size, expected_sha256) is None:
        return dest
    hint = place_by_hand_hint(dest.parent, {dest.name: list(urls)})
    if offline_mode():
        raise OfflineError(f"{OFFLINE_ENV}=1 and {dest} does not exist: unset {OFFLINE_ENV} to download it, or put "
                           f"{dest.name} there by hand\n{hint}")
    new_folders = [folder for folder in (dest.parent, *dest.parent.parents) if not folder.exists()]
    try:
        # One process downloads, the others wait here and then find the verified file (see locks.py).
        with exclusive_lock(lock_path_for(dest), f"downloading {dest}"):
            if _verified_or_removed(dest, expected_size, expected_sha256):  # under the lock: deleting is safe
                return dest
            part = dest.with_name(dest.name + ".part")
            backoff_s = DEFAULT_BACKOFF_S if backoff_s is None else backoff_s
            failures = []
            for url in urls:
                outcome = _download_from(url, part, expected_size, expected_sha256, desc or dest.name,
                                         retries, backoff_s, timeout_s)
                if outcome is None:
                    os.replace(part, dest)
                    return dest
                failures.append((url, outcome))
        # The first line is the whole report (what failed, why, what to do); the lines after it are details.
        first_url, first_outcome = failures[0]
        mirrors = f" (the {len(failures) - 1} other URL(s) failed too)" if len(failures) > 1 else ""
        details = "".join(f"  {url}\n    -> {outcome}\n" for url, outcome in failures)
        raise DownloadError(f"could not download {dest.name} into {dest.parent.resolve()}: {first_url} -> "
                            f"{first_outcome}{mirrors}; or put {dest.name} there by hand\n{details}{hint}")
    except BaseException:
        for folder in new_folders:  # deepest first; only folders this call made, and only while empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _verified_or_removed(dest: Path, expected_size: int | None, expected_sha256: str | None) -> bool:
    """True when ``dest`` exists and passes the given checks; a file that fails them is deleted (with a
    warning) so that it is downloaded again. Call it only while holding ``dest``'s lock."""
    if not dest.is_file():
        return False
    problem = _verification_problem(dest, expected_size, expected_sha256)
    if problem is None:
        return True
    print(f"warning: {dest} {problem}; downloading it again", file=sys.stderr)
    dest.unlink(missing_ok=True)
    return False


def _download_from(url, part, expected_size, expected_sha256, desc, retries, backoff_s, timeout_s) -> str | None:
    """Fetch ``url`` into ``part`` (resuming it), with retries; None on success, else why it failed."""
    failed_attempts, restarted_after_bad_file = 0, False
    while True:
        size_before = part.stat().st_size if part.exists() else 0
        try:
            claimed_size, claimed_sha256 = _fetch_once(url, part, desc, timeout_s)
        except urllib.error.HTTPError as error:
            if error.code == 416 and size_before:  # our .part is as long as the file or longer: start over
                part.unlink()
                continue
            reason = f"HTTP {error.code} {error.reason}: {_advice_for_status(error.code)}"
            if not _is_transient_status(error.code):
                return reason
        except (OSError, http.client.HTTPException, _IncompleteBody) as error:
            # URLError (no connection), timeouts, connection resets and early ends of the body.
            reason = f"network error: {getattr(error, 'reason', None) or error!r}; check the connection or proxy"
        else:
            problem = _verification_problem(part, expected_size or claimed_size, expected_sha256 or claimed_sha256)
            if problem is None:
                return None
            part.unlink()  # never keep bytes that failed verification, not even as .part
            if size_before and not restarted_after_bad_file:  # a stale .part may be the culprit: one fresh try
                restarted_after_bad_file = True
                continue
            return f"the downloaded file {problem}; it was deleted (a damaged mirror or a changed file?)"
        grew = part.exists() and part.stat().st_size > size_before
        if not grew:
            failed_attempts += 1
        if failed_attempts > retries:
            return f"{reason} (gave up after {failed_attempts} attempts)"
        time.sleep(backoff_s * 2 ** max(failed_attempts - 1, 0))


class _IncompleteBody(Exception):
    """The connection ended before the announced number of bytes arrived."""


class _HeaderRecorder(urllib.request.HTTPRedirectHandler):
    """Follows redirects like urllib does, remembering each redirect's headers.

    The Hugging Face Hub puts a file's size and SHA-256 (``X-Linked-Size``,
    ``X-Linked-Etag``) on the redirect to its CDN, not on the final response.
    """

    def __init__(self):
        self.seen = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.seen.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)  # keeps our Range header


def _fetch_once(url: str, part: Path, desc: str, timeout_s: float) -> tuple[int | None, str | None]:
    """One HTTP request that appends to (or restarts) ``part``; returns the size and hash the server claims."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    recorder = _HeaderRecorder()
    opener = urllib.request.build_opener(recorder)
    with opener.open(urllib.request.Request(url, headers=headers), timeout=timeout_s) as response:
        all_headers = [*recorder.seen, response.headers]
        linked_size = _first_header(all_headers, "X-Linked-Size")
        linked_etag = _first_header(all_headers, "X-Linked-Etag")
        if response.status != 206:
            offset = 0  # the server ignored Range (or none was sent): the body is the whole file
        body_length = response.headers.get("Content-Length")
        body_length = int(body_length) if body_length is not None else None
        total = offset + body_length if body_length is not None else None
        received = 0
        with open(part, "ab" if offset else "wb") as out, \
                tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=desc) as bar:
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    # urllib returns b"" rather than raising when a connection closes early, so count the bytes ourselves.
    if body_length is not None and received < body_length:
        raise _IncompleteBody(f"connection closed after {received} of {body_length} bytes")
    claimed_size = int(linked_size) if linked_size and linked_size.isdigit() else total
    return claimed_size, _sha256_from_etag(linked_etag)


def _first_header(header_sets, name: str) -> str | None:
    for headers in header_sets:
        if headers.get(name):
            return headers[name]
    return None


def _sha256_from_etag(etag: str | None) -> str | None:
    """The hex digest in an ETag like ``"4f5a..."`` or ``W/"..."``; None unless it looks like a SHA-256."""
    if not etag:
        return None
    value = etag.removeprefix("W/").strip('"').lower()
    return value if len(value) == 64 and all(c in "0123456789abcdef" for c in value) else None


def _verification_problem(path: Path, size: int | None, sha256: str | None) -> str | None:
    """None if ``path`` has the given size and SHA-256 (each checked only when known), else what is wrong."""
    found_size = path.stat().st_size
    if size is not None and found_size != size:
        return f"has {found_size} bytes, expected {size}"
    if sha256 is not None:
        found = sha256_of(path)
        if found != sha256.lower():
            return f"has SHA-256 {found}, expected {sha256.lower()}"
    return None


def _is_transient_status(code: int) -> bool:
    return code >= 500 or code in (408, 429)


def _advice_for_status(code: int) -> str:
    if code == 404:
        return "the server has no file at this URL; check the name and the base URL"
    if code in (401, 403):
        return "the server refused access; check the URL (a gated file needs credentials)"
    if _is_transient_status(code):
        return "the server is failing or busy; try again later or use another mirror"
    return "unexpected answer; check the URL"
