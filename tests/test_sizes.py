"""Sizes are checked before anything is allocated: ranks and virtual tokens at
compile time; an adapter larger than its base or than memory refused by
apply/train/load, with the figure, unless --force."""

from __future__ import annotations

import textwrap

import pytest
from click.testing import CliRunner

import peftspec
from peftspec.cli import cli
from peftspec.core.sizeguard import AdapterTooLarge, check_fits


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def write(tmp_path, body: str, name="s.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


def test_huge_lora_rank_is_a_compile_error_naming_the_bound(tmp_path):
    p = write(tmp_path, """\
        [[reparameterize]]
        method = "lora"
        modules = ["**.q_proj"]
        r = 1000000000
        """)
    assert invoke("check", p).exit_code == 0  # no model: nothing to compare with
    r = invoke("plan", p)
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    # at the line of the option the reason names (r, line 4), not the rule's header
    assert f"{p}:4: reparameterize[0].r: method 'lora' cannot apply to 'blocks.0.attn.q_proj'" \
        in text
    checked = invoke("check", p, "--model", "default")  # with a model: plan's verdict
    assert checked.exit_code == 2 and " ".join(checked.output.split()) == text
    assert "r = 1000000000 exceeds min(in, out) = 128 of this 128x128 module" in text


@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning", "prefix-tuning"])
def test_virtual_tokens_beyond_the_context_are_a_compile_error(method, tmp_path):
    p = write(tmp_path, f"""\
        [prefix]
        method = "{method}"
        tokens = 100000000000
        """)
    r = invoke("plan", p)
    assert r.exit_code == 2, r.output
    assert "tokens = 100000000000 leaves no room for input in this model's context of 256 " \
           "positions" in " ".join(r.output.split())


BIG = """\
    [[augment]]
    method = "bottleneck"
    after = ["**.mlp"]
    size = {size}
    """


def test_adapter_larger_than_the_base_is_refused_before_allocating(tmp_path):
    p = write(tmp_path, BIG.format(size=1_000_000_000))  # 2*128*1e9 parameters per site
    r = invoke("plan", p)  # plan changes nothing: it prints the size, and a warning
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "adapter size: 3829.6 GiB" in text
    assert "warning: apply and train refuse this: the adapter would add" in text
    out = tmp_path / "a.safetensors"
    out.write_bytes(b"previous")
    r = invoke("apply", p, "--out", out)
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "the adapter would add 1,028,000,000,512 parameters (3,829.6 GiB), more than the " \
           "base model's 859,008" in text and "--force" in text
    assert out.read_bytes() == b"previous"
    r = invoke("train", p, "--out", out, "--data", "data/harbour.txt", "--steps", "1")
    assert r.exit_code == 2 and "more than the base model's" in r.output


def test_force_lets_a_large_but_possible_adapter_through(tmp_path, monkeypatch):
    import peftspec.core.sizeguard as guard

    monkeypatch.setattr(guard, "MIN_REFUSED_BYTES", 1 << 20)  # not 64 MiB: a small test
    p = write(tmp_path, BIG.format(size=1024))  # 4 sites x ~263k parameters > 859k
    out = tmp_path / "a.safetensors"
    assert invoke("apply", p, "--out", out).exit_code == 2
    r = invoke("apply", p, "--out", out, "--force")
    assert r.exit_code == 0, r.output
    model = peftspec.load_model(None)
    with pytest.raises(AdapterTooLarge):  # a file cannot lift the check either
        peftspec.load_adapter(model, out)
    assert not peftspec.is_patched(model)
    peftspec.load_adapter(model, out, force=True)


def _plan(size: int):
    spec = peftspec.parse_spec(textwrap.dedent(BIG.format(size=size)), file="s.toml")
    return peftspec.compile_plan(spec, peftspec.load_model(None))


def test_tiny_adapters_larger_than_a_tiny_base_pass():
    """Below MIN_REFUSED_BYTES nothing is refused: toy models take big adapters."""
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 6))
    spec = peftspec.parse_spec('[[augment]]\nmethod = "bottleneck"\nafter = ["0", "1"]\n'
                               'size = 64\n')
    peftspec.apply(spec, model)
    assert sum(p.numel() for p in peftspec.adapter_params(model).values()) > 72


def test_memory_check_names_need_and_available():
    plan = _plan(16)  # small beside the base
    check_fits(plan, available=10**12)
    need = sum(s.bytes_added for s in plan.steps)
    with pytest.raises(AdapterTooLarge) as exc:
        check_fits(plan, available=need - 1)
    assert f"it allocates 0.1 MiB ({need:,} bytes), 0.1 MiB is available (spec s.toml)" \
        in str(exc.value)
    with pytest.raises(AdapterTooLarge) as exc:  # gradients and AdamW states count too
        check_fits(plan, available=need * 2, training=True)
    assert f"training it needs 0.3 MiB ({need * 4:,} bytes)" in str(exc.value)
    check_fits(plan, available=1, force=True)


def test_apply_checks_memory_before_touching_the_model(monkeypatch):
    import peftspec.core.sizeguard as guard

    monkeypatch.setattr(guard, "available_memory", lambda: 1000)
    model = peftspec.load_model(None)
    spec = peftspec.parse_spec(textwrap.dedent(BIG.format(size=16)), file="s.toml")
    with pytest.raises(AdapterTooLarge, match="would not fit in memory"):
        peftspec.apply(spec, model)
    assert not peftspec.is_patched(model)


def test_available_memory_is_read():
    from peftspec.core.sizeguard import available_memory

    free = available_memory()
    assert free is None or free > 0
