"""Load one configured source (Hub dataset or local files) into a one-column `datasets.Dataset`.

The result has a single column, "text" (str) or "messages" (list of {"role", "content"}), so the
tokenizer step sees one schema whatever the file looked like. Failures name the file and field.
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import io
import json
import lzma
import os
from dataclasses import dataclass
from pathlib import Path

import datasets

from data.config import SourceConfig

# Extension -> datasets builder. "jsonl" is the json builder (it reads both layouts).
EXTENSIONS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".arrow": "arrow",
}
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
BUILDERS = {"json": "json", "jsonl": "json", "parquet": "parquet", "text": "text", "arrow": "arrow"}


class DataSourceError(ValueError):
    """Bad input data; the message names the source (file) and the field."""


@dataclass
class LoadedSource:
    """A source normalized to one content column."""

    name: str  # what error messages call it: the path or Hub id (and config)
    kind: str  # "text" or "chat"
    dataset: datasets.Dataset  # one column: "text" or "messages"
    files: tuple[str, ...] = ()  # local files behind it (empty for Hub datasets)


def _strip_compression(path: str) -> str:
    root, ext = os.path.splitext(path)
    return root if ext in COMPRESSIONS else path


def local_files(path: str) -> list[str] | None:
    """The files a local path, directory or glob stands for (sorted); None if nothing local matches."""
    if any(c in path for c in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        return files or None
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(
            str(p)
            for p in Path(path).rglob("*")
            if p.is_file() and os.path.splitext(_strip_compression(str(p)))[1] in EXTENSIONS
        )
        return files
    return None


def infer_format(files: list[str], name: str) -> str:
    """The one datasets builder for these files, from their extensions."""
    found = {EXTENSIONS.get(os.path.splitext(_strip_compression(f))[1]) for f in files}
    if None in found or len(found) != 1:
        exts = sorted({os.path.splitext(_strip_compression(f))[1] or "<none>" for f in files})
        raise DataSourceError(
            f"source {name}: cannot infer the format from extensions {exts}; set format to one of "
            f"{sorted(set(BUILDERS))}"
        )
    return found.pop()  # type: ignore[return-value]


def find_bad_utf8(path: str) -> str | None:
    """Describe the first undecodable byte of a text file (line and byte offset), or None if it is UTF-8."""
    opener = COMPRESSIONS.get(os.path.splitext(path)[1], open)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset, lines = 0, 1
    with opener(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                bad = offset + e.start
                line = lines + chunk[: e.start].count(b"\n")
                return f"line {line} (byte {bad}): {chunk[e.start : e.start + 4]!r} is not valid UTF-8"
            offset += len(chunk)
            lines += chunk.count(b"\n")
    return None


def find_bad_json(path: str) -> str | None:
    """The first line a JSON Lines file's parser rejects (line number and the parser's reason); for a .json file
    that is one document, where that document breaks. None if it parses."""
    opener = COMPRESSIONS.get(os.path.splitext(path)[1], open)
    with opener(path, "rt", encoding="utf-8") as f:
        if os.path.splitext(_strip_compression(path))[1] == ".json":
            text = f.read()
            try:
                json.loads(text)
                return None
            except json.JSONDecodeError as whole:
                try:
                    json.loads(text.lstrip().split("\n", 1)[0])  # a whole first line: JSON Lines named .json
                except json.JSONDecodeError:
                    return _json_error(whole.lineno, whole)
            f = io.StringIO(text)
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                return _json_error(number, e)
    return None


def _json_error(line: int, error: json.JSONDecodeError) -> str:
    return f"line {line} is not valid JSON ({error.msg.removesuffix(' at')} at column {error.colno})"


def diagnose_file(path: str) -> str | None:
    """Why a local text or JSON file cannot be read, if it is one of: a damaged or truncated compressed stream,
    bytes that are not UTF-8, a line that is not JSON. None if none of those."""
    try:
        if (why := find_bad_utf8(path)) is not None:
            return why
        if EXTENSIONS.get(os.path.splitext(_strip_compression(path))[1]) == "json":
            return find_bad_json(path)
    except (EOFError, OSError, lzma.LZMAError, ValueError) as e:  # gzip / bz2 / xz: truncated or corrupt
        return f"the compressed data is damaged or truncated ({type(e).__name__}: {e})"
    return None


def locate_bad_utf8(src: LoadedSource) -> str:
    """Where undecodable text sits in a loaded source: file and line for text files, else the row."""
    for f in src.files:
        if os.path.splitext(_strip_compression(f))[1] in (".json", ".jsonl", ".txt", ".text"):
            if (why := find_bad_utf8(f)) is not None:
                return f"source {src.name}: file {f}, {why}"
    table, column = src.dataset.data, src.dataset.column_names[0]
    for start in range(0, table.num_rows, 1024):
        try:
            table.slice(start, 1024).to_pylist()
        except UnicodeDecodeError:
            for i in range(start, min(start + 1024, table.num_rows)):
                try:
                    table.slice(i, 1).to_pylist()
                except UnicodeDecodeError as e:
                    return f"source {src.name}: row {i}, field {column!r}: text is not valid UTF-8 ({e.reason})"
    return f"source {src.name}: field {column!r}: text is not valid UTF-8"


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any((Path(path) / f).exists() for f in ("state.json", "dataset_dict.json"))


def _load_local(src: SourceConfig, files: list[str], name: str, cache_dir: str | None) -> datasets.Dataset:
    for f in files:
        if os.path.getsize(f) == 0:
            raise DataSourceError(f"source {name}: file {f} is empty")
    fmt = BUILDERS[src.format] if src.format else infer_format(files, name)
    kwargs = {"sample_by": src.sample_by} if fmt == "text" else {}
    try:
        return datasets.load_dataset(fmt, data_files={"train": files}, split=src.split, cache_dir=cache_dir, **kwargs)
    except Exception as e:
        if fmt in ("text", "json"):  # the usual causes, and datasets' own message does not say where
            for f in files:
                if (why := diagnose_file(f)) is not None:
                    raise DataSourceError(f"source {name}: file {f}, {why}") from e
        raise DataSourceError(
            f"source {name}: could not load {len(files)} {fmt} file(s) "
            f"{files[:3]}{'...' if len(files) > 3 else ''}: {type(e).__name__}: {e}"
        ) from e


def _load_hub(src: SourceConfig, name: str, cache_dir: str | None) -> datasets.Dataset:
    try:
        ds = datasets.load_dataset(
            src.name_or_path, src.config_name, split=src.split, cache_dir=cache_dir, revision=src.revision
        )
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = " (offline: it must already be in the datasets cache)" if offline else ""
        raise DataSourceError(
            f"source {name}: not a local path and could not be loaded from the Hub{hint}: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(ds, datasets.Dataset):
        raise DataSourceError(f"source {name}: split {src.split!r} gave a {type(ds).__name__}, expected one split")
    return ds


def _content_column(ds: datasets.Dataset, src: SourceConfig, name: str) -> tuple[str, str]:
    """(column, kind) after checking the column exists and has the right type."""
    if src.text_column is not None:
        column, kind = src.text_column, "text"
    elif src.messages_column is not None:
        column, kind = src.messages_column, "chat"
    elif "text" in ds.column_names:
        column, kind = "text", "text"
    elif "messages" in ds.column_names:
        column, kind = "messages", "chat"
    else:
        raise DataSourceError(
            f"source {name}: no 'text' or 'messages' column (columns: {ds.column_names}); "
            "set text_column or messages_column"
        )
    if column not in ds.column_names:
        field = "text_column" if kind == "text" else "messages_column"
        raise DataSourceError(f"source {name}: missing column {column!r} ({field}); columns: {ds.column_names}")
    feature = ds.features[column]
    if kind == "text" and getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataSourceError(f"source {name}: field {column!r} should hold strings, found {feature}")
    if kind == "chat" and not isinstance(feature, (datasets.List, datasets.LargeList)):
        raise DataSourceError(
            f"source {name}: field {column!r} should hold lists of messages ({{'role', 'content'}}), found {feature}"
        )
    return column, kind


def load_source(src: SourceConfig, cache_dir: str | None = None) -> LoadedSource:
    """Load `src` (local files, a saved dataset dir, or a Hub dataset) with its content column only."""
    src.validate()
    path, name = src.name_or_path, src.name_or_path + (f" ({src.config_name})" if src.config_name else "")
    files: list[str] = []
    if src.format != "hub" and _is_saved_dataset(path):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            split = src.split.split("[")[0]
            if split not in ds:
                raise DataSourceError(f"source {name}: no split {split!r} in saved dataset; splits: {list(ds)}")
            ds = ds[split]
    elif src.format != "hub" and (found := local_files(path)) is not None:
        if not found:
            raise DataSourceError(f"source {name}: directory has no {sorted(EXTENSIONS)} files")
        files = found
        ds = _load_local(src, files, name, cache_dir)
    elif src.format not in (None, "hub"):
        raise DataSourceError(f"source {name}: no such file, directory or glob (format {src.format!r})")
    else:
        ds = _load_hub(src, name, cache_dir)
    if len(ds) == 0:
        raise DataSourceError(f"source {name}: no rows")
    column, kind = _content_column(ds, src, name)
    ds = ds.select_columns([column])
    if column != ("text" if kind == "text" else "messages"):
        ds = ds.rename_column(column, "text" if kind == "text" else "messages")
    if src.max_samples is not None and src.max_samples < len(ds):
        ds = ds.select(range(src.max_samples))
    return LoadedSource(name=name, kind=kind, dataset=ds, files=tuple(files))


def missing_rows(ds: datasets.Dataset) -> tuple[int, int | None]:
    """(rows whose only column, the content, is null, index of the first one): rows that lack the key in a JSON
    file, or hold null there. One pass over the Arrow column, batch by batch (the dataset is not materialized)."""
    count, first, offset = 0, None, 0
    for batch in ds.with_format("arrow").iter(batch_size=65536):
        column = batch.column(0)
        nulls = column.null_count
        if nulls and first is None:
            first = offset + next(i for i, valid in enumerate(column.is_valid().to_pylist()) if not valid)
        count += nulls
        offset += len(column)
    return count, first


def check_missing_rows(src: LoadedSource, max_fraction: float) -> int:
    """Stop (DataSourceError) when more than `max_fraction` of the source's rows have no content; return how many
    were found, which the caller logs: they are dropped, never trained on as empty text."""
    count, first = missing_rows(src.dataset)
    column = "text" if src.kind == "text" else "messages"
    if count and count > max_fraction * len(src.dataset):
        raise DataSourceError(
            f"source {src.name}: {count} of {len(src.dataset)} rows ({100 * count / len(src.dataset):.1f} %) have no "
            f"{column!r} (the key is missing or null; first at row {first}); data.max_bad_fraction={max_fraction} "
            "allows fewer: fix the file, name the right column (text_column / messages_column), or raise it"
        )
    return count
