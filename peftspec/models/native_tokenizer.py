"""A tokenizer from a folder's ``tokenizer.json`` without importing transformers.

:class:`HFTokenizer`'s interface over
the ``tokenizers`` library, with the chat template rendered in a jinja2
sandbox configured as transformers configures its own (``trim_blocks``,
``lstrip_blocks``, ``loopcontrols``, its ``tojson``, ``raise_exception`` and
``strftime_now``). ``tests/test_native_tokenizer.py`` checks it against
transformers' tokenizer on arbitrary text (hypothesis). Importing
``tokenizers`` and ``jinja2`` takes ~0.02 s; transformers' tokenizer path
costs ~2 s of imports. Used with :mod:`peftspec.models.native_llama`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
             "mask_token")


def pad_id_of(pad: int | None, eos: int | None) -> int:
    """The id batches are padded with: the tokenizer's padding token, else its
    end of sequence, else 0 (padded positions are masked and never learned)."""
    return pad if pad is not None else eos if eos is not None else 0


def _content(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": ...}
        return value.get("content")
    return value


class NativeTokenizer:
    """``tokenizer.json`` + ``tokenizer_config.json`` (+ ``chat_template.jinja``)."""

    def __init__(self, folder: str | Path):
        import tokenizers

        folder = Path(folder)
        config_file = folder / "tokenizer_config.json"
        self.config = json.loads(config_file.read_text(encoding="utf-8")) \
            if config_file.is_file() else {}
        self.tk = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tk.no_padding()
        self.tk.no_truncation()
        self.special = {k: _content(self.config.get(k)) for k in _SPECIALS
                        if _content(self.config.get(k)) is not None}
        template = folder / "chat_template.jinja"
        self.chat_template = template.read_text(encoding="utf-8") if template.is_file() \
            else self.config.get("chat_template")
        self._compiled = None

    def _id(self, key: str) -> int | None:
        token = self.special.get(key)
        return None if token is None else self.tk.token_to_id(token)

    @property
    def eos_id(self) -> int | None:
        eos = self._id("eos_token")
        return eos if eos is not None else self._id("sep_token")

    @property
    def pad_id(self) -> int:
        return pad_id_of(self._id("pad_token"), self.eos_id)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_sequence(self, text: str, max_length: int) -> list[int]:
        self.tk.enable_truncation(max_length)
        try:
            return self.tk.encode(text, add_special_tokens=True).ids
        finally:
            self.tk.no_truncation()

    def decode(self, ids) -> str:
        return self._clean(self.tk.decode(list(ids), skip_special_tokens=False))

    def decode_clean(self, ids) -> str:
        return self._clean(self.tk.decode(list(ids), skip_special_tokens=True))

    def _clean(self, text: str) -> str:
        if not self.config.get("clean_up_tokenization_spaces", False):
            return text
        # transformers' clean_up_tokenization, character for character
        for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                     (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                     (" 're", "'re")):
            text = text.replace(a, b)
        return text

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._compiled is None:
            self._compiled = _compile(self.chat_template)
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     tools=None, documents=None, **self.special)

    def encode_chat(self, prompt: str) -> list[int]:
        text = self.render_chat([{"role": "user", "content": prompt}])
        return self.encode(text)

    @property
    def end_of_turn(self) -> str | None:
        return self.special.get("eos_token")

    def use_chat_template(self, template: str) -> None:
        self.chat_template, self._compiled = template, None

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tk.encode(text, add_special_tokens=False)
        return enc.ids, list(enc.offsets)


def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    major_minor = tuple(int(x) for x in jinja2.__version__.split(".")[:3] if x.isdigit())
    if major_minor < (3, 1, 6):  # older versions have known sandbox escapes
        raise ImportError(f"chat templates need jinja2 >= 3.1.6, found {jinja2.__version__}")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)
