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
    end_of_turn = None

    def use_chat_template(self, template: str) -> None:
        raise ModelSourceError("the built-in byte-level model has no chat template and takes "
                               "none; train conversations on an hf:, gguf: or smollm2 model")

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, offsets = [], []
        for i, ch in enumerate(text):
            for b in ch.encode("utf-8"):
                ids.append(b)
                offsets.append((i, i + 1))
        return ids, offsets


@dataclass
class HFTokenizer:
    """A transformers tokenizer, loaded from the model's own directory (offline)."""

    tok: object
    chat_template: str | None = None  # a template that replaces the tokenizer's own

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
        return bool(self.chat_template or getattr(self.tok, "chat_template", None))

    @property
    def end_of_turn(self) -> str | None:
        """The text that ends an assistant turn (the end-of-sequence token)."""
        return self.tok.eos_token

    def use_chat_template(self, template: str) -> None:
        """Render conversations with ``template`` (jinja) instead of the tokenizer's."""
        self.chat_template = template

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template's text of ``messages`` (``apply_chat_template``,
        untokenized)."""
        return self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                            tokenize=False, chat_template=self.chat_template)

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` and each token's character span in it."""
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def encode_chat(self, prompt: str) -> list[int]:
        """``prompt`` as one user turn of the chat template, the assistant's
        turn opened: what an instruct model answers after, and where
        generation starts."""
        text = self.render_chat([{"role": "user", "content": prompt}])
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
        return _transformers_tokenizer(source, path)
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    rows = getattr(emb, "num_embeddings", None)
    if rows is not None and rows < ByteTokenizer.vocab_size:
        raise ModelSourceError(f"the model's input embedding has {rows} rows; the byte-level "
                               f"tokenizer needs {ByteTokenizer.vocab_size} (train hf: models "
                               "with their own tokenizer)")
    return ByteTokenizer()


def tokenizer_of_source(source: str | None) -> ByteTokenizer | HFTokenizer | NativeTokenizer:
    """The tokenizer a causal-LM run on ``source`` trains with, without loading
    the model's weights (``peftspec data inspect``): the byte-level one for the
    built-in model; for ``smollm2`` and ``gguf:`` the cache folder's
    ``tokenizer.json`` as the native training path reads it; for ``hf:`` the
    folder's transformers tokenizer."""
    prefix = (source or "").partition(":")[0]
    if source and (source == "smollm2" or prefix == "gguf"):
        folder = hf_folder(source)
        if folder is not None and (folder / "tokenizer.json").is_file():
            return NativeTokenizer(folder)
    if source in (None, "", "default"):
        return ByteTokenizer()
    path = hf_folder(source)
    if path is None:
        raise ModelSourceError(f"'{source}': no tokenizer can be read without loading the "
                               "model; give an hf:, gguf: or smollm2 model")
    return _transformers_tokenizer(source, path)


def _transformers_tokenizer(source: str, path) -> HFTokenizer:
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
