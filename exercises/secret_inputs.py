"""The grader's inputs, drawn per grading run from a secret the teacher keeps.

`grading_spec.py` is public (it is in this repository), and so are the master notebooks with their
solutions: fixed seeds there would let a student compute every expected answer at home and hand in a
table. So the numbers in the spec are *salts*, not seeds. Each grading run draws a fresh nonce, and
every seed and drawn number of a case becomes

    HMAC-SHA256(key, nonce | exercise | question | case | attempt | where in the case | salt)

with ``key`` read from a key file outside the repository (made on first use, 0600). Two runs draw
different inputs; a table computed from the public spec misses. The sandboxed process only ever sees
the resolved inputs (plain seeds and numbers), never the key.

Resolved here, on the trusted side (the sandbox gets the result):

- ``"seed"`` of any tagged input (``{"$randn": [3, 4], "seed": 7}``) and the argument of
  ``{"$random_config": 7}``: a drawn seed;
- ``{"$seed": salt}``: a drawn seed, for a probe or function that takes one;
- ``{"$int": [low, high], "salt": s, "step": k}``: ``k * n`` for an integer ``n`` in ``[low, high]``;
- ``{"$uniform": [low, high], "salt": s, "digits": 2}``: a float in ``[low, high]``, rounded;
- ``{"$words": [fewest, most], "salt": s}``: a string of that many random lowercase words;
- ``{"$ragged": [rows, shortest, longest], "high": h, "salt": s}``: a list of ``rows`` lists of ints.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import secrets
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_KEY_FILE = Path("~/.config/gptlora/grading-key")
KEY_HEX_CHARS = 64  # 32 random bytes, written as hex
REPOSITORY = Path(__file__).resolve().parent.parent
SEED_RANGE = 2**31  # torch.Generator().manual_seed and random.Random take any of these


@dataclass(frozen=True)
class Secret:
    """What one grading run draws its inputs from: the teacher's key and this run's nonce."""

    key: bytes
    nonce: str

    @classmethod
    def for_this_run(cls, key: bytes) -> Secret:
        return cls(key, secrets.token_hex(16))


def grading_key(path: Path = DEFAULT_KEY_FILE) -> bytes:
    """The teacher's key from ``path``, made there first (0600, atomically) when there is none.

    Two graders starting at once each write a full key to a temporary file of their own and *link* it to
    ``path``: the link fails for the second, which then reads the first one's key. No grader ever reads a
    half-written key, and a key once made is never replaced."""
    path = path.expanduser().absolute()
    if path.resolve().is_relative_to(REPOSITORY):
        raise ValueError(f"the grading key file {path} is inside the repository, where students can read it; "
                         f"choose one outside it with --key-file (default {DEFAULT_KEY_FILE})")
    if not path.exists() and not path.is_symlink():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".grading-key-")  # mode 0600
        try:
            os.write(descriptor, (secrets.token_hex(KEY_HEX_CHARS // 2) + "\n").encode())
            os.fsync(descriptor)
            os.close(descriptor)
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass  # another grader made it first: use theirs
        finally:
            os.unlink(temporary)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as error:
        raise ValueError(f"the grading key file {path} cannot be read ({error.strerror}); expected a regular "
                         f"file of {KEY_HEX_CHARS} hex characters; remove it to have a new one made") from None
    with os.fdopen(descriptor, "rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        text = file.read(4 * KEY_HEX_CHARS).strip()
    if not stat.S_ISREG(mode) or mode & 0o077:
        raise ValueError(f"the grading key file {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
                         f"expected mode 600: run chmod 600 {path}")
    try:
        key = bytes.fromhex(text.decode())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) * 2 != KEY_HEX_CHARS:
        raise ValueError(f"the grading key file {path} does not hold {KEY_HEX_CHARS} hex characters; "
                         f"remove it to have a new one made")
    return key


def draw(secret: Secret, *where) -> int:
    """A number in ``[0, 2**64)`` that only the key's holder can predict, for the place ``where`` names."""
    message = "|".join([secret.nonce, *map(str, where)]).encode()
    return int.from_bytes(hmac.new(secret.key, message, hashlib.sha256).digest()[:8], "big")


def resolve(value, secret: Secret, *where):
    """``value`` (a case of the spec, or part of one) with its seeds and drawn numbers resolved for ``secret``;
    ``where`` names the exercise, question, case and attempt; a case's parts are told apart by their path."""
    if isinstance(value, list):
        return [resolve(v, secret, *where, i) for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    tags = [key for key in value if key.startswith("$")]
    if not tags:
        return {key: resolve(v, secret, *where, key) for key, v in value.items()}
    tag, argument = tags[0], value[tags[0]]
    number = draw(secret, *where, tag, value.get("salt", value.get("seed", argument)))
    generator = random.Random(number)
    if tag == "$seed":
        return number % SEED_RANGE
    if tag == "$int":
        low, high = argument
        return value.get("step", 1) * generator.randint(low, high)
    if tag == "$uniform":
        low, high = argument
        return round(generator.uniform(low, high), value.get("digits", 2))
    if tag == "$words":
        letters = "abcdefghijklmnopqrstuvwxyz"
        return " ".join("".join(generator.choices(letters, k=generator.randint(2, 8)))
                        for _ in range(generator.randint(*argument)))
    if tag == "$ragged":
        rows, shortest, longest = argument
        return [[generator.randrange(value["high"]) for _ in range(generator.randint(shortest, longest))]
                for _ in range(rows)]
    resolved = {key: resolve(v, secret, *where, key) for key, v in value.items()}
    if tag == "$random_config":
        resolved[tag] = number % SEED_RANGE
    if "seed" in value:
        resolved["seed"] = number % SEED_RANGE
    return resolved
