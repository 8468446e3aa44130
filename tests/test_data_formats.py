"""Data files in the formats people have (issue 24, points 3 and 7): the same
records as JSONL, a JSON array, CSV, TSV, Parquet, Arrow and a ``datasets``
``save_to_disk`` folder read alike; globs and several files; every bad record
reported with its place, and nothing read from a half-bad file unless asked."""

from __future__ import annotations

import csv
import json

import pytest

from peftspec.data import readers, reading
from peftspec.data.records import DataError

RECORDS = [
    {"prompt": "Where is Marrowgate?", "completion": "In Brindlecombe."},
    {"prompt": "Who founded it, \"they\" say?", "completion": "Ada, in 1802,\nby the river."},
    {"prompt": "Unicode?", "completion": "ünïcödé ✓ 日本"},
]
CHATS = [
    {"messages": [{"role": "system", "content": ""},
                  {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}]},
    {"messages": [{"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "and 3+3?"},
                  {"role": "assistant", "content": "6"}]},
]


def _write(path, fmt, rows):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                        encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif fmt in ("csv", "tsv"):
        keys = list(rows[0])
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t" if fmt == "tsv" else ",")
            w.writerow(keys)
            for r in rows:
                w.writerow([json.dumps(r[k], ensure_ascii=False) if isinstance(r[k], list)
                            else r[k] for k in keys])
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "arrow":
        import pyarrow as pa

        table = pa.Table.from_pylist(rows)
        with pa.ipc.new_file(str(path), table.schema) as w:
            w.write_table(table)
    elif fmt == "datasets":
        datasets = pytest.importorskip("datasets")
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


FORMATS = ["jsonl", "json", "csv", "tsv", "parquet", "arrow", "datasets"]
SUFFIX = {"datasets": ""}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [RECORDS, CHATS], ids=["prompt-completion", "messages"])
def test_every_format_reads_the_same_examples(tmp_path, fmt, rows):
    if fmt in ("parquet", "arrow"):
        pytest.importorskip("pyarrow")
    path = _write(tmp_path / f"d{SUFFIX.get(fmt, '.' + fmt)}", fmt, rows)
    read = reading.read(str(path))
    assert read.formats == {str(path): fmt}
    reference = reading.read(str(_write(tmp_path / "ref.jsonl", "jsonl", rows))).examples
    got = read.examples
    assert [(e.prompt, e.completion, e.messages) for e in got] == \
        [(e.prompt, e.completion, e.messages) for e in reference]


def test_a_dataset_dict_folder_reads_its_train_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS),
                               "test": datasets.Dataset.from_list(RECORDS[:1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(reading.read(str(tmp_path / "dd")).examples) == 3
    dd2 = datasets.DatasetDict({"test": datasets.Dataset.from_list(RECORDS[:1])})
    dd2.save_to_disk(str(tmp_path / "dd2"))
    with pytest.raises(DataError, match="without a 'train' split.*dd2/test"):
        reading.read(str(tmp_path / "dd2"))


def test_globs_and_several_files(tmp_path):
    _write(tmp_path / "b.jsonl", "jsonl", RECORDS[:2])
    _write(tmp_path / "a.jsonl", "jsonl", RECORDS[2:])
    _write(tmp_path / "c.json", "json", RECORDS)
    read = reading.read(str(tmp_path / "*.jsonl"))
    assert [e.where.rsplit("/", 1)[1] for e in read.examples] == ["a.jsonl:1", "b.jsonl:1",
                                                                  "b.jsonl:2"]
    assert len(reading.read([str(tmp_path / "*.jsonl"), str(tmp_path / "c.json")]).examples) \
        == 6
    with pytest.raises(DataError, match=r"nothing\*.jsonl: no file matches"):
        reading.read(str(tmp_path / "nothing*.jsonl"))


BAD = [
    ('{"messages": [{"content": "x"}]}', "messages[1]: missing 'role'"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "messages[1]: unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": 3}]}', "messages[1]: 'content' must be a string"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ('{"messages": []}', "'messages' is an empty list"),
    ('{"messages": "hi"}', "'messages' must be a list of messages"),
    ('{"prompt": [{"role": "user", "content": "x"}], "completion": []}',
     "'completion' is an empty list"),
    ('{"prompt": [{"role": "user", "content": "x"}]}', "missing key 'completion'"),
    ('{"messages": [{"role": "user", "content": "x", "mood": 1}]}', "unknown key(s) 'mood'"),
    ('{"prompt": "x", "completon": "y"}', "missing key 'completion'"),
    ('{"text": "x", "extra": 1}', "unknown key(s) 'extra'"),
    ('[1, 2]', "expected a JSON object"),
    ('{"text": ', "not valid JSON"),
]


@pytest.mark.parametrize("line,why", BAD)
def test_a_bad_record_names_its_line_and_what_is_wrong(tmp_path, line, why):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        reading.read(str(path))
    assert f"{path}:3" in str(info.value) and why in str(info.value)
    assert "1 bad record(s); nothing was trained on" in str(info.value)


def test_bad_records_are_collected_and_may_be_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(RECORDS[0])] + ['{"text": 1}'] * 30
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        reading.read(str(path))
    message = str(info.value)
    assert message.startswith("30 bad record(s)")
    assert message.count("'text' must be a string") == reading.SHOWN
    assert "... and 10 more" in message and f"{path}:2:" in message and f"{path}:21:" in message
    read = reading.read(str(path), skip_bad=True)
    assert len(read.examples) == 1 and read.skipped == 30


def test_table_rows_are_named_by_row(tmp_path):
    pytest.importorskip("pyarrow")
    rows = [dict(RECORDS[0]), {"prompt": "x", "completion": None}]
    path = _write(tmp_path / "d.parquet", "parquet", rows)
    with pytest.raises(DataError, match=r"d.parquet row 2: missing key 'completion'"):
        reading.read(str(path))


def test_csv_with_a_bad_messages_cell(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('messages\n"[{""role"": ""user"", ""content"": ""x""}, ' +
                    '{""role"": ""assistant"", ""content"": ""y""}]"\n"not json"\n',
                    encoding="utf-8")
    with pytest.raises(DataError, match=r"d.csv:3: a cell that should hold JSON does not"):
        reading.read(str(path))
    assert len(reading.read(str(path), skip_bad=True).examples) == 1


def test_csv_labels_of_digits_are_class_ids(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood,1\nbad,0\n", encoding="utf-8")
    assert [e.label for e in reading.read(str(path)).examples] == [1, 0]


def test_a_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError("no pyarrow")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(DataError) as info:
        reading.read(str(path))
    assert str(info.value) == (f"{path}: reading parquet needs pyarrow, the optional extra "
                               "'data': pip install 'peftspec[data]'")


def test_format_of():
    from pathlib import Path

    assert readers.format_of(Path("x.ndjson")) == "jsonl"
    assert readers.format_of(Path("x.TSV")) == "tsv"
