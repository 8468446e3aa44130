"""Fuzzing every reader of outside input: specs, adapter files, HF PEFT folders,
data files, metrics logs, checkpoints.

Each example must end in success or a PeftspecError with a message (never
another exception), within a second (see tests/fuzzing.py), and a failed load
must leave the model as it was. Derandomized in CI (the ``ci`` profile);
``HYPOTHESIS_PROFILE=explore`` runs many more. (The GGUF reader does not exist
yet; it gets its fuzz test when it lands.)
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import peftspec
from peftspec.formats.adapter_file import describe_file, read_metadata
from peftspec.models.nanogpt import GPT, GPTConfig
from fuzzing import (JSON, TOML_DOCS, mutate_doc, mutated_safetensors, outcome, to_toml)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
SPEC_FILES = sorted((ROOT / "specs").glob("*.toml"))
NAMES = itertools.count()
FIXTURES = settings(suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def reg():
    return peftspec.build_registry()


def small() -> GPT:
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))


@pytest.fixture(scope="module")
def model():
    return small()


def fresh(work: Path, suffix: str) -> Path:
    return work / f"x{next(NAMES)}{suffix}"


# --- the spec loader -------------------------------------------------------------------

def load_compile_apply(text: str, model, reg, file="fuzz.toml"):
    spec = peftspec.parse_spec(text, file=file, registry=reg)
    plan = peftspec.compile_plan(spec, model, registry=reg)
    peftspec.apply_plan(plan, model, registry=reg)
    peftspec.remove(model)


def check_model_plain(model):
    assert not peftspec.is_patched(model)


@FIXTURES
@given(data=st.binary(max_size=400))
def test_spec_loader_random_bytes(data, work, reg):
    path = fresh(work, ".toml")
    path.write_bytes(data)
    outcome("spec: random bytes", peftspec.load_spec, path, registry=reg)
    path.unlink()


@FIXTURES
@given(text=st.text(alphabet=st.sampled_from(list('[]{}"\'#=.,\n \\tabr0189-_:*')),
                    max_size=200) | st.text(max_size=200))
def test_spec_loader_random_text(text, reg):
    outcome("spec: random text", peftspec.parse_spec, text, file="f.toml", registry=reg)


@FIXTURES
@given(doc=TOML_DOCS)
def test_spec_loader_random_toml_documents(doc, model, reg):
    text = to_toml(doc)
    tomllib.loads(text)  # the generator writes valid TOML; the spec is what is random
    outcome("spec: random TOML documents", load_compile_apply, text, model, reg)
    check_model_plain(model)


@FIXTURES
@given(path=st.sampled_from(SPEC_FILES), data=st.data())
def test_spec_loader_valid_specs_with_random_keys_and_values(path, data, model, reg):
    doc = tomllib.loads(path.read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        doc = mutate_doc(data.draw, doc)
    text = to_toml(doc)
    outcome("spec: mutated valid specs", load_compile_apply, text, model, reg)
    check_model_plain(model)


# --- the adapter file reader -----------------------------------------------------------

ADAPTER_SPEC = textwrap.dedent("""
    [spec]
    name = "fuzz"
    [[train]]
    params = ["**.ln_f.bias"]
    [[reparameterize]]
    method = "lora"
    modules = ["**.q_proj", "**.v_proj"]
    r = 2
    dora = true
    [[augment]]
    method = "bottleneck"
    after = ["blocks.0.mlp"]
    size = 4
""")
# embedded specs a hostile file might carry instead of its own
HOSTILE_SPECS = [
    ADAPTER_SPEC.replace("r = 2", "r = 1000000000"),
    ADAPTER_SPEC.replace("size = 4", "size = 100000000000"),
    ADAPTER_SPEC + '[prefix]\nmethod = "prompt-tuning"\ntokens = 100000000000\n',
    ADAPTER_SPEC.replace('"**.v_proj"', "'re:([\\w.]+)+[!?]'"),
    ADAPTER_SPEC.replace("r = 2", "r = [2"),
    '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj"]\nr = 2\n',
    "",
]


@pytest.fixture(scope="module")
def adapter_bytes(work) -> bytes:
    m = small()
    peftspec.apply(peftspec.parse_spec(ADAPTER_SPEC, file="fuzz.toml"), m)
    path = work / "real.safetensors"
    peftspec.save_adapter(m, path, metadata={"task": "x", "labels": '["a", "b"]'})
    return path.read_bytes()


def read_adapter(path: Path, model, reg):
    read_metadata(path)
    describe_file(path)
    peftspec.load_adapter(model, path, registry=reg)
    peftspec.remove(model)


@FIXTURES
@given(data=st.binary(max_size=300))
def test_adapter_reader_random_bytes(data, work, model, reg):
    path = fresh(work, ".safetensors")
    path.write_bytes(data)
    outcome("adapter file: random bytes", read_adapter, path, model, reg)
    check_model_plain(model)
    path.unlink()


@FIXTURES
@given(data=st.data())
def test_adapter_reader_mutated_real_files(data, work, model, reg, adapter_bytes):
    raw = data.draw(mutated_safetensors(adapter_bytes, HOSTILE_SPECS))
    path = fresh(work, ".safetensors")
    path.write_bytes(raw)
    outcome("adapter file: mutated real files", read_adapter, path, model, reg)
    check_model_plain(model)
    path.unlink()


@FIXTURES
@given(data=st.data())
def test_export_reads_mutated_adapter_files(data, work, reg, adapter_bytes):
    raw = data.draw(mutated_safetensors(adapter_bytes, HOSTILE_SPECS))
    path, out = fresh(work, ".safetensors"), fresh(work, ".hf")
    path.write_bytes(raw)
    outcome("export: mutated adapter files", peftspec.export_hf_peft, path, out, registry=reg)
    path.unlink()
    shutil.rmtree(out, ignore_errors=True)


# --- the HF PEFT importer --------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_folder(work):
    peft = pytest.importorskip("peft")
    from test_hf_format import LLAMA, hf_adapter

    path = work / "hf-real"
    hf_adapter(LLAMA, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                      task_type="CAUSAL_LM"), path)
    return path, LLAMA.base()


HF_KEYS = ["r", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform",
           "layers_pattern", "rank_pattern", "alpha_pattern", "modules_to_save", "peft_type",
           "use_dora", "use_rslora", "fan_in_fan_out", "lora_dropout", "bias", "task_type",
           "num_virtual_tokens", "init_lora_weights", "base_model_name_or_path",
           "encoder_hidden_size", "prefix_projection", "token_dim", "num_layers"]
HF_VALUES = st.one_of(JSON, st.sampled_from(
    ["q_proj", ["q_proj"], ["q_proj", "nope"], ".*", "([\\w.]+)+[!?]", "(?!x).*", "(",
     "LORA", "PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "IA3", "VERA", 0, -1, 3, 10**9,
     [0], [99], {"q_proj": 2}, {"([\\w.]+)+[!?]": 2}, {"(": 1}, None, True, "/nonexistent"]))


def import_folder(src: Path, work: Path, base, reg):
    out = fresh(work, ".safetensors")
    try:
        peftspec.import_hf_peft(src, out, model=base, registry=reg)
    finally:
        out.unlink(missing_ok=True)
        out.with_suffix(".toml").unlink(missing_ok=True)


def _copy(src: Path, work: Path) -> Path:
    dst = fresh(work, ".hf")
    shutil.copytree(src, dst)
    return dst


@FIXTURES
@given(data=st.data())
def test_hf_importer_mutated_configs(data, work, hf_folder, reg):
    src, base = hf_folder
    dst = _copy(src, work)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(HF_KEYS + list(cfg)))
        if data.draw(st.integers(0, 4)) == 0:
            cfg.pop(key, None)
        else:
            cfg[key] = data.draw(HF_VALUES)
    text = json.dumps(cfg)
    if data.draw(st.integers(0, 5)) == 0:  # and now and then, broken JSON
        i = data.draw(st.integers(0, len(text)))
        text = text[:i] + data.draw(st.text(max_size=3)) + text[i + 1:]
    (dst / "adapter_config.json").write_text(text)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    outcome("HF PEFT import: mutated adapter_config.json", import_folder, dst, work, base, reg)
    assert all(v.equal(before[k]) for k, v in base.state_dict().items())
    shutil.rmtree(dst)


@FIXTURES
@given(data=st.data())
def test_hf_importer_mutated_tensor_files(data, work, hf_folder, reg):
    src, base = hf_folder
    dst = _copy(src, work)
    weights = dst / "adapter_model.safetensors"
    weights.write_bytes(data.draw(mutated_safetensors(weights.read_bytes())))
    outcome("HF PEFT import: mutated tensor files", import_folder, dst, work, base, reg)
    shutil.rmtree(dst)


@FIXTURES
@given(data=st.binary(max_size=200), name=st.sampled_from(["adapter_config.json",
                                                           "adapter_model.safetensors"]))
def test_hf_importer_random_bytes(data, name, work, hf_folder, reg):
    src, base = hf_folder
    dst = _copy(src, work)
    (dst / name).write_bytes(data)
    outcome("HF PEFT import: random bytes", import_folder, dst, work, base, reg)
    shutil.rmtree(dst)


# --- data readers, the metrics log, checkpoints ----------------------------------------

LINES = st.one_of(
    JSON.map(json.dumps),
    st.fixed_dictionaries({}, optional={"text": JSON, "prompt": JSON, "completion": JSON,
                                        "label": JSON, "x": JSON}).map(json.dumps),
    st.sampled_from(["[" * 5000, "1" * 5000, '{"text": ' + "1" * 5000 + "}", "",
                     '{"text": "\\ud800"}', "\x00", '{"text": "a"}']),
    st.text(max_size=30))


def read_data(path: Path):
    from peftspec.data.examples import Labels, read_examples

    examples = read_examples(path)
    if any(ex.label is not None for ex in examples):
        Labels.of(examples, str(path))


@FIXTURES
@given(lines=st.lists(LINES, max_size=6), suffix=st.sampled_from([".jsonl", ".txt"]))
def test_data_reader_random_lines(lines, suffix, work):
    path = fresh(work, suffix)
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    outcome("data: JSONL / text lines", read_data, path)
    path.unlink()


@FIXTURES
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".txt"]))
def test_data_reader_random_bytes(data, suffix, work):
    path = fresh(work, suffix)
    path.write_bytes(data)
    outcome("data: random bytes", read_data, path)
    path.unlink()


@FIXTURES
@given(lines=st.lists(LINES, max_size=6))
def test_metrics_log_reader(lines, work):
    from peftspec.train.metrics import read

    path = fresh(work, ".jsonl")
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    outcome("metrics log (peftspec report)", read, path)
    path.unlink()


@FIXTURES
@given(state_text=st.one_of(JSON.map(json.dumps), st.binary(max_size=100).map(
    lambda b: b.decode("latin-1")), st.just('{"format": "peftspec.checkpoint"}')),
       latest=st.one_of(st.none(), st.text(max_size=20)))
def test_checkpoint_reader(state_text, latest, work):
    from peftspec.train import resume as ckpt

    folder = fresh(work, ".ckpt")
    step = folder / "step-00000001"
    step.mkdir(parents=True)
    (step / "state.json").write_text(state_text, encoding="utf-8", errors="surrogatepass")
    if latest is not None:
        (folder / "latest").write_text(latest, encoding="utf-8", errors="surrogatepass")

    def read():
        ckpt.read_state(ckpt.find(folder if latest is not None else step))

    outcome("checkpoint: state.json and latest", read)
    shutil.rmtree(folder)
