"""``peftspec combine``: each method against the update computed densely here.

The reference never looks at the combined factors' construction: an input's
update is what peftspec's own merge writes into the weights (merged minus base
weight), the combined update likewise, and the methods' definitions (sum,
best rank-R approximation, TIES, DARE) are written out densely below.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

import peftspec
from peftspec.cli import cli
from peftspec.merging.combine import CombineError, combine
from peftspec.merging.combine_math import dare_mask, factored_low_rank
from peftspec.core.safetensors_io import serialize
from toymodels import ToyConfig, ToyNet

CFG = ToyConfig(d=8, hidden=12, n_blocks=2, vocab=11)
LINEARS = ("blocks.0.attn.q", "blocks.0.attn.o", "blocks.1.attn.q", "blocks.1.attn.o",
           "blocks.0.mlp.0", "blocks.1.mlp.2")


def base() -> ToyNet:
    return ToyNet(CFG).eval()


def lora(modules, r, alpha, rslora=False, extra="") -> str:
    mods = ", ".join(f'"{m}"' for m in modules)
    return textwrap.dedent(f"""\
        [[reparameterize]]
        method = "lora"
        modules = [{mods}]
        r = {r}
        alpha = {alpha}
        rslora = {"true" if rslora else "false"}
        """) + extra


def make(path, text, seed, cfg=CFG):
    """An adapter file of ``text`` on the toy base with random (non-zero) factors."""
    model = ToyNet(cfg).eval()
    peftspec.apply(peftspec.parse_spec(text), model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftspec.trainable_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    peftspec.save_adapter(model, path)
    return path


def weights_of(path=None) -> dict[str, torch.Tensor]:
    """Every weight of the base, with the adapter at ``path`` merged (float64)."""
    model = base()
    if path is not None:
        peftspec.load_adapter(model, path)
        model = peftspec.merge(model)
    return {n: p.detach().double() for n, p in model.named_parameters()}


def deltas(path) -> dict[str, torch.Tensor]:
    """The update each module's weight gets from the adapter (in the weight's layout)."""
    plain, merged = weights_of(), weights_of(path)
    return {n[: -len(".weight")]: merged[n] - plain[n] for n in plain
            if n.endswith(".weight") and not torch.equal(merged[n], plain[n])}


def best_rank(m: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two adapters of different ranks, scales (one rsLoRA) and overlapping targets,
    one of them with an embedding LoRA."""
    d = tmp_path_factory.mktemp("combine")
    a = make(d / "a.safetensors", lora(LINEARS[:4], 2, 4), seed=1)
    b = make(d / "b.safetensors", lora(LINEARS[2:], 3, 5, rslora=True) +
             lora(["emb"], 2, 3), seed=2)
    return a, b, deltas(a), deltas(b)


def expected_sum(da, db, wa, wb):
    return {t: wa * da.get(t, 0) + wb * db.get(t, 0) for t in set(da) | set(db)}


def assert_deltas(got: dict, want: dict, atol=1e-5):
    """Equal updates; a module missing on one side has a zero update there."""
    for t in set(got) | set(want):
        g = got.get(t, torch.zeros_like(want.get(t, got.get(t))))
        w = want.get(t, torch.zeros_like(g))
        w = w if isinstance(w, torch.Tensor) else torch.zeros_like(g)
        assert torch.allclose(g, w, atol=atol, rtol=1e-5), (t, (g - w).abs().max())


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_linear_and_cat_are_the_exact_weighted_sum(pair, tmp_path, method):
    a, b, da, db = pair
    out = tmp_path / "c.safetensors"
    summary = peftspec.combine([a, b], [0.7, -0.3], method=method, out=out)
    assert summary["targets"] == len(set(da) | set(db)) == 7  # the union, embedding included
    assert summary["max_truncation_error"] < 1e-6
    assert_deltas(deltas(out), expected_sum(da, db, 0.7, -0.3))
    ranks = {int(r) for r in summary["ranks"]}
    assert ranks == ({2, 3, 5} if method == "cat" else {2, 3, 5}), summary["ranks"]


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_svd_is_the_best_rank_r_approximation(pair, tmp_path, rank):
    a, b, da, db = pair
    out = tmp_path / "c.safetensors"
    summary = combine([a, b], [1.0, 0.5], method="svd", rank=rank, out=out)
    want = {t: best_rank(m, rank) for t, m in expected_sum(da, db, 1.0, 0.5).items()}
    assert_deltas(deltas(out), want)
    assert summary["max_truncation_error"] > 0  # rank 1..4 < the sums' ranks somewhere


def test_svd_defaults_to_the_largest_input_rank_and_linear_to_the_sum(pair, tmp_path):
    a, b, *_ = pair
    s = combine([a, b], [1, 1], method="svd", out=tmp_path / "s.safetensors")
    assert set(s["ranks"]) == {"2", "3"}   # max(2, 3) where both adapt, else the one's
    s = combine([a, b], [1, 1], method="linear", rank=100, out=tmp_path / "l.safetensors")
    assert set(s["ranks"]) == {"2", "3", "5"}  # capped at Σ rᵢ, the sum's largest rank
    s = combine([a, b], [1, 1], method="ties", density=0.5, rank=100,
                out=tmp_path / "t.safetensors")
    assert set(s["ranks"]) == {"8"}  # dense: capped at min(out, in) = 8 (all modules here)


def ties_dense(tasks, weights, density, sign="total"):
    """TIES as HF PEFT's merge_utils.ties defines it, written out by hand."""
    pruned = []
    for t in tasks:
        k = int(density * t.numel())
        flat = t.reshape(-1)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.abs().argsort(descending=True)[:k]] = True
        pruned.append(torch.where(keep.reshape(t.shape), t, torch.zeros_like(t)))
    stack = torch.stack(pruned)
    votes = stack.sum(0) if sign == "total" else stack.sign().sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0).double()
    total = torch.zeros_like(stack[0])
    count = torch.zeros_like(stack[0])
    for w, t in zip(weights, pruned):
        agree = t.sign() == elected
        total += torch.where(agree, w * t, torch.zeros_like(t))
        count += agree.double()
    return total / count.clamp(min=1)


def layout(target, m):
    """A (out, in) update in the weight's layout (the embedding stores (num, dim))."""
    return m.t() if target == "emb" else m


@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_is_the_dense_definition_then_rank_r(pair, tmp_path, sign):
    a, b, da, db = pair
    out = tmp_path / "c.safetensors"
    combine([a, b], [0.8, 0.6], method="ties", density=0.4, rank=3, majority_sign=sign,
            out=out)
    want = {}
    for t in set(da) | set(db):
        tasks = [layout(t, d[t]) for d in (da, db) if t in d]
        ws = [w for w, d in ((0.8, da), (0.6, db)) if t in d]
        want[t] = layout(t, best_rank(ties_dense(tasks, ws, 0.4, sign), 3))
    assert_deltas(deltas(out), want, atol=2e-5)


def test_ties_agrees_with_hf_peft_merge_utils_on_dense_tensors():
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    from peftspec.merging.combine_math import Term, dense_combination

    gen = torch.Generator().manual_seed(0)
    terms = [Term(i, w, s, torch.randn(r, 9, generator=gen), torch.randn(7, r, generator=gen))
             for i, (w, s, r) in enumerate([(0.7, 2.0, 2), (0.4, 0.5, 3), (-0.2, 1.0, 1)])]
    ours = dense_combination(terms, "ties", density=0.3, seed=0, target="x",
                             dtype=torch.float64)
    theirs = merge_utils.ties([t.delta(torch.float64) for t in terms],
                              torch.tensor([t.weight for t in terms], dtype=torch.float64),
                              0.3, "total")
    assert torch.allclose(ours, theirs, atol=1e-12)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_the_seeded_dense_definition_and_reproducible(pair, tmp_path, method):
    a, b, da, db = pair
    c1, c2, c3 = (tmp_path / f"c{i}.safetensors" for i in range(3))
    combine([a, b], [1.0, 0.5], method=method, density=0.5, rank=8, seed=7, out=c1)
    combine([a, b], [1.0, 0.5], method=method, density=0.5, rank=8, seed=7, out=c2)
    combine([a, b], [1.0, 0.5], method=method, density=0.5, rank=8, seed=8, out=c3)
    assert c1.read_bytes() == c2.read_bytes()
    assert c1.read_bytes() != c3.read_bytes()
    want = {}
    for t in set(da) | set(db):
        tasks, ws = [], []
        for i, (w, d) in enumerate(((1.0, da), (0.5, db))):
            if t in d:
                m = layout(t, d[t])
                tasks.append(m * dare_mask(tuple(m.shape), 0.5, 7, t, i) / 0.5)
                ws.append(w)
        if method == "dare_linear":
            dense = sum(w * m for w, m in zip(ws, tasks))
        else:
            dense = ties_dense(tasks, ws, 1.0)
        want[t] = layout(t, dense)  # rank 8 = min(out, in): no truncation
    assert_deltas(deltas(c1), want, atol=2e-5)


def test_dare_mask_keeps_the_density_and_depends_on_seed_index_target():
    m = dare_mask((200, 300), 0.3, 0, "a", 0)
    assert m.dtype == torch.bool and abs(m.float().mean().item() - 0.3) < 0.01
    assert torch.equal(m, dare_mask((200, 300), 0.3, 0, "a", 0))
    for other in (dare_mask((200, 300), 0.3, 1, "a", 0), dare_mask((200, 300), 0.3, 0, "b", 0),
                  dare_mask((200, 300), 0.3, 0, "a", 1)):
        assert not torch.equal(m, other)


@settings(max_examples=15)
@given(out_dim=st.integers(1, 9), in_dim=st.integers(1, 9), k=st.integers(1, 12),
       rank=st.integers(1, 12), seed=st.integers(0, 2 ** 16))
def test_factored_svd_equals_the_dense_svd(out_dim, in_dim, k, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(out_dim, k, generator=gen, dtype=torch.float64)
    a = torch.randn(k, in_dim, generator=gen, dtype=torch.float64)
    rank = min(rank, out_dim, in_dim)
    res = factored_low_rank(b, a, rank, torch.float64)
    got = res.B @ res.A
    want = best_rank(b @ a, rank)
    # equal up to rounding, unless the rank-th and next singular values tie (then
    # the best approximation is not unique: compare the error instead)
    err_got = torch.linalg.norm(b @ a - got)
    err_want = torch.linalg.norm(b @ a - want)
    assert torch.isclose(err_got, err_want, atol=1e-9, rtol=1e-9)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    a = make(d / "a.safetensors", lora(LINEARS[:2], 2, 6, rslora=True), seed=3)
    return a, deltas(a)


@settings(max_examples=8)
@given(method=st.sampled_from(["linear", "cat", "svd"]))
def test_one_adapter_with_weight_one_is_that_adapter(single, tmp_path_factory, method):
    a, da = single
    out = tmp_path_factory.mktemp("one") / "c.safetensors"
    combine([a], [1.0], method=method, out=out)
    assert_deltas(deltas(out), da)


@settings(max_examples=10)
@given(wa=st.floats(-3, 3, allow_nan=False), wb=st.floats(-3, 3, allow_nan=False))
def test_cat_is_exact_for_any_weights(pair, tmp_path_factory, wa, wb):
    a, b, da, db = pair
    out = tmp_path_factory.mktemp("cat") / "c.safetensors"
    combine([a, b], [wa, wb], method="cat", out=out)
    assert_deltas(deltas(out), expected_sum(da, db, wa, wb), atol=2e-5)


def test_the_result_is_an_ordinary_adapter_file(pair, tmp_path):
    a, b, *_ = pair
    out = tmp_path / "c.safetensors"
    combine([a, b], [0.5, 0.5], method="svd", out=out)
    meta = peftspec.formats.adapter_file.read_metadata(out)
    assert json.loads(meta["combine"])["method"] == "svd"
    assert meta["base_digest"] == peftspec.formats.adapter_file.read_metadata(a)["base_digest"]
    model = base()
    peftspec.load_adapter(model, out)
    x = torch.tensor([[1, 2, 3, 4]])
    y = model(x)
    peftspec.save_adapter(model, tmp_path / "again.safetensors")  # the same tensors back
    from safetensors.torch import load_file
    first, again = load_file(out), load_file(tmp_path / "again.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    peftspec.remove(model)
    peftspec.load_adapter(model, tmp_path / "again.safetensors")
    assert torch.equal(model(x), y)
    hf = peftspec.export_hf_peft(out, tmp_path / "hf")  # HF PEFT's format, no model needed
    assert json.loads((hf / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_a_model_resolves_and_checks_the_inputs(pair, tmp_path):
    a, b, da, db = pair
    out = tmp_path / "c.safetensors"
    combine([a, b], [1, 1], method="cat", out=out, model=base())
    assert_deltas(deltas(out), expected_sum(da, db, 1, 1))
    other = ToyNet(ToyConfig(d=6, hidden=12, n_blocks=2, vocab=11))
    with pytest.raises(CombineError, match="another base"):
        combine([a], [1], method="cat", out=out, model=other)


# --- refusals: each names the file and rule ----------------------------------------

def test_refuses_another_base(pair, tmp_path):
    a, *_ = pair
    other = make(tmp_path / "o.safetensors", lora(LINEARS[:1], 2, 2), seed=4,
                 cfg=ToyConfig(d=6, hidden=12, n_blocks=2, vocab=11))
    with pytest.raises(CombineError, match=r"o\.safetensors was made for another base "
                                           r"model than .*a\.safetensors"):
        combine([a, other], [1, 1], method="linear", out=tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize("text, words", [
    (lora(LINEARS[:1], 2, 2, extra="dora = true\n"),
     ["reparameterize[0] (line 1 of its embedded spec) is DoRA"]),
    ('[[augment]]\nmethod = "bottleneck"\nafter = ["blocks.0.mlp"]\nsize = 2\n',
     ["augment[0] (line 1 of its embedded spec) is method 'bottleneck'", "only LoRA"]),
    (lora(LINEARS[:1], 2, 2) + '[[train]]\nparams = ["**.bias"]\n',
     ["train[0] (line 7 of its embedded spec) is method 'select'"]),
])
def test_refuses_what_is_not_plain_lora(pair, tmp_path, text, words):
    a, *_ = pair
    bad = make(tmp_path / "bad.safetensors", text, seed=5)
    with pytest.raises(CombineError) as exc:
        combine([a, bad], [1, 1], method="linear", out=tmp_path / "c.safetensors")
    assert f"{bad}: " in str(exc.value)
    for w in words:
        assert w in str(exc.value)


@pytest.mark.parametrize("kwargs, words", [
    (dict(weights=[1.0]), r"1 weight\(s\) for 2 adapter"),
    (dict(weights=[1.0, float("nan")]), "finite"),
    (dict(method="ties"), "needs --density"),
    (dict(method="dare_ties", density=1.5), r"must be in \(0, 1\]"),
    (dict(density=0.5), "--density applies to"),
    (dict(method="cat", rank=2), "--rank does not apply to cat"),
    (dict(rank=0), "at least 1"),
    (dict(method="mean"), "unknown combine method"),
    (dict(majority_sign="vote"), "majority sign"),
])
def test_refuses_bad_options(pair, tmp_path, kwargs, words):
    a, b, *_ = pair
    args = dict(weights=[1.0, 1.0], method="linear") | kwargs
    with pytest.raises(CombineError, match=words):
        combine([a, b], args.pop("weights"), out=tmp_path / "c.safetensors", **args)


def test_cat_refuses_a_rank_above_the_module_and_linear_is_exact_there(tmp_path):
    text = lora(["blocks.0.attn.q"], 6, 6)
    a, b = (make(tmp_path / f"{n}.safetensors", text, seed=s) for n, s in (("a", 1), ("b", 2)))
    with pytest.raises(CombineError, match=r"'blocks.0.attn.q': cat gives rank 12"):
        combine([a, b], [1, 1], method="cat", out=tmp_path / "c.safetensors")
    combine([a, b], [1, 1], method="linear", out=tmp_path / "c.safetensors")
    assert_deltas(deltas(tmp_path / "c.safetensors"),
                  expected_sum(deltas(a), deltas(b), 1, 1))


def test_refuses_damaged_inputs(pair, tmp_path):
    a, *_ = pair
    from safetensors import safe_open

    with safe_open(str(a), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith("lora_A"))
    bad = dict(tensors)
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("inf")
    (tmp_path / "inf.safetensors").write_bytes(serialize(bad, meta))
    with pytest.raises(CombineError, match="inf.safetensors: tensor .* not finite"):
        combine([tmp_path / "inf.safetensors"], [1], method="cat", out=tmp_path / "c.safetensors")
    extra = dict(tensors, stray=torch.zeros(2))
    (tmp_path / "extra.safetensors").write_bytes(serialize(extra, meta))
    with pytest.raises(CombineError, match="tensors no LoRA rule owns: stray"):
        combine([tmp_path / "extra.safetensors"], [1], method="cat",
                out=tmp_path / "c.safetensors")
    with pytest.raises(peftspec.AdapterFileError, match="no such adapter file"):
        combine([tmp_path / "missing.safetensors"], [1], method="cat",
                out=tmp_path / "c.safetensors")


# --- the command line --------------------------------------------------------------

def test_cli_combine_end_to_end(pair, tmp_path):
    from test_cli import run  # a real process, as every command's end-to-end test

    a, b, da, db = pair
    out = tmp_path / "c.safetensors"
    r = run("combine", a, b, "--weights", "0.7,0.3", "--method", "cat", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "7 modules" in r.stdout
    assert_deltas(deltas(out), expected_sum(da, db, 0.7, 0.3))
    r = CliRunner().invoke(cli, ["combine", str(a), str(b), "-w", "1,1", "--method", "ties",
                                 "--density", "0.3", "--rank", "2", "--out", str(out),
                                 "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["ranks"] == {"2": 7}
    for args, words in ((["-w", "1", "--method", "svd"], "1 weight(s) for 2"),
                        (["-w", "1,x", "--method", "svd"], "comma-separated numbers"),
                        (["-w", "1,1", "--method", "ties"], "needs --density")):
        r = CliRunner().invoke(cli, ["combine", str(a), str(b), *args, "--out", str(out)])
        assert r.exit_code == 2 and words in r.output, r.output
