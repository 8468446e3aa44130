"""Streamed training data (issue 24, point 6): an offset index over JSON Lines
files, batches read and tokenized on a worker, an order that is a pure
function of (seed, epoch), and --resume that sees the batches an
uninterrupted run sees."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

import peftspec
from peftspec.cli import cli
from peftspec.core.train_config import TrainConfig
from peftspec.data import examples as data
from peftspec.data import readers, reading, stream
from peftspec.data.encoding import Counts
from peftspec.data.index import RecordIndex
from peftspec.data.packing import collate_packed
from peftspec.models.nanogpt import GPT, GPTConfig
from peftspec.models.tokenizer import ByteTokenizer
from peftspec.train.loop import train

LORA = """
[spec]
name = "t"
[[reparameterize]]
method = "lora"
modules = ["**.q_proj", "**.v_proj"]
r = 4
alpha = 8
"""


def _write(path: Path, n: int, *, start: int = 0) -> Path:
    path.write_text("".join(json.dumps({"text": f"record {i}: " + "ab" * (i % 7)}) + "\n"
                            for i in range(start, start + n)))
    return path


def _records(path, skip_bad=False):
    return stream.Records(RecordIndex.build([Path(path)]), skip_bad=skip_bad)


def _encode(max_length=64):
    return stream.encoder(ByteTokenizer(), max_length, loss_on="assistant", truncation="right")


def _batches(records, *, bs=3, seed=0, packing=False, window=8, numbers=None):
    return stream.StreamBatches(records, numbers, _encode(), batch_size=bs, pad_id=0, seed=seed,
                                packing=packing, max_length=64, window=window,
                                collate=collate_packed if packing else data.collate)


lines = st.lists(st.one_of(
    st.just(""), st.just("   "), st.just("\r"),
    st.dictionaries(st.sampled_from(["text", "x"]), st.text(max_size=8), min_size=1).map(
        json.dumps),
    st.text(alphabet="{}[]:\"ab\u00e9\u4e2d", max_size=6)), max_size=12)


@settings(deadline=None, max_examples=60)
@given(lines=lines, newline=st.sampled_from(["\n", "\r\n"]), trailing=st.booleans())
def test_index_reads_what_the_jsonl_reader_reads(tmp_path_factory, lines, newline, trailing):
    path = tmp_path_factory.mktemp("ix") / "d.jsonl"
    text = newline.join(lines) + (newline if trailing and lines else "")
    path.write_bytes(text.encode())
    index = RecordIndex.build([path])
    got = [index.record(i) for i in range(len(index))]
    got = [(w, v.message if isinstance(v, readers.Bad) else v) for w, v in got if v is not None]
    want = [(w, v.message if isinstance(v, readers.Bad) else v)
            for w, v in readers.records(path)]
    assert got == want
    assert index.digest == reading.digest(str(path))


def test_index_of_several_files_and_its_digest(tmp_path):
    a, b = _write(tmp_path / "a.jsonl", 5), _write(tmp_path / "b.jsonl", 4, start=5)
    index = RecordIndex.build([a, b])
    assert len(index) == 9 and index.record(5) == (f"{b}:1", {"text": "record 5: " + "ab" * 5})
    assert index.digest == reading.digest([str(a), str(b)])
    assert index.memory == 9 * 16


def test_index_is_small_and_one_pass(tmp_path):
    path = _write(tmp_path / "d.jsonl", 20_000)
    index = RecordIndex.build([path])
    assert len(index) == 20_000 and index.memory == 20_000 * 16
    assert index.record(19_999)[1]["text"].startswith("record 19999")


@settings(deadline=None, max_examples=20)
@given(n=st.integers(2, 60), fraction=st.floats(0.01, 0.5), seed=st.integers(0, 99))
def test_split_numbers_is_the_split_of_examples(n, fraction, seed):
    items = list(range(n))
    try:
        want = data.split(items, fraction, seed)
    except data.DataError:
        with pytest.raises(data.DataError):
            stream.split_numbers(n, fraction, seed)
        return
    train_numbers, held = stream.split_numbers(n, fraction, seed)
    assert (train_numbers.tolist(), held) == want


def _texts(batch):
    rows = []
    for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        rows.append(bytes(i for i, m in zip(ids, mask) if m and i < 256).decode())
    return rows


def test_an_epoch_visits_every_record_once_in_a_seeded_order(tmp_path):
    records = _records(_write(tmp_path / "d.jsonl", 10))
    b = _batches(records, bs=3, seed=4)
    assert b.per_epoch == 4
    epoch0 = [t for _ in range(4) for t in _texts(b.next())]
    epoch1 = [t for _ in range(4) for t in _texts(b.next())]
    b.close()
    want = sorted(json.loads(x)["text"] for x in (tmp_path / "d.jsonl").read_text().splitlines())
    assert sorted(epoch0) == want and sorted(epoch1) == want and epoch0 != epoch1
    again = _batches(records, bs=3, seed=4)
    assert [t for _ in range(4) for t in _texts(again.next())] == epoch0
    again.close()
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(4 * 1_000_003)).tolist()
    assert epoch0 == [f"record {i}: " + "ab" * (i % 7) for i in perm]


@settings(deadline=None, max_examples=25)
@given(n=st.integers(1, 40), bs=st.integers(1, 5), taken=st.integers(0, 25),
       packing=st.booleans(), window=st.integers(1, 9), seed=st.integers(0, 5))
def test_resume_sees_the_batches_of_an_uninterrupted_run(tmp_path_factory, n, bs, taken,
                                                         packing, window, seed):
    path = _write(tmp_path_factory.mktemp("r") / "d.jsonl", n)
    records = _records(path)
    a = _batches(records, bs=bs, seed=seed, packing=packing, window=window)
    seq = [a.next()["input_ids"] for _ in range(taken + 6)]
    a.close()
    b = _batches(records, bs=bs, seed=seed, packing=packing, window=window)
    for _ in range(taken):
        b.next()
    position = b.position()
    b.close()
    c = _batches(records, bs=bs, seed=seed, packing=packing, window=window)
    c.seek(json.loads(json.dumps(position)))  # as a checkpoint stores it
    assert all(c.next()["input_ids"].equal(x) for x in seq[taken:])
    c.close()


def test_packed_stream_keeps_whole_examples_and_estimates_an_epoch(tmp_path):
    records = _records(_write(tmp_path / "d.jsonl", 30))
    b = _batches(records, bs=2, packing=True, window=30)
    rows = []
    while b.epoch == 0:
        batch = b.next()
        rows.append(batch)
    b.close()
    assert b.per_epoch == len(rows) - 1 or b.per_epoch == len(rows)  # one window: exact
    seen = sorted(t for batch in rows[:b.per_epoch] for t in _texts_packed(batch))
    assert seen == sorted(f"record {i}: " + "ab" * (i % 7) for i in range(30))


def _texts_packed(batch):
    out = []
    for ids, pos in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist()):
        cur = []
        for i, p in zip(ids, pos):
            if p == 0 and cur:
                out.append(cur)
                cur = []
            cur.append(i)
        out.append(cur)
    # whole examples end with the end-of-text id (256); padding segments do not
    return [bytes(x for x in seg if x < 256).decode() for seg in out if seg and seg[-1] == 256]


def test_a_dropped_record_is_replaced_by_the_next(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": "x" * (200 if i % 3 == 0 else 5)}) + "\n"
                            for i in range(9)))
    records = _records(path)
    enc = stream.encoder(ByteTokenizer(), 32, loss_on="assistant", truncation="drop")
    b = stream.StreamBatches(records, None, enc, batch_size=2, pad_id=0, seed=0,
                             collate=data.collate)
    sizes = [b.next()["input_ids"].shape[0] for _ in range(3)]
    b.close()
    assert sizes == [2, 2, 2] and b.epoch == 0 and b.counts.dropped >= 2
    assert b.counts.records - b.counts.dropped == 6  # each dropped record replaced


def test_a_stream_with_nothing_to_learn_is_an_error_not_a_hang(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": "x" * 200}) + "\n" for _ in range(5)))
    enc = stream.encoder(ByteTokenizer(), 32, loss_on="assistant", truncation="drop")
    b = stream.StreamBatches(_records(path), None, enc, batch_size=2, pad_id=0, seed=0,
                             collate=data.collate)
    with pytest.raises(data.DataError, match="no example has a token to learn from.*5 records"):
        b.next()


def test_bad_records_are_all_found_before_training(tmp_path):
    path = _write(tmp_path / "d.jsonl", 6)
    text = path.read_text().splitlines()
    text[3] = '{"txt": "typo"}'
    text[5] = '{"text": 1'
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(data.DataError, match=rf"(?s)2 bad record.*{path}:4: .*txt.*{path}:6: "
                                             "not valid JSON"):
        _records(path).check()
    records = _records(path, skip_bad=True)
    assert records.check() == 2
    skip = _batches(records, bs=4)
    assert skip.next()["input_ids"].shape[0] == 4
    skip.close()
    assert skip.counts.skipped_bad >= 1


def test_mixed_kinds_are_refused_by_the_check(tmp_path):
    path = _write(tmp_path / "d.jsonl", 3)
    with path.open("a") as f:
        f.write('{"text": "x", "label": 1}\n')
    with pytest.raises(data.DataError, match=rf"{path}:4: classification record"):
        _records(path).check()


def test_when_to_stream(tmp_path, monkeypatch):
    small = _write(tmp_path / "d.jsonl", 3)
    assert stream.wanted(str(small), "auto") is None
    assert stream.wanted(str(small), "on") == [small]
    assert stream.wanted(str(small), "off") is None
    monkeypatch.setattr(stream, "STREAM_ABOVE", 10)
    assert stream.wanted([str(small)], "auto") == [small]
    csv = tmp_path / "d.csv"
    csv.write_text("text\nhello\n")
    assert stream.wanted([str(small), str(csv)], "auto") is None
    with pytest.raises(data.DataError, match=r"d\.csv: streaming reads JSON Lines.*csv"):
        stream.wanted(str(csv), "on")


def _tiny():
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))


def _log(path):
    return [json.loads(x) for x in path.read_text().splitlines()
            if json.loads(x)["type"] == "train"]


@pytest.mark.parametrize("packing", [False, True])
def test_streamed_run_resumes_as_if_never_stopped(tmp_path, packing):
    path = _write(tmp_path / "d.jsonl", 40)
    spec = peftspec.parse_spec(LORA, file="t.toml")
    common = dict(data=str(path), steps=8, batch_size=3, max_length=48, lr=5e-3,
                  save_every=3, streaming="on", packing=packing, eval_split=0.1)
    a = train(spec, TrainConfig.resolve(**common, log=str(tmp_path / "a.jsonl"),
                                        checkpoint_dir=str(tmp_path / "ca")),
              model=_tiny(), out=tmp_path / "a.safetensors")
    cfg_b = TrainConfig.resolve(**common, log=str(tmp_path / "b.jsonl"),
                                checkpoint_dir=str(tmp_path / "cb"))
    first = train(spec, cfg_b, model=_tiny(), max_steps_this_run=5)
    assert first.interrupted
    train(spec, cfg_b, model=_tiny(), out=tmp_path / "b.safetensors",
          resume=tmp_path / "cb" / "step-00000003")
    la, lb = _log(tmp_path / "a.jsonl"), _log(tmp_path / "b.jsonl")
    assert [r["loss"] for r in la] == [r["loss"] for r in lb] and len(la) == 8
    from safetensors.torch import load_file

    ta, tb = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a.eval_loss is not None
    with pytest.raises(peftspec.PeftspecError, match="streaming"):
        train(spec, cfg_b.with_(streaming="off"), model=_tiny(),
              resume=tmp_path / "cb" / "step-00000003")


def test_streamed_and_whole_runs_train_alike(tmp_path):
    """Without drops or packing a streamed run's batches are the whole run's:
    the same order formula over the same records."""
    path = _write(tmp_path / "d.jsonl", 20)
    spec = peftspec.parse_spec(LORA, file="t.toml")
    losses = {}
    for mode in ("on", "off"):
        cfg = TrainConfig.resolve(data=str(path), steps=6, batch_size=4, max_length=48,
                                  streaming=mode, log=str(tmp_path / f"{mode}.jsonl"))
        train(spec, cfg, model=_tiny())
        losses[mode] = [r["loss"] for r in _log(tmp_path / f"{mode}.jsonl")]
    assert losses["on"] == losses["off"]


def test_cli_streams_and_reports_what_it_read(tmp_path):
    path = _write(tmp_path / "d.jsonl", 30)
    spec_path = tmp_path / "s.toml"
    spec_path.write_text(LORA)
    res = CliRunner().invoke(cli, ["train", str(spec_path), "--data", str(path),
                                   "--streaming", "on", "--steps", "3", "--batch-size", "2",
                                   "--max-length", "48", "--out", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 0, res.output
    assert "30 of 30 records streamed from 1 file" in res.output
    assert "read 6 records as training went: 0 truncated" in res.output
    assert (tmp_path / "o.safetensors").is_file()


def test_cli_bad_record_is_exit_2_before_training_and_writes_nothing(tmp_path):
    path = _write(tmp_path / "d.jsonl", 30)
    with path.open("a") as f:
        f.write('{"messages": [{"role": "user"}]}\n')
    spec_path = tmp_path / "s.toml"
    spec_path.write_text(LORA)
    out = tmp_path / "o.safetensors"
    args = ["train", str(spec_path), "--data", str(path), "--streaming", "on", "--epochs", "1",
            "--batch-size", "4", "--max-length", "48", "--out", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    flat = " ".join(res.output.split())
    assert f"{path}:31" in flat and "nothing was trained on" in flat and not out.exists()
    assert "training" not in res.output.split("error")[0]
    res = CliRunner().invoke(cli, args + ["--skip-bad-records"])
    assert res.exit_code == 0, res.output
    assert "1 bad records skipped" in " ".join(res.output.split()) and out.is_file()
