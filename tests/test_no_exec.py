"""Nothing executes from a file: whatever a spec, an adapter file, an HF PEFT
folder or a checkpoint says, reading it imports no module it names and
unpickles nothing.

An audit hook (``sys.addaudithook``) watches for the events code execution
from data goes through (``pickle.find_class``, ``exec`` of code compiled from
the test's files, processes started) and for the import of a probe module the
files name; ``torch.load``, ``pickle.load(s)`` and ``importlib.import_module``
are patched to record their calls as well. The probe module and the pickles
also leave a marker file if they ever run. ``py:`` on the command line runs
code by design (``--model py:pkg.mod:factory``); no file can reach it.
"""

from __future__ import annotations

import importlib
import json
import pickle
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import peftspec
from peftspec.cli import cli
from peftspec.core.errors import PeftspecError

PROBE = "peftspec_probe_never_import"
WATCH: dict = {"on": False, "root": None, "events": []}


def _hook(event, args):
    if not WATCH["on"]:
        return
    if event in ("pickle.find_class", "os.system", "subprocess.Popen", "os.exec",
                 "os.posix_spawn", "os.spawn", "os.fork"):
        WATCH["events"].append((event, repr(args)[:200]))
    elif event == "import" and PROBE in str(args[0]):
        WATCH["events"].append((event, args[0]))
    elif event == "exec" and hasattr(args[0], "co_filename") and WATCH["root"] and \
            str(args[0].co_filename).startswith(WATCH["root"]):
        WATCH["events"].append((event, args[0].co_filename))


if not getattr(sys, "_peftspec_no_exec_hook", False):  # a hook cannot be removed: add once
    sys.addaudithook(_hook)
    sys._peftspec_no_exec_hook = True


class _Payload:
    """Unpickling this creates the marker file (as a real payload would run code)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def trap(tmp_path, monkeypatch):
    """A probe module on sys.path, a pickle payload, the watch switched on."""
    site = tmp_path / "site"
    site.mkdir()
    marker = tmp_path / "EXECUTED"
    (site / f"{PROBE}.py").write_text(textwrap.dedent(f"""
        open({str(marker)!r}, "w").write("imported")
        import torch
        def build(**kw):
            return torch.nn.Linear(2, 2)
        """))
    monkeypatch.syspath_prepend(str(site))
    calls = []

    def recorder(name, real):
        def wrapper(*a, **k):
            if name != "importlib.import_module" or PROBE in str(a[:1]):
                calls.append(name)
            return real(*a, **k)
        return wrapper

    monkeypatch.setattr(torch, "load", recorder("torch.load", torch.load))
    monkeypatch.setattr(pickle, "load", recorder("pickle.load", pickle.load))
    monkeypatch.setattr(pickle, "loads", recorder("pickle.loads", pickle.loads))
    monkeypatch.setattr(importlib, "import_module",
                        recorder("importlib.import_module", importlib.import_module))
    payload = pickle.dumps(_Payload(str(marker)))

    class Trap:
        def __init__(self):
            self.marker, self.payload, self.calls, self.root = marker, payload, calls, tmp_path

        def read(self, fn, *args, **kwargs):
            """Run a reader on hostile input: any outcome but code execution is fine."""
            WATCH.update(on=True, root=str(self.root), events=[])
            try:
                fn(*args, **kwargs)
            except PeftspecError:
                pass
            finally:
                WATCH["on"] = False
            assert not WATCH["events"], WATCH["events"]
            assert not self.calls, self.calls
            assert not self.marker.exists(), "a file made peftspec run code"
            assert PROBE not in sys.modules

    yield Trap()
    sys.modules.pop(PROBE, None)


PY = f"py:{PROBE}:build"
HOSTILE_SPEC = textwrap.dedent(f"""
    [spec]
    name = "{PY}"
    [[reparameterize]]
    method = "{PY}"
    modules = ["{PY}"]
    [[augment]]
    method = "bottleneck"
    after = ["{PY}"]
    size = 2
    [prefix]
    method = "prompt-tuning"
    tokens = 2
    embedding = "{PY}"
    [train_config]
    data = "{PY}"
    checkpoint_dir = "{PY}"
    """)


def test_specs_naming_py_sources_run_nothing(trap, tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(HOSTILE_SPEC)
    trap.read(peftspec.load_spec, path)
    for line in ("", 'method = "lora"\nmodules = ["**.q_proj"]\n', ):
        text = f"[[reparameterize]]\n{line}"
        trap.read(lambda: peftspec.compile_plan(peftspec.parse_spec(text),
                                                peftspec.load_model(None)))
    trap.read(lambda: peftspec.compile_plan(peftspec.parse_spec(
        f'[prefix]\nmethod = "prompt-tuning"\ntokens = 2\nembedding = "{PY}"\n'),
        peftspec.load_model(None)))
    for cmd in (["check", path], ["plan", path], ["apply", path, "--out", tmp_path / "a"],
                ["train", path, "--out", tmp_path / "b"], ["memory", path]):
        trap.read(CliRunner().invoke, cli, [str(c) for c in cmd])


def _adapter(tmp_path) -> Path:
    model = peftspec.load_model(None)
    peftspec.apply(peftspec.parse_spec('[[reparameterize]]\nmethod = "lora"\n'
                                       'modules = ["**.q_proj"]\nr = 2\n'), model)
    path = tmp_path / "a.safetensors"
    peftspec.save_adapter(model, path, metadata={"task": PY, "labels": json.dumps([PY])})
    return path


def _rewrite_metadata(path: Path, **changes):
    from fuzzing import join_file, split_file

    header, data = split_file(path.read_bytes())
    header["__metadata__"].update(changes)
    path.write_bytes(join_file(header, data))


def test_adapter_files_naming_code_or_holding_pickles_run_nothing(trap, tmp_path):
    path = _adapter(tmp_path)
    _rewrite_metadata(path, spec=HOSTILE_SPEC, peftspec_version=PY, targets=json.dumps({PY: PY}))
    model = peftspec.load_model(None)
    trap.read(peftspec.load_adapter, model, path)
    trap.read(peftspec.export_hf_peft, path, tmp_path / "hf")
    trap.read(CliRunner().invoke, cli, ["merge", "--adapter", str(path), "--out",
                                        str(tmp_path / "m")])
    pickled = tmp_path / "p.safetensors"
    pickled.write_bytes(trap.payload)  # a pickle under a safetensors name
    trap.read(peftspec.load_adapter, model, pickled)
    torch_saved = tmp_path / "t.safetensors"
    torch.save({"x": _PayloadTensorHolder(trap.marker)}, torch_saved)
    trap.read(peftspec.load_adapter, model, torch_saved)
    assert not peftspec.is_patched(model)


class _PayloadTensorHolder(_Payload):
    pass


@pytest.fixture
def hf_dir(tmp_path):
    peft = pytest.importorskip("peft")
    from test_hf_format import LLAMA, hf_adapter

    src = tmp_path / "hf"
    hf_adapter(LLAMA, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                      task_type="CAUSAL_LM"), src)
    return src, LLAMA


def _set_config(src: Path, **changes):
    cfg = src / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **changes}))


def test_hf_peft_folders_naming_code_or_holding_pickles_run_nothing(trap, hf_dir, tmp_path):
    src, arch = hf_dir
    out = tmp_path / "a.safetensors"
    _set_config(src, base_model_name_or_path=PY, peft_type="LORA",
                target_modules=[PY], auto_mapping={"base_model_class": PY, "parent_library": PY})
    trap.read(peftspec.import_hf_peft, src, out)  # no --model: the config names the base
    trap.read(peftspec.import_hf_peft, src, out, model=arch.base())
    # a pickle beside the safetensors file is never opened; alone, it is refused
    (src / "adapter_model.bin").write_bytes(trap.payload)
    trap.read(peftspec.import_hf_peft, src, out, model=arch.base())
    (src / "adapter_model.safetensors").unlink()
    trap.read(peftspec.import_hf_peft, src, out, model=arch.base())
    (src / "adapter_model.safetensors").write_bytes(trap.payload)
    trap.read(peftspec.import_hf_peft, src, out, model=arch.base())


def test_a_base_folder_named_by_a_config_cannot_run_code(trap, hf_dir, tmp_path):
    """base_model_name_or_path may name a local transformers folder: its pickled
    weights are refused and its remote code (auto_map) is not trusted."""
    src, arch = hf_dir
    base = tmp_path / "base"
    arch.base().save_pretrained(base)
    (base / "model.safetensors").unlink()
    (base / "pytorch_model.bin").write_bytes(trap.payload)
    _set_config(src, base_model_name_or_path=str(base))
    trap.read(peftspec.import_hf_peft, src, tmp_path / "a.safetensors")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({
        **config, "model_type": "probe", "architectures": ["ProbeModel"],
        "auto_map": {"AutoConfig": f"{PROBE}.Config", "AutoModel": f"{PROBE}.Model"}}))
    (base / f"{PROBE}.py").write_text((tmp_path / "site" / f"{PROBE}.py").read_text())
    trap.read(peftspec.import_hf_peft, src, tmp_path / "a.safetensors")
    trap.read(CliRunner().invoke, cli, ["plan", str(Path(__file__).parent.parent / "specs" /
                                                    "lora.toml"), "--model", f"hf:{base}"])


def test_checkpoints_holding_pickles_or_naming_code_run_nothing(trap, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("hello harbour\n\nthe tide comes in\n")
    spec = tmp_path / "s.toml"
    spec.write_text('[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj"]\nr = 2\n')
    out = tmp_path / "a.safetensors"
    r = CliRunner().invoke(cli, ["train", str(spec), "--out", str(out), "--data", str(data),
                                 "--steps", "2", "--save-every", "1", "--batch-size", "2"])
    assert r.exit_code == 0, r.output
    folder = tmp_path / "a.checkpoints" / "step-00000002"
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**state, "model": PY, "spec": PY}))
    (folder / "optimizer.pt").write_bytes(trap.payload)
    (folder / "rng.pkl").write_bytes(trap.payload)
    args = ["train", str(spec), "--out", str(out), "--data", str(data), "--steps", "3",
            "--batch-size", "2", "--resume", str(tmp_path / "a.checkpoints")]
    trap.read(CliRunner().invoke, cli, args)
    (folder / "optimizer.safetensors").write_bytes(trap.payload)
    trap.read(CliRunner().invoke, cli, args)
    (folder / "adapter.safetensors").write_bytes(trap.payload)
    trap.read(CliRunner().invoke, cli, args)


def test_the_watch_sees_an_unpickle_and_an_import(trap):
    """The trap itself works: a real unpickle and a real import of the probe are caught."""
    with pytest.raises(AssertionError):
        trap.read(pickle.loads, trap.payload)
    trap.marker.unlink(missing_ok=True)
    trap.calls.clear()
    with pytest.raises(AssertionError):
        trap.read(importlib.import_module, PROBE)
