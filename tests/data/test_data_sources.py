"""Issue point 1 and 4: local formats and mixtures load offline; bad data fails naming file and field."""

from __future__ import annotations

import gzip
import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.build import build_phases
from data.config import DataConfig, SourceConfig
from data.sources import DataSourceError, load_source
from data.tokenize import tokenize_source

TEXTS = ["The quick fox jumps.", "Mira lives in Tolem.", "12 + 7 = 19", "Counting by 3: 3, 6, 9."]


def _write(fmt: str, tmp_path) -> str:
    if fmt == "json":  # one JSON array of records
        p = tmp_path / "d.json"
        p.write_text(json.dumps([{"text": t, "id": i} for i, t in enumerate(TEXTS)]))
    elif fmt == "jsonl":
        p = tmp_path / "d.jsonl"
        p.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    elif fmt == "jsonl.gz":
        p = tmp_path / "d.jsonl.gz"
        p.write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in TEXTS).encode()))
    elif fmt == "parquet":
        p = tmp_path / "d.parquet"
        pq.write_table(pa.table({"text": TEXTS, "id": list(range(len(TEXTS)))}), p)
    elif fmt == "text":
        p = tmp_path / "d.txt"
        p.write_text("\n".join(TEXTS) + "\n")
    elif fmt == "saved":  # a directory written by Dataset.save_to_disk
        p = tmp_path / "saved"
        datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(p))
    elif fmt == "arrow":
        p = tmp_path / "d.arrow"
        table = pa.table({"text": TEXTS})
        with pa.ipc.new_stream(str(p), table.schema) as w:
            w.write_table(table)
    return str(p)


@pytest.mark.parametrize("fmt", ["json", "jsonl", "jsonl.gz", "parquet", "text", "arrow", "saved"])
def test_local_formats_load_and_tokenize(fmt, tmp_path, tokenizer):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    src = load_source(SourceConfig(_write(fmt, tmp_path)), cfg.cache_dir)
    assert src.kind == "text" and src.dataset.column_names == ["text"]
    assert src.dataset["text"] == TEXTS
    tok = tokenize_source(src, tokenizer, cfg)
    expected = [
        [tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        for t in TEXTS
    ]
    assert [list(x) for x in tok["input_ids"]] == expected
    assert all(all(m) for m in tok["loss_mask"])


def test_tokenization_is_cached_and_reused(tmp_path, tokenizer):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    path = _write("jsonl", tmp_path)
    first = tokenize_source(load_source(SourceConfig(path), cfg.cache_dir), tokenizer, cfg)
    files = {f["filename"] for f in first.cache_files}
    mtimes = {f: (tmp_path / f).stat().st_mtime_ns for f in files}
    again = tokenize_source(load_source(SourceConfig(path), cfg.cache_dir), tokenizer, cfg)
    assert {f["filename"] for f in again.cache_files} == files  # same arrow file, not rewritten
    assert {f: (tmp_path / f).stat().st_mtime_ns for f in files} == mtimes
    changed = tokenize_source(
        load_source(SourceConfig(path), cfg.cache_dir),
        tokenizer,
        DataConfig(cache_dir=cfg.cache_dir, add_bos=False),
    )
    assert changed.cache_files[0]["filename"] not in files  # an option change tokenizes anew
    assert changed[0]["input_ids"][0] != tokenizer.bos_token_id


def test_tokenization_in_several_processes_matches_one(tmp_path, tokenizer, write_jsonl):
    rows = [{"text": f"Document {i}: " + "word " * (i % 17)} for i in range(300)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    one = tokenize_source(
        load_source(SourceConfig(path), str(tmp_path / "a")),
        tokenizer,
        DataConfig(cache_dir=str(tmp_path / "a"), num_proc=1),
    )
    two = tokenize_source(
        load_source(SourceConfig(path), str(tmp_path / "b")),
        tokenizer,
        DataConfig(cache_dir=str(tmp_path / "b"), num_proc=2),
    )
    assert sum("_of_00002" in f["filename"] for f in two.cache_files) == 2  # really written by two workers
    assert one["input_ids"] == two["input_ids"] and one._fingerprint == two._fingerprint


def _docs(word: str, n: int, rng: np.random.Generator) -> list[dict]:
    return [{"text": " ".join([word] * int(rng.integers(3, 40)))} for _ in range(n)]


@pytest.mark.parametrize("unit", ["tokens", "documents"])
def test_two_source_mixture_follows_weights(unit, tmp_path, tokenizer, write_jsonl):
    rng = np.random.default_rng(0)
    a = write_jsonl(tmp_path / "a.jsonl", _docs("apple", 600, rng))  # short and long documents differ
    b = write_jsonl(tmp_path / "b.jsonl", _docs("river bank", 600, rng))
    cfg = DataConfig(
        sources=[SourceConfig(a, weight=1.0), SourceConfig(b, weight=3.0)],
        seq_len=128,
        eval_fraction=0.0,
        ild_fraction=0.0,
        mixture_unit=unit,
        cache_dir=str(tmp_path / "c"),
    )
    kd = build_phases(cfg, tokenizer, phases=("kd",))["kd"]
    if unit == "tokens":
        share = kd.source_tokens[0] / sum(kd.source_tokens)
        assert abs(share - 0.25) < 0.01, share  # exact up to one document
    else:
        assert kd.num_docs == 800  # b (weight 3/4) has 600 documents: it runs out first
    # the rows hold exactly the mixed tokens, and the source share shows in the rows themselves
    rows = kd.rows.with_format("numpy")
    ids = np.concatenate(list(rows["input_ids"]))
    assert len(ids) == kd.num_tokens == sum(kd.source_tokens) if unit == "tokens" else len(ids) == kd.num_tokens
    apple = tokenizer("apple", add_special_tokens=False)["input_ids"][0]
    assert apple in ids


def test_all_exhausted_uses_every_document(tmp_path, tokenizer, write_jsonl):
    rng = np.random.default_rng(1)
    a = write_jsonl(tmp_path / "a.jsonl", _docs("apple", 50, rng))
    b = write_jsonl(tmp_path / "b.jsonl", _docs("river", 400, rng))
    cfg = DataConfig(
        sources=[SourceConfig(a), SourceConfig(b)],
        seq_len=64,
        eval_fraction=0.0,
        ild_fraction=0.0,
        mixture_unit="documents",
        mixture_stop="all_exhausted",
        cache_dir=str(tmp_path / "c"),
    )
    kd = build_phases(cfg, tokenizer, phases=("kd",))["kd"]
    assert kd.num_docs == 800  # 400 of each: the small source is repeated 8 times


def test_splits_are_disjoint_and_sized(tmp_path, tokenizer, write_jsonl):
    rows = [{"text": f"document number {i}"} for i in range(1000)]
    cfg = DataConfig(
        sources=[SourceConfig(write_jsonl(tmp_path / "a.jsonl", rows))],
        seq_len=32,
        eval_fraction=0.05,
        cache_dir=str(tmp_path / "c"),
    )
    phases = build_phases(cfg, tokenizer)
    seen = {}
    for name, p in phases.items():
        docs = [d for r in p.rows.with_format("numpy") for d in np.split(r["input_ids"], np.cumsum(r["doc_lens"])[:-1])]
        seen[name] = {int(tokenizer.decode(d, skip_special_tokens=True).split()[-1]) for d in docs}
        assert len(seen[name]) == len(docs)  # no document twice
    assert len(seen["eval"]) == 50 and len(seen["ild"]) == 190 and len(seen["kd"]) == 760
    assert not (seen["eval"] & seen["ild"]) and not (seen["eval"] & seen["kd"]) and not (seen["ild"] & seen["kd"])


# ---- bad data: clear errors naming file and field ------------------------------------------------


def test_missing_column_names_file_and_column(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "x.jsonl", [{"body": "hello"}])
    with pytest.raises(DataSourceError, match=r"x\.jsonl.*missing column 'content'.*text_column.*\['body'\]"):
        load_source(SourceConfig(path, text_column="content"))
    with pytest.raises(DataSourceError, match=r"x\.jsonl: no 'text' or 'messages' column"):
        load_source(SourceConfig(path))


def test_wrong_column_type(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": 3}])
    with pytest.raises(DataSourceError, match=r"x\.jsonl: field 'text' should hold strings"):
        load_source(SourceConfig(path))


def test_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataSourceError, match=r"empty\.jsonl is empty"):
        load_source(SourceConfig(str(tmp_path / "empty.jsonl")))


def test_empty_after_filtering(tmp_path, tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "blank.jsonl", [{"text": "   "}, {"text": ""}, {"text": None}])
    src = load_source(SourceConfig(path), str(tmp_path / "c"))
    with pytest.raises(DataSourceError, match=r"blank\.jsonl: no documents left after filtering \(3 rows"):
        tokenize_source(src, tokenizer, DataConfig(cache_dir=str(tmp_path / "c")))
    long = write_jsonl(tmp_path / "long.jsonl", [{"text": "word " * 50}])
    src = load_source(SourceConfig(long), str(tmp_path / "c"))
    with pytest.raises(DataSourceError, match=r"long\.jsonl: no documents left.*long_sample=drop with seq_len=16"):
        tokenize_source(src, tokenizer, DataConfig(seq_len=16, long_sample="drop", cache_dir=str(tmp_path / "c")))


@pytest.mark.parametrize(
    ("messages", "why"),
    [
        ([{"role": "user", "content": "hi"}], "needs a 'user' message followed by an 'assistant'"),
        (
            [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}],
            "needs a 'user' message",
        ),
        ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}], "role 'bot'"),
    ],
)
def test_chat_rows_without_expected_roles(messages, why, tmp_path, tokenizer, write_jsonl):
    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": good}, {"messages": messages}])
    src = load_source(SourceConfig(path), str(tmp_path / "c"))
    assert src.kind == "chat"
    with pytest.raises(DataSourceError, match=rf"chat\.jsonl row 1, field 'messages'.*{why}"):
        tokenize_source(src, tokenizer, DataConfig(cache_dir=str(tmp_path / "c")))


def test_missing_local_path_and_unknown_hub_dataset(tmp_path):
    with pytest.raises(DataSourceError, match=r"no such file.*format 'jsonl'"):
        load_source(SourceConfig(str(tmp_path / "nope.jsonl"), format="jsonl"))
    with pytest.raises(DataSourceError, match=r"nobody/no-such-dataset.*could not be loaded from the Hub"):
        load_source(SourceConfig("nobody/no-such-dataset"), str(tmp_path / "c"))


def test_uninferable_format(tmp_path):
    (tmp_path / "d.csv").write_text("text\nhello\n")
    with pytest.raises(DataSourceError, match=r"cannot infer the format from extensions \['\.csv'\]"):
        load_source(SourceConfig(str(tmp_path / "d.csv")))


def _parquet_bytes(tmp_path) -> bytes:
    table = pa.table({"text": pa.array([b"fine", b"bad \xff"], pa.binary()).cast(pa.string(), safe=False)})
    pq.write_table(table, tmp_path / "tmp.parquet")
    return (tmp_path / "tmp.parquet").read_bytes()


@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("bad.txt", r"bad\.txt, line 2 \(byte 14\): .* is not valid UTF-8"),
        ("bad.jsonl", r"bad\.jsonl, line 2 \(byte 29\): .* is not valid UTF-8"),
        ("bad.parquet", r"bad\.parquet: row 1, field 'text': text is not valid UTF-8"),
    ],
)
def test_undecodable_text_names_file_and_place(name, where, tmp_path, tokenizer):
    """Text builders fail while loading, arrow readers (json, parquet) store the bytes and fail later:
    either way the error names the file and the line or row."""
    content = {
        "bad.txt": b"fine line\nbad \xff\xfe line\n",
        "bad.jsonl": b'{"text": "ok"}\n{"text": "bad \xff"}\n',
        "bad.parquet": _parquet_bytes(tmp_path),
    }[name]
    (tmp_path / name).write_bytes(content)
    cfg = DataConfig(cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataSourceError, match=where):
        tokenize_source(load_source(SourceConfig(str(tmp_path / name)), cfg.cache_dir), tokenizer, cfg)
