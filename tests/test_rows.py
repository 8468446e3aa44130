"""Per-row adapters: each batch row through its own adapter, equal to running it alone."""

from __future__ import annotations

import textwrap

import pytest
import torch

import peftspec
from peftspec.models.nanogpt import GPT, GPTConfig

SPECS = {
    "lora": '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj", "**.v_proj"]\nr = 4',
    "rslora": '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj", "**.up_proj"]\n'
              'r = 8\nrslora = true',
    "dora": '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj", "**.o_proj"]\n'
            'dora = true',
    "adapter": '[[augment]]\nmethod = "bottleneck"\nafter = ["**.mlp"]\nsize = 4\n'
               '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.up_proj"]',
    "prompt_a": '[prefix]\nmethod = "prompt-tuning"\ntokens = 3',
    "prompt_b": '[prefix]\nmethod = "prompt-tuning"\ntokens = 3\ninit = "vocab"',
}


GPT2_SPECS = {
    "lora": '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.c_attn"]\nr = 4',
    "rslora": '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.c_fc"]\nr = 8\n'
              'rslora = true',
    "dora": '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.c_attn", "**.attn.c_proj"]\n'
            'dora = true',
    "adapter": '[[augment]]\nmethod = "bottleneck"\nafter = ["**.mlp"]\nsize = 4\n'
               '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.c_fc"]',
    "prompt_a": SPECS["prompt_a"],
    "prompt_b": SPECS["prompt_b"],
}


def default_model():
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()


def gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).eval()


def loaded(build, names, tmp_path):
    model = build()
    for i, name in enumerate(names):
        single = build()
        torch.manual_seed(i)
        specs = SPECS if build is default_model else GPT2_SPECS
        peftspec.apply(peftspec.parse_spec(textwrap.dedent(specs[name])), single)
        with torch.no_grad():
            for p in peftspec.trainable_parameters(single).values():
                p.add_(torch.randn_like(p) * 0.1)
        path = tmp_path / f"{name}.safetensors"
        peftspec.save_adapter(single, path)
        peftspec.load_adapter(model, path, name=name)
    return model


def tail(out, t):
    logits = out.logits if hasattr(out, "logits") else out
    return logits[:, -t:]


@pytest.mark.parametrize("build", [default_model, gpt2], ids=["default", "gpt2"])
@pytest.mark.parametrize("names", [
    ["lora", "dora", None, "rslora", "lora", "adapter"],
    ["prompt_a", None, "prompt_b", "prompt_a"],
    ["lora", "prompt_a", "dora", None],
])
def test_rows_equal_running_each_row_alone(build, names, tmp_path):
    adapters = [n for n in dict.fromkeys(names) if n]
    model = loaded(build, adapters, tmp_path)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (len(names), 7), generator=g)
    with torch.no_grad(), peftspec.rows(model, names):
        together = tail(model(ids), 7)
    assert peftspec.active_adapter(model) == adapters[0]  # restored after the block
    for i, name in enumerate(names):
        with torch.no_grad(), peftspec.using(model, name):
            alone = tail(model(ids[i:i + 1]), 7)
        assert torch.allclose(together[i:i + 1], alone, atol=1e-5), (i, name)


def test_rows_checks_names_and_batch(tmp_path):
    model = loaded(default_model, ["lora"], tmp_path)
    with pytest.raises(peftspec.PeftspecError, match="no adapter named 'x'"):
        with peftspec.rows(model, ["x"]):
            pass
    with pytest.raises(peftspec.PeftspecError, match="given for 2 rows"):
        with peftspec.rows(model, ["lora", None]):
            model(torch.zeros(3, 4, dtype=torch.long))
    assert peftspec.active_adapter(model) == "lora"


def test_rows_train_through_two_adapters(tmp_path):
    """Gradients reach each row's own adapter and no frozen weight."""
    model = loaded(default_model, ["lora", "dora"], tmp_path)
    with peftspec.disabled(model):
        frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(1, 100, (2, 7))
    with peftspec.rows(model, ["lora", "dora"]):
        params = [p for n in ("lora", "dora") for p in
                  peftspec.core.patching.state_of(model).adapters[n].records[0].installed
                  .adapter_params().values()]
        for p in params:
            p.requires_grad_(True)
        model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    with peftspec.disabled(model):
        for n, p in model.named_parameters():
            assert torch.equal(p, frozen[n]) and p.grad is None, n


def _many_loras(build, count, tmp_path, modules):
    """``count`` plain LoRA adapters of one rank with different alphas on ``modules``."""
    model = build()
    for i in range(count):
        single = build()
        torch.manual_seed(100 + i)
        spec = (f'[[reparameterize]]\nmethod = "lora"\nmodules = {modules!r}\nr = 4\n'
                f'alpha = {4 + 3 * i}\n').replace("'", '"')
        peftspec.apply(peftspec.parse_spec(spec), single)
        with torch.no_grad():
            for p in peftspec.trainable_parameters(single).values():
                p.add_(torch.randn_like(p) * 0.1)
        path = tmp_path / f"l{i}.safetensors"
        peftspec.save_adapter(single, path)
        peftspec.load_adapter(model, path, name=f"l{i}")
    return model


@pytest.mark.parametrize("build,modules", [
    (default_model, ["**.q_proj", "**.up_proj"]), (gpt2, ["**.c_attn", "**.c_fc"])],
    ids=["default", "gpt2"])
def test_rows_batched_lora_path(build, modules, tmp_path, monkeypatch):
    """Plain LoRA adapters of one rank take the batched path (two bmm for every row's
    update): outputs equal each row alone, and gradients equal the per-group path's."""
    from peftspec_plugins.lora import LoRALinear

    model = _many_loras(build, 3, tmp_path, modules)
    names = ["l2", None, "l0", "l1", "l0", None]
    calls = []
    real = LoRALinear.add_rows_batched

    def spy(per_row, x, out):
        calls.append(real(per_row, x, out))
        return calls[-1]

    monkeypatch.setattr(LoRALinear, "add_rows_batched", staticmethod(spy))
    ids = torch.randint(1, 100, (len(names), 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), peftspec.rows(model, names):
        together = tail(model(ids), 9)
    assert calls and all(calls), calls  # the batched path ran, at every adapted module
    for i, name in enumerate(names):
        with torch.no_grad(), peftspec.using(model, name):
            alone = tail(model(ids[i:i + 1]), 9)
        assert torch.allclose(together[i:i + 1], alone, atol=1e-5), (i, name)

    def grads(batched):
        monkeypatch.setattr(LoRALinear, "add_rows_batched",
                            staticmethod(real if batched else lambda *a: False))
        params = {f"{n}.{rec.step.target}.{k}": p for n in ("l0", "l1", "l2") for rec in
                  peftspec.core.patching.state_of(model).adapters[n].records
                  for k, p in rec.installed.adapter_params().items()}
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        with peftspec.rows(model, names):
            out = model(ids)
            logits = out.logits if hasattr(out, "logits") else out
            logits.float().square().mean().backward()
        return {k: p.grad.clone() for k, p in params.items()}

    fast, slow = grads(True), grads(False)
    for k in slow:
        assert torch.allclose(fast[k], slow[k], atol=1e-6, rtol=1e-4), k


@pytest.mark.parametrize("name", ["lora", "dora", None])
def test_rows_of_one_adapter_run_its_own_forward(name, tmp_path, monkeypatch):
    """Every row naming one adapter (or the base) runs that module's own forward,
    with no per-row kernels: the output equals using the adapter, bit for bit."""
    from peftspec_plugins.lora import LoRALinear

    model = loaded(default_model, ["lora", "dora"], tmp_path)

    def per_row(*args, **kwargs):
        raise AssertionError("a per-row kernel ran for a batch of one adapter")

    ids = torch.randint(1, 100, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), peftspec.using(model, name):
        alone = tail(model(ids), 7)
    monkeypatch.setattr(LoRALinear, "add_rows_batched", staticmethod(per_row))
    monkeypatch.setattr(LoRALinear, "_add_rows", per_row)
    with torch.no_grad(), peftspec.rows(model, [name] * 3):
        together = tail(model(ids), 7)
    assert torch.equal(together, alone)
