"""Manifests: prepared files that remember where they came from.

Prepared data (the spam splits) is derived from a source file. A small JSON file
beside it records that source (its path, size and SHA-256), the seed of the split,
and the size and SHA-256 of every file made from it. Before prepared files are
reused, :func:`read_manifest` checks all of it: a folder without a manifest, with
a damaged one, or whose files have changed since, is never trusted, and the caller
rebuilds it; a caller given a source compares it with the recorded one.
"""

from __future__ import annotations

import json
from pathlib import Path

from .atomic import write_json
from .download import sha256_of

FORMAT = "gptlora-manifest"
VERSION = 1


def file_fingerprint(path: str | Path) -> dict:
    """``{"size": bytes, "sha256": hex}`` of a file."""
    path = Path(path)
    return {"size": path.stat().st_size, "sha256": sha256_of(path)}


def write_manifest(manifest_path: str | Path, source: str, source_fingerprint: dict | None, seed: int | None,
                   files: dict[str, Path]) -> Path:
    """Record ``files`` (name -> path, each in the manifest's folder) as made from ``source`` with ``seed``.

    ``source`` says where the data came from (a path, or a description for data made
    by hand); ``source_fingerprint`` is its :func:`file_fingerprint`, or None when
    there is no single source file (then no given source ever matches it). Written atomically.
    """
    manifest = dict(format=FORMAT, version=VERSION, source=str(source), source_size=None, source_sha256=None,
                    seed=seed, files={name: {"file": Path(path).name, **file_fingerprint(path)}
                                      for name, path in files.items()})
    if source_fingerprint is not None:
        manifest.update(source_size=source_fingerprint["size"], source_sha256=source_fingerprint["sha256"])
    write_json(manifest, Path(manifest_path))
    return Path(manifest_path)


def read_manifest(manifest_path: str | Path, files: dict[str, Path], seed: int | None) -> tuple[dict | None, str]:
    """``(manifest, "")`` when the manifest exists, is well formed, has ``seed`` and lists exactly ``files``
    with their present size and SHA-256; else ``(None, why not)``, the reason in words."""
    manifest_path = Path(manifest_path)
    if not manifest_path.is_file():
        return None, f"{manifest_path} does not exist"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        return None, f"{manifest_path} is damaged (not JSON: {error})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        return None, f"{manifest_path} is not a version-{VERSION} {FORMAT} file"
    damage = _field_problem(manifest)
    if damage:
        return None, f"{manifest_path} is damaged ({damage})"
    recorded = {name: (entry["size"], entry["sha256"]) for name, entry in manifest["files"].items()}
    if manifest["seed"] != seed:
        return None, f"{manifest_path} records split seed {manifest.get('seed')!r}, not {seed!r}"
    if set(recorded) != set(files):
        return None, f"{manifest_path} lists {sorted(recorded)}, expected {sorted(files)}"
    for name, path in files.items():
        if not Path(path).is_file():
            return None, f"{path} is missing"
        if (Path(path).stat().st_size, sha256_of(path)) != recorded[name]:
            return None, f"{path} changed since {manifest_path} was written (size or SHA-256 differs)"
    return manifest, ""


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _field_problem(manifest: dict) -> str | None:
    """What is missing or of the wrong type among the fields :func:`write_manifest` writes; None if nothing.

    Every field a reader uses is checked here, so that a hand-edited or damaged manifest is
    reported (and the folder rebuilt) rather than failing later with a ``KeyError``.
    """
    missing = sorted({"source", "source_size", "source_sha256", "seed", "files"} - set(manifest))
    if missing:
        return f"lacks {', '.join(missing)}"
    if not isinstance(manifest["source"], str):
        return f"source is {manifest['source']!r}, expected a path"
    fingerprint = (manifest["source_size"], manifest["source_sha256"])
    if fingerprint != (None, None) and not (_is_size(fingerprint[0]) and _is_sha256(fingerprint[1])):
        return f"source_size, source_sha256 are {fingerprint!r}, expected bytes and a hex SHA-256 (or both null)"
    if manifest["seed"] is not None and not _is_size(manifest["seed"]):
        return f"seed is {manifest['seed']!r}, expected a whole number or null"
    if not isinstance(manifest["files"], dict):
        return f"files is {manifest['files']!r:.60}, expected an object"
    for name, entry in manifest["files"].items():
        if not (isinstance(entry, dict) and _is_size(entry.get("size")) and _is_sha256(entry.get("sha256"))):
            return f"the entry of {name!r} is {entry!r:.80}, expected its size and SHA-256"
    return None
