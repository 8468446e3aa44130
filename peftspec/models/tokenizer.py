"""Tokenizers for training: bytes for the built-in model, a transformers
directory's own tokenizer for ``hf:`` models.

A tokenizer here is anything with ``encode(text) -> list[int]``,
``encode_sequence(text, max_length) -> list[int]`` (for classification), an
``eos_id`` (appended after each example; ``None`` for none) and a
``pad_id`` (used for padding; padded positions are masked and never scored).
"""

from __future__ import annotations

from dataclasses import dataclass
from peftspec.core.errors import ModelSourceError
from peftspec.models.hf import hf_folder
from peftspec.models.native import folder_of_model
from peftspec.models.native_tokenizer import NativeTokenizer, pad_id_of  # noqa: F401 (re-exported)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-text as 256: the default model's vocabulary.

    Any text round-trips, nothing is downloaded, and the vocabulary is the
    default model's 257 entries (:class:`peftspec.models.nanogpt.GPTConfig`).
    """

    vocab_size = 257
    eos_id = 256
    pad_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_sequence(self, text: str, max_length: int) -> list[int]:
        """Ids for a sequence classifier: the bytes, cut to fit, then end-of-text
        (the default classifier reads the last position)."""
        return self.encode(text)[:max_length - 1] + [self.eos_id]

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    decode_clean = decode  # end-of-text is not a byte: decode drops it already
    has_chat_template = False


@dataclass
class HFTokenizer:
    """A transformers tokenizer, loaded from the model's own directory (offline)."""

    tok: object

    @property
    def eos_id(self) -> int | None:
        return self.tok.eos_token_id if self.tok.eos_token_id is not None \
            else self.tok.sep_token_id

    @property
    def pad_id(self) -> int:
        return pad_id_of(self.tok.pad_token_id, self.eos_id)

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def encode_sequence(self, text: str, max_length: int) -> list[int]:
        """Ids for a sequence classifier: the tokenizer's own special tokens
        (BERT's ``[CLS] ... [SEP]``; none for GPT-2), truncated keeping them."""
        return list(self.tok(text, add_special_tokens=True, truncation=True,
                             max_length=max_length)["input_ids"])

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    def decode_clean(self, ids) -> str:
        """Text without special tokens (an answer, for people)."""
        return self.tok.decode(list(ids), skip_special_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    def encode_chat(self, prompt: str) -> list[int]:
        """``prompt`` as one user turn of the chat template, the assistant's
        turn opened: what an instruct model answers after. Training formats
        prompt/completion records this way, and generation starts from it."""
        text = self.tok.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, tokenize=False)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])


def tokenizer_for(source: str | None, model) -> ByteTokenizer | HFTokenizer:
    """The tokenizer to train ``model`` (loaded from ``source``) with.

    * a model built without transformers (:mod:`peftspec.models.native`): the
      same folder's tokenizer through ``tokenizers`` (:class:`NativeTokenizer`);
    * a source with a transformers folder (``hf:PATH``; ``gguf:PATH`` and
      ``smollm2``, whose cache folder holds the GGUF file's tokenizer): the
      folder's tokenizer (``AutoTokenizer``, local files only);
    * the default model, or any model whose input embedding has at least 257
      rows: :class:`ByteTokenizer`.
    """
    native = folder_of_model(model)
    if native is not None:  # built without transformers: so is its tokenizer
        return NativeTokenizer(native)
    path = hf_folder(source)
    if path is not None:
        try:
            from transformers import AutoTokenizer
        except ImportError:  # pragma: no cover - load_hf already needs it
            raise ModelSourceError("hf: models need transformers: pip install "
                                   "'peftspec[hf]'") from None
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - a missing or broken tokenizer is bad input
            raise ModelSourceError(f"'{source}' has no usable tokenizer to train with: "
                                   f"{exc}") from None
        return HFTokenizer(tok)
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    rows = getattr(emb, "num_embeddings", None)
    if rows is not None and rows < ByteTokenizer.vocab_size:
        raise ModelSourceError(f"the model's input embedding has {rows} rows; the byte-level "
                               f"tokenizer needs {ByteTokenizer.vocab_size} (train hf: models "
                               "with their own tokenizer)")
    return ByteTokenizer()
