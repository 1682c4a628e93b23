"""The on-disk cache of generated code.

Entries live under `$FLAGTREE_CACHE_DIR` (default `~/.cache/flagtree`), one file per
entry at `<dir>/<namespace>/<key[:2]>/<key><suffix>`.  A key is the sha256 of everything
that determines the generated code: the FTIR text of the compiled unit, the backend,
the target's capabilities, the options, and the versions of flagtree, torch and the
code generator (see `cache_key`).

Each file starts with a header line recording the payload's length and sha256, so a
truncated or corrupt entry is detected, reported once through the `flagtree` logger,
and rebuilt.  Writes go to a temporary file in the same folder and are moved into place
with `os.replace`, so readers never see a partial entry and any number of processes may
build the same entry at once: each one succeeds, the last rename wins, and all of them
wrote the same bytes.  Entries of generated Python start with `# `, which keeps the
header a comment and the file importable as written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("flagtree")

ENV_VAR = "FLAGTREE_CACHE_DIR"
_HEADER_PREFIX = "# flagtree-cache v1 "


def cache_dir() -> Path:
    """The cache root: $FLAGTREE_CACHE_DIR, else ~/.cache/flagtree."""
    configured = os.environ.get(ENV_VAR)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "flagtree"


def cache_key(
    unit: str, backend: str, capabilities: Any, options: Mapping[str, Any], versions: Mapping[str, str]
) -> str:
    """The sha256 (hex) naming one cache entry.

    unit: the FTIR text of what is compiled (print it without locations, so the same
        code from two places shares an entry).
    capabilities: a dataclass (flagtree.backends.base.Capabilities); sets are sorted so
        the key is the same in every process.
    """
    described = {
        "unit": unit,
        "backend": backend,
        "capabilities": _canonical(capabilities),
        "options": _canonical(dict(options)),
        "versions": _canonical(dict(versions)),
    }
    text = json.dumps(described, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _canonical(value: Any) -> Any:
    """A JSON-able form of `value` that does not depend on hash seeds or set order."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((_canonical(v) for v in value), key=repr)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@dataclass
class CacheStats:
    """What the cache did in this process: entries found, built, and rebuilt after damage."""

    hits: int = 0
    misses: int = 0
    rebuilds: int = 0


_stats = CacheStats()
_reported_damage: set[Path] = set()


def cache_stats() -> CacheStats:
    """A snapshot of this process's cache counters."""
    return dataclasses.replace(_stats)


def reset_cache_stats() -> None:
    global _stats
    _stats = CacheStats()


class CorruptEntry(Exception):
    """An entry whose header does not match its payload (truncated, damaged, foreign)."""


class DiskCache:
    """One namespace of the cache (say `triton` kernels) under `root`."""

    def __init__(self, namespace: str, root: Path | None = None):
        self.root = (root or cache_dir()) / namespace

    def path(self, key: str, suffix: str = "") -> Path:
        return self.root / key[:2] / f"{key}{suffix}"

    def load(self, key: str, suffix: str = "") -> str | None:
        """The payload stored under `key`, or None if absent or damaged (damage is reported)."""
        path = self.path(key, suffix)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return _unwrap(raw)
        except CorruptEntry as e:
            _stats.rebuilds += 1
            if path not in _reported_damage:
                _reported_damage.add(path)
                logger.warning("flagtree cache: entry %s is damaged (%s); rebuilding it", path, e)
            return None

    def store(self, key: str, payload: str, suffix: str = "") -> Path:
        """Write `payload` under `key` atomically; returns the entry's path."""
        path = self.path(key, suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_wrap(payload))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def get_or_build(self, key: str, build: Callable[[], str], suffix: str = "") -> tuple[Path, str]:
        """The entry for `key`, built with `build()` and stored when absent or damaged."""
        payload = self.load(key, suffix)
        if payload is not None:
            _stats.hits += 1
            return self.path(key, suffix), payload
        _stats.misses += 1
        payload = build()
        return self.store(key, payload, suffix), payload


def _wrap(payload: str) -> bytes:
    data = payload.encode()
    header = f"{_HEADER_PREFIX}length={len(data)} sha256={hashlib.sha256(data).hexdigest()}\n"
    return header.encode() + data


def _unwrap(raw: bytes) -> str:
    header, newline, data = raw.partition(b"\n")
    if not newline or not header.startswith(_HEADER_PREFIX.encode()):
        raise CorruptEntry("missing header line")
    try:
        fields = dict(item.split("=", 1) for item in header.decode()[len(_HEADER_PREFIX):].split())
        length, digest = int(fields["length"]), fields["sha256"]
    except (ValueError, KeyError, UnicodeDecodeError):
        raise CorruptEntry("unreadable header line") from None
    if len(data) != length:
        raise CorruptEntry(f"{len(data)} bytes of payload, header says {length}")
    if hashlib.sha256(data).hexdigest() != digest:
        raise CorruptEntry("checksum mismatch")
    return data.decode()
