"""Raw example sources: local files and save_to_disk directories through `datasets`, hub names, synthetic.

Everything a user can get wrong here (missing file, bad encoding, missing column, empty data, no
network for a hub name) is reported as a one-line `DataError` naming the file/setting and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from typing import List, Optional, Sequence

from sgt_jax.data.errors import DataError

FILE_BUILDERS = {
    ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow",
}
TEXT_SUFFIXES = (".json", ".jsonl", ".csv")


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def looks_like_path(source: str) -> bool:
    return (
        _suffix(source) in FILE_BUILDERS
        or source.startswith(("/", "./", "../", "~"))
        or os.path.exists(os.path.expanduser(source))
    )


def source_kind(source: str) -> str:
    """'synthetic', 'file', 'directory' or 'hub'; raises for a local path that does not exist."""
    if source == "synthetic":
        return "synthetic"
    if looks_like_path(source):
        path = os.path.expanduser(source)
        if os.path.isdir(path):
            return "directory"
        if os.path.isfile(path):
            if _suffix(path) not in FILE_BUILDERS:
                raise DataError(
                    f"data file {source!r} has an unsupported extension; use one of "
                    f"{', '.join(sorted(FILE_BUILDERS))} or a save_to_disk directory"
                )
            return "file"
        raise DataError(f"data file {source!r} does not exist; check data.source (or data.validation_source)")
    return "hub"


def source_fingerprint(source: str, split: Optional[str] = None) -> str:
    """Identity of the raw data: path + mtime + size of every file (or the hub name and split)."""
    kind = source_kind(source)
    h = hashlib.sha256(json.dumps([kind, source, split]).encode())
    if kind in ("file", "directory"):
        path = os.path.abspath(os.path.expanduser(source))
        files = [path] if kind == "file" else sorted(
            os.path.join(root, f) for root, _, names in os.walk(path) for f in names
        )
        for f in files:
            st = os.stat(f)
            h.update(json.dumps([os.path.relpath(f, path) if kind == "directory" else f,
                                 st.st_mtime_ns, st.st_size]).encode())
    return h.hexdigest()[:16]


def check_utf8(path: str, chunk_lines: int = 1 << 16) -> None:
    """Raise a DataError naming the file and line of the first non-UTF-8 bytes of a text file."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"data file {path!r} is not valid UTF-8 at line {lineno} (byte {exc.start} of the line: "
                    f"{line[exc.start:exc.start + 4]!r}); re-encode it as UTF-8 (e.g. iconv -t UTF-8)"
                ) from None


def _network_reachable(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_error(source: str, reason: str) -> DataError:
    return DataError(
        f"data.source={source!r} is not a local file or directory and names a Hugging Face hub dataset, "
        f"which cannot be downloaded ({reason}); download it elsewhere (datasets' save_to_disk or a "
        f"json/jsonl/parquet export) and set data.source to that local path"
    )


def load_raw(source: str, split: str = "train", cache_dir: Optional[str] = None):
    """A `datasets.Dataset` of raw examples for a file, a save_to_disk directory or a hub name."""
    import datasets

    kind = source_kind(source)
    datasets.disable_progress_bars()
    hf_cache = os.path.join(cache_dir, "hf_datasets") if cache_dir else None
    try:
        if kind == "file":
            path = os.path.abspath(os.path.expanduser(source))
            if _suffix(path) in TEXT_SUFFIXES:
                check_utf8(path)
            if os.path.getsize(path) == 0:
                raise DataError(f"data file {source!r} is empty; point data.source at a file with examples")
            ds = datasets.load_dataset(FILE_BUILDERS[_suffix(path)], data_files=path, split="train",
                                       cache_dir=hf_cache)
        elif kind == "directory":
            path = os.path.expanduser(source)
            try:
                ds = datasets.load_from_disk(path)
            except FileNotFoundError:
                raise DataError(
                    f"directory {source!r} is not a datasets save_to_disk directory; pass a data file or a "
                    "directory written by Dataset.save_to_disk"
                ) from None
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(
                        f"split {split!r} is not in {source!r} (splits: {', '.join(ds)}); set data.split"
                    )
                ds = ds[split]
        else:
            offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes")
                          for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
            if offline:
                raise _offline_error(source, "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set")
            if not _network_reachable():
                raise _offline_error(source, "huggingface.co is unreachable")
            try:
                ds = datasets.load_dataset(source, split=split, cache_dir=hf_cache)
            except Exception as exc:
                raise _offline_error(source, f"{type(exc).__name__}: {exc}") from exc
    except DataError:
        raise
    except Exception as exc:  # malformed json/csv/parquet etc.
        raise DataError(
            f"could not read data.source={source!r} ({type(exc).__name__}: {str(exc)[:300]}); "
            "check that the file is well-formed"
        ) from exc
    if len(ds) == 0:
        raise DataError(f"data.source={source!r} (split {split!r}) has no examples; point it at non-empty data")
    return ds


def check_columns(ds, columns: Sequence[str], source: str, fmt: str) -> None:
    present: List[str] = list(ds.column_names)
    for column in columns:
        if column not in present:
            setting = {"text": " (data.text_column)", "chat": " (data.messages_column)"}.get(fmt, "")
            raise DataError(
                f"data.source={source!r} has no column {column!r}{setting} needed by data.format={fmt!r}; "
                f"columns present: {', '.join(present)}"
            )
