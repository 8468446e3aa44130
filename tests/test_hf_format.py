"""HF PEFT's on-disk format, both ways, against real HF PEFT.

Export: a peftspec adapter (random, non-zero weights) is written with
``peftspec.formats.hf_peft.export_hf_peft`` and loaded by ``peft.PeftModel.from_pretrained``
into a fresh tiny GPT-2 (Conv1D) or Llama (Linear, grouped-query attention);
the two models' logits must agree. Import: an adapter saved by HF PEFT's
``save_pretrained`` is converted, loaded with ``peftspec.load_adapter`` onto a
fresh base, and compared with HF PEFT's model the same way; (IA)^3 through the
built-in ``ia3`` alone (``autoload=False``). Refusals and hostile inputs
go through the command line: exit code 2, a message naming the problem, and
no output written.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import peftspec  # noqa: E402
from peftspec.cli import cli  # noqa: E402
from peftspec.core.errors import ConversionError  # noqa: E402
from peftspec.formats.hf_peft import export_hf_peft, import_hf_peft  # noqa: E402

ATOL = 1e-5


@dataclass(frozen=True)
class Arch:
    name: str
    targets: tuple[str, ...]       # Linear / Conv1D leaf names LoRA adapts
    embedding: str
    stack: str                     # the name of the layer list
    norms: str                     # a parameter selector for every norm's parameters
    ia3: tuple[list, list]         # (IA)^3 modules, feedforward

    def base(self) -> nn.Module:
        torch.manual_seed(0)
        if self.name == "gpt2":
            cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100,
                                          n_positions=64, bos_token_id=0, eos_token_id=0)
            return transformers.GPT2LMHeadModel(cfg).eval()
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       vocab_size=100)
        return transformers.LlamaForCausalLM(cfg).eval()


GPT2 = Arch("gpt2", ("c_attn", "c_proj", "c_fc"), "wte", "h", "**.ln_*.**",
            (["attn.c_attn", "mlp.c_fc", "mlp.c_proj"], ["mlp.c_proj"]))
LLAMA = Arch("llama", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj"), "embed_tokens", "layers", "**.*norm.**",
             (["k_proj", "v_proj", "down_proj"], ["down_proj"]))
ARCHS = pytest.mark.parametrize("arch", [GPT2, LLAMA], ids=lambda a: a.name)


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


def logits(model: nn.Module) -> torch.Tensor:
    ids, mask = inputs()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def randomize(named, seed: int = 7) -> None:
    """Values far from init for every trainable tensor (LoRA B included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(named):
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "magnitude" in name:
                p.mul_(1.0 + 0.2 * noise)
            elif "ia3_l" in name:
                p.copy_(torch.rand(p.shape, generator=gen) * 1.5 + 0.25)
            elif "norm" in name or "ln_" in name:
                p.add_(0.2 * noise)
            elif "prompt" in name or "embedding" in name and "lora" not in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.1 * noise)


def hf_trainable(model: nn.Module):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def assert_same(ours: nn.Module, theirs: nn.Module, base: nn.Module) -> None:
    expected = logits(theirs)
    assert not torch.allclose(logits(base), expected[:, -7:], atol=1e-3), \
        "the adapter must matter, or agreeing proves nothing"
    torch.testing.assert_close(logits(ours), expected, atol=ATOL, rtol=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and lose a lot on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ia3_registry():
    """The built-ins alone: (IA)^3 is one of them."""
    registry = peftspec.build_registry(autoload=False)
    assert registry.methods["ia3"].dist == "peftspec"
    return registry


def rule(modules, family="reparameterize", **opts) -> str:
    body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in opts.items())
    key = "params" if family == "train" else "modules"
    return f"[[{family}]]\n{body}{key} = {json.dumps(modules)}\n\n"


def lora(arch, **opts) -> str:
    return rule([f"**.{t}" for t in arch.targets], method="lora", **opts)


PREFIX = {
    "prompt-tuning": '[prefix]\nmethod = "prompt-tuning"\ntokens = 4\ninit = "vocab"\n',
    "prefix-tuning": '[prefix]\nmethod = "prefix-tuning"\ntokens = 3\n',
    "prefix-projection": '[prefix]\nmethod = "prefix-tuning"\ntokens = 3\nprojection = true\n'
                         'projection_hidden = 16\n',
    "p-tuning": '[prefix]\nmethod = "p-tuning"\ntokens = 3\nencoder = "lstm"\n'
                'encoder_hidden = 16\n',
}

EXPORTS = {
    "lora": lambda a: lora(a, r=4, alpha=10),
    "rslora": lambda a: lora(a, r=4, alpha=6, rslora=True),
    "dora": lambda a: lora(a, r=4, alpha=8, dora=True),
    "per-module-ranks": lambda a: (
        rule([f"**.{a.targets[0]}"], method="lora", r=4, alpha=8) +
        rule([f"**.{a.targets[-1]}"], method="lora", r=2, alpha=3) +
        rule([f"**.{a.stack}.1.**.{a.targets[1]}"], method="lora", r=6, alpha=8)),
    "embedding": lambda a: lora(a, r=4, alpha=8) + rule([f"**.{a.embedding}"], method="lora",
                                                        r=3, alpha=5),
    "modules-to-save": lambda a: lora(a, r=2, alpha=4) + rule([a.norms], family="train"),
    **{k: (lambda a, v=v: v) for k, v in PREFIX.items()},
}


def make_adapter(arch, text, path, registry=None):
    """A peftspec adapter of ``text`` with random weights, saved at ``path``."""
    model = peftspec.apply(peftspec.parse_spec(text, registry=registry), arch.base(),
                           registry=registry)
    randomize(peftspec.trainable_parameters(model).items())
    peftspec.save_adapter(model, path)
    return model.eval()


@ARCHS
@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_loads_in_hf_peft(arch, case, tmp_path):
    ours = make_adapter(arch, EXPORTS[case](arch), tmp_path / "a.safetensors")
    # GPT-2 from the file alone (its metadata), Llama checked against the base
    model = arch.base() if arch is LLAMA else None
    out = export_hf_peft(tmp_path / "a.safetensors", tmp_path / "hf", model=model)
    config = json.loads((out / "adapter_config.json").read_text())
    theirs = peft.PeftModel.from_pretrained(arch.base(), str(out)).eval()
    assert_same(ours, theirs, arch.base())
    if case in ("lora", "rslora", "dora", "per-module-ranks", "embedding"):
        assert config["peft_type"] == "LORA"
        assert config["fan_in_fan_out"] is (arch is GPT2)
        assert config["use_dora"] is (case == "dora")
        assert config["use_rslora"] is (case == "rslora")
    if case == "per-module-ranks":
        assert config["r"] == 4 and config["lora_alpha"] == 8
        assert set(config["rank_pattern"].values()) == {2, 6}
        assert config["alpha_pattern"] == {arch.targets[-1]: 3}
    if case == "modules-to-save":
        assert config["modules_to_save"]
    if case in PREFIX:
        assert config["task_type"] == "CAUSAL_LM"
        assert config["num_virtual_tokens"] in (3, 4)


@ARCHS
def test_export_ia3(arch, ia3_registry, tmp_path):
    modules, ff = arch.ia3
    text = rule([f"**.{m}" for m in modules], family="augment", method="ia3",
                feedforward=[f"**.{m}" for m in ff])
    ours = make_adapter(arch, text, tmp_path / "a.safetensors", ia3_registry)
    out = export_hf_peft(tmp_path / "a.safetensors", tmp_path / "hf", registry=ia3_registry)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"
    assert set(config["feedforward_modules"]) <= set(config["target_modules"])
    theirs = peft.PeftModel.from_pretrained(arch.base(), str(out)).eval()
    assert_same(ours, theirs, arch.base())


# --- import -----------------------------------------------------------------------------

def lora_config(arch, **kw):
    return peft.LoraConfig(target_modules=list(arch.targets), fan_in_fan_out=arch is GPT2,
                           task_type="CAUSAL_LM", **kw)


IMPORTS = {
    "lora": lambda a: lora_config(a, r=4, lora_alpha=10),
    "rslora": lambda a: lora_config(a, r=4, lora_alpha=6, use_rslora=True),
    "dora": lambda a: lora_config(a, r=4, lora_alpha=8, use_dora=True),
    "patterns": lambda a: lora_config(
        a, r=4, lora_alpha=8,
        rank_pattern={a.targets[0]: 2, f"{a.stack}.1.mlp.{a.targets[-1]}": 6},
        alpha_pattern={a.targets[1]: 3}),
    "layers": lambda a: lora_config(a, r=4, lora_alpha=8, layers_to_transform=[1]),
    "regex-exclude": lambda a: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=rf".*\.({a.targets[0]}|{a.targets[-1]})",
        exclude_modules=[f"{a.stack}.0.{'attn' if a is GPT2 else 'self_attn'}.{a.targets[0]}"],
        fan_in_fan_out=a is GPT2, task_type="CAUSAL_LM"),
    "embedding": lambda a: peft.LoraConfig(r=3, lora_alpha=5,
                                           target_modules=[a.embedding, a.targets[0]],
                                           fan_in_fan_out=a is GPT2, task_type="CAUSAL_LM"),
    "modules-to-save": lambda a: peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=[a.targets[-1]], fan_in_fan_out=a is GPT2,
        modules_to_save=["ln_f"] if a is GPT2 else ["model.norm"], task_type="CAUSAL_LM"),
    "prompt-tuning": lambda a: peft.PromptTuningConfig(num_virtual_tokens=4,
                                                       task_type="CAUSAL_LM"),
    "prefix-tuning": lambda a: peft.PrefixTuningConfig(num_virtual_tokens=3,
                                                       task_type="CAUSAL_LM"),
    "prefix-projection": lambda a: peft.PrefixTuningConfig(
        num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16,
        task_type="CAUSAL_LM"),
    "p-tuning": lambda a: peft.PromptEncoderConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
}


def hf_adapter(arch, config, path: Path, base_name: str | None = None) -> nn.Module:
    """An HF PEFT model with random adapter weights, saved with save_pretrained."""
    model = peft.get_peft_model(arch.base(), config)
    model.peft_config["default"].base_model_name_or_path = base_name
    randomize(hf_trainable(model))
    model.save_pretrained(str(path))
    return model.eval()


def import_and_load(arch, src, tmp_path, registry=None):
    out, spec = import_hf_peft(src, tmp_path / "a.safetensors", tmp_path / "a.toml",
                               model=arch.base(), registry=registry)
    text = spec.read_text()
    peftspec.parse_spec(text, registry=registry)  # parses on its own
    ours = peftspec.load_adapter(arch.base(), out, registry=registry).eval()
    return ours, text


@ARCHS
@pytest.mark.parametrize("case", list(IMPORTS))
def test_import_matches_hf_peft(arch, case, tmp_path):
    theirs = hf_adapter(arch, IMPORTS[case](arch), tmp_path / "hf")
    base = arch.base()
    ours, text = import_and_load(arch, tmp_path / "hf", tmp_path)
    assert_same(ours, theirs, base)
    method = {"prompt-tuning": "prompt-tuning", "prefix-tuning": "prefix-tuning",
              "prefix-projection": "prefix-tuning", "p-tuning": "p-tuning"}.get(case, "lora")
    assert f'method = "{method}"' in text
    if case == "patterns":  # one readable rule per (r, alpha)
        assert text.count("[[reparameterize]]") == 4
        for r, alpha in ((4, 8), (2, 8), (6, 8), (4, 3)):
            assert re.search(rf"\nr = {r}\nalpha = {alpha}\n", text), (r, alpha, text)
        assert f'"**.{arch.targets[0]}"' in text
    if case == "layers":
        assert f"**.{arch.stack}.1.**.{arch.targets[0]}" in text
    if case == "regex-exclude":
        assert "modules = ['re:" in text and "exclude = [" in text
    if case == "modules-to-save":
        assert "[[train]]" in text


@ARCHS
def test_import_ia3(arch, ia3_registry, tmp_path):
    modules, ff = arch.ia3
    config = peft.IA3Config(target_modules=modules, feedforward_modules=ff,
                            fan_in_fan_out=arch is GPT2, task_type="CAUSAL_LM")
    theirs = hf_adapter(arch, config, tmp_path / "hf")
    ours, text = import_and_load(arch, tmp_path / "hf", tmp_path, ia3_registry)
    assert 'method = "ia3"' in text and "feedforward = " in text
    assert_same(ours, theirs, arch.base())


def test_round_trip_keeps_every_tensor(tmp_path):
    """peftspec -> HF PEFT -> peftspec gives back the same tensors, bit for bit."""
    text = EXPORTS["per-module-ranks"](LLAMA)
    make_adapter(LLAMA, text, tmp_path / "a.safetensors")
    export_hf_peft(tmp_path / "a.safetensors", tmp_path / "hf")
    import_hf_peft(tmp_path / "hf", tmp_path / "b.safetensors", model=LLAMA.base())
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "b.toml").read_text().count("[[reparameterize]]") == 3


# --- refusals ---------------------------------------------------------------------------

REFUSED = {
    "bottleneck": ('[[augment]]\nmethod = "bottleneck"\nafter = ["**.mlp"]\nsize = 4\n',
                   r"bottleneck.*no HF PEFT counterpart"),
    "overlap": (lora(LLAMA, r=2) + rule(["model.layers.0.self_attn.q_proj.weight"],
                                        family="train"),
                r"q_proj' \(reparameterize\[0\], lora\) overlaps"),
    "mixed": (lora(LLAMA, r=2) + PREFIX["prompt-tuning"], r"one peft_type.*LORA.*PROMPT_TUNING"),
    "dropout": (rule(["**.q_proj"], method="lora", dropout=0.1) +
                rule(["**.v_proj"], method="lora", dropout=0.0), r"differ in 'dropout'"),
    "train-only": (rule(["**.*norm.**"], family="train"), r"only has \[\[train\]\] rules"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_export_refuses_what_hf_peft_cannot_express(case, tmp_path):
    text, message = REFUSED[case]
    make_adapter(LLAMA, text, tmp_path / "a.safetensors")
    with pytest.raises(ConversionError, match=message):
        export_hf_peft(tmp_path / "a.safetensors", tmp_path / "hf", model=LLAMA.base())
    assert not (tmp_path / "hf").exists()


def test_export_refuses_bitfit_biases_on_gpt2(tmp_path):
    make_adapter(GPT2, lora(GPT2, r=2) + rule(["**.bias"], family="train"),
                 tmp_path / "a.safetensors")
    with pytest.raises(ConversionError, match=r"trains '.*\.bias' but not '.*\.weight'"):
        export_hf_peft(tmp_path / "a.safetensors", tmp_path / "hf")


# --- the command line -------------------------------------------------------------------

def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    LLAMA.base().save_pretrained(path)
    return path


def test_cli_export_end_to_end(llama_dir, tmp_path):
    ours = make_adapter(LLAMA, lora(LLAMA, r=4, alpha=8, dora=True), tmp_path / "a.safetensors")
    r = invoke("export", tmp_path / "a.safetensors", "--format", "hf-peft", "--out",
               tmp_path / "hf", "--model", f"hf:{llama_dir}")
    assert r.exit_code == 0, r.output
    assert "adapter_config.json" in r.output
    config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(llama_dir)
    assert config["task_type"] == "CAUSAL_LM"
    theirs = peft.PeftModel.from_pretrained(LLAMA.base(), str(tmp_path / "hf")).eval()
    assert_same(ours, theirs, LLAMA.base())
    r = invoke("export", "--help")
    assert r.exit_code == 0 and "Example" in r.output and "--task-type" in r.output


def test_cli_import_end_to_end(llama_dir, tmp_path):
    config = lora_config(LLAMA, r=4, lora_alpha=8, rank_pattern={"q_proj": 2})
    theirs = hf_adapter(LLAMA, config, tmp_path / "hf", base_name=str(llama_dir))
    # no --model: the config's base_model_name_or_path is a local folder
    r = invoke("import", tmp_path / "hf", "--out", tmp_path / "a.safetensors",
               "--spec-out", tmp_path / "a.toml")
    assert r.exit_code == 0, r.output
    r2 = invoke("check", tmp_path / "a.toml")
    assert r2.exit_code == 0, r2.output
    ours = peftspec.load_adapter(LLAMA.base(), tmp_path / "a.safetensors").eval()
    assert_same(ours, theirs, LLAMA.base())
    r = invoke("import", "--help")
    assert r.exit_code == 0 and "Example" in r.output and "--spec-out" in r.output


def test_cli_export_refusal_exits_2(tmp_path):
    make_adapter(LLAMA, REFUSED["bottleneck"][0], tmp_path / "a.safetensors")
    r = invoke("export", tmp_path / "a.safetensors", "--out", tmp_path / "hf")
    assert r.exit_code == 2
    assert "bottleneck" in r.output and "no HF PEFT counterpart" in r.output


def _hostile(kind: str, hf: Path) -> str:
    """Damage the saved HF PEFT adapter in ``hf``; return what the error must say."""
    cfg, weights = hf / "adapter_config.json", hf / "adapter_model.safetensors"
    if kind == "no-config":
        cfg.unlink()
        return "no adapter_config.json"
    if kind == "unknown-peft-type":
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "peft_type": "BOFT"}))
        return "unknown peft_type 'BOFT'"  # (VERA, used before, is read now)
    if kind == "bin-only":
        weights.rename(hf / "adapter_model.bin")
        return "adapter_model.bin, a pickle"
    if kind == "config-mismatch":  # the config targets modules the file has no tensors for
        data = json.loads(cfg.read_text())
        cfg.write_text(json.dumps({**data, "target_modules": ["q_proj", "o_proj"]}))
        return "lacks tensor 'base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight'"
    if kind == "wrong-rank":
        data = json.loads(cfg.read_text())
        cfg.write_text(json.dumps({**data, "r": 3}))
        return "tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' has " \
               "shape [4, 32]"
    if kind == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) - 100])
        return "not a readable safetensors file"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["no-config", "unknown-peft-type", "bin-only",
                                  "config-mismatch", "wrong-rank", "truncated"])
def test_cli_import_refuses_hostile_input_and_writes_nothing(kind, llama_dir, tmp_path):
    hf_adapter(LLAMA, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                      task_type="CAUSAL_LM"), tmp_path / "hf")
    message = _hostile(kind, tmp_path / "hf")
    out, spec = tmp_path / "a.safetensors", tmp_path / "a.toml"
    out.write_bytes(b"an older adapter")  # must be left as it was
    r = invoke("import", tmp_path / "hf", "--out", out, "--spec-out", spec,
               "--model", f"hf:{llama_dir}")
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split()), r.output
    assert out.read_bytes() == b"an older adapter"
    assert not spec.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "hf"]


def test_import_leaves_a_given_model_unchanged(tmp_path):
    hf_adapter(GPT2, IMPORTS["modules-to-save"](GPT2), tmp_path / "hf")
    model = GPT2.base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    import_hf_peft(tmp_path / "hf", tmp_path / "a.safetensors", model=model)
    assert not peftspec.is_patched(model)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())
