"""``precision = "auto"``, the default (issue 25, point 3): bf16 autocast where bf16
is native and measured faster, fp32 elsewhere; an explicit choice overrides it,
a resumed run keeps its checkpoint's, and the run says what it chose and why."""

from __future__ import annotations

import pytest
import torch

from peftspec.core.train_config import OPTIONS, TrainConfig
from peftspec.train import precision
from peftspec.train.loop import train
from test_train import FAST, corpus, spec, tiny  # noqa: F401 (corpus: a fixture)


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(precision, "_CHOSEN", {})


def test_auto_is_the_default_and_explicit_choices_pass_through():
    assert OPTIONS["precision"].default == "auto" and TrainConfig().precision == "auto"
    for p in ("fp32", "bf16"):
        assert precision.resolve(p)[0] == p


@pytest.mark.parametrize("flags, gain, chosen", [
    (set(), 3.0, "fp32"),  # no native bf16: never, whatever a matmul does
    ({"avx512_bf16"}, 0.5, "fp32"),  # advertised, measured slower (this CI machine)
    ({"avx512_bf16"}, 1.1, "fp32"),  # not enough faster to pay
    ({"amx_bf16", "avx512_bf16"}, 2.4, "bf16")])
def test_a_cpu_gets_bf16_only_where_native_and_measured_faster(monkeypatch, flags, gain, chosen):
    monkeypatch.setattr(precision, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(precision, "measured_gain", lambda: gain)
    got, why = precision.choose("cpu")
    assert got == chosen
    assert (f"{gain:.2f}x" in why) == bool(flags)


def test_cuda_gets_bf16_where_the_device_has_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.choose("cuda")[0] == "bf16"
    precision._CHOSEN.clear()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.choose("cuda")[0] == "fp32"


def test_the_measured_gain_is_a_real_ratio():
    gain = precision.measured_gain()
    assert 0.01 < gain < 100


def test_a_resumed_run_keeps_the_checkpoints_precision(monkeypatch, tmp_path):
    monkeypatch.setattr(precision.ckpt, "read_state", lambda folder: {"config": {"precision": "bf16"}})
    monkeypatch.setattr(precision, "choose", lambda device: pytest.fail("measured on resume"))
    assert precision.for_run("auto", tmp_path, tiny()) == ("bf16", "auto: the checkpoint's")
    assert precision.for_run("fp32", tmp_path, tiny())[0] == "fp32"


@pytest.mark.parametrize("chosen", ["fp32", "bf16"])
def test_training_runs_in_what_auto_chose_and_says_so(monkeypatch, corpus, chosen):  # noqa: F811
    monkeypatch.setattr(precision, "choose", lambda device: (chosen, "because"))
    seen, events = [], []
    real = torch.autocast

    def spy(device_type, dtype=None, enabled=True, **kw):
        seen.append(enabled)
        return real(device_type, dtype=dtype, enabled=enabled, **kw)

    monkeypatch.setattr(torch, "autocast", spy)
    cfg = TrainConfig.resolve(data=str(corpus), steps=2, **FAST)
    result = train(spec(), cfg, model=tiny(), on_event=events.append)
    assert result.step == 2
    start = next(e for e in events if e["type"] == "start")
    assert start["precision"] == chosen and start["precision_why"] == "auto: because"
    assert start["threads"] >= 1
    assert seen and all(seen) == (chosen == "bf16")
