"""The identity of a base model on disk, from its content: config.json plus a digest of every safetensors
file (header and tensor bytes).

Two fine-tunes of one base have the same shapes, names and file sizes; only their bytes differ, so only a
content digest tells them apart (for resume checks, the cached base generations and an artifact's base).
Hashing a 14 GB model takes a minute, so each file's digest is streamed once and cached, keyed by the
file's size and modification time, in ``.sgt_fingerprint.json`` beside the model or, when the model
directory is read-only, in the user cache directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CACHE_NAME = ".sgt_fingerprint.json"
_CHUNK = 16 << 20


def _user_cache(model_dir: Path) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sgt_jax" / "fingerprints"
    return root / (hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:24] + ".json")


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # a missing or corrupt cache is recomputed, never fatal


def _write_cache(model_dir: Path, entries: dict) -> None:
    for path in (model_dir / CACHE_NAME, _user_cache(model_dir)):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
            os.replace(tmp, path)
            return
        except OSError:
            continue  # read-only model directory: fall back to the user cache


def file_digest(path: Path) -> str:
    """sha256 of the whole file (the safetensors header, then the tensor bytes), streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(model_dir) -> str:
    """16 hex digits identifying the model at ``model_dir`` by content (config.json + safetensors bytes)."""
    model_dir = Path(model_dir)
    cache = _read_cache(model_dir / CACHE_NAME) or _read_cache(_user_cache(model_dir))
    files = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.safetensors.index.json"))
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    fresh, changed = {}, False
    for path in files:
        stat = path.stat()
        hit = cache.get(path.name)
        if isinstance(hit, dict) and hit.get("size") == stat.st_size and hit.get("mtime_ns") == stat.st_mtime_ns:
            file_hash = hit["sha256"]
        else:
            file_hash, changed = file_digest(path), True
        fresh[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_hash}
        digest.update(f"{path.name}:{file_hash}\n".encode())
    if changed or set(fresh) != set(cache):
        _write_cache(model_dir, fresh)
    return digest.hexdigest()[:16]
