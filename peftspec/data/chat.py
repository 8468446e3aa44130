"""Conversations into token ids and labels, through the model's own chat template.

A conversation is a list of messages ``{"role": ..., "content": ...}``. It is
rendered once with the tokenizer's chat template (the text that
``peftspec generate`` and a server would feed the model, byte for byte) and
tokenized once, so the ids equal ``apply_chat_template(messages,
tokenize=True)``. Which tokens are scored is found from the text, not by
tokenizing pieces: for the assistant turn ``i``, the template rendered up to
turn ``i`` with the assistant's turn opened (``add_generation_prompt``) is a
prefix of the whole, and the characters from there to the end of the turn's
end-of-turn marker (the tokenizer's end-of-sequence token, ``<|im_end|>`` for
ChatML) are the turn's. A token is scored when its characters overlap a
scored span. A template that renders an earlier turn differently once later
turns follow (some drop a reasoning trace from past turns) breaks the prefix
rule; that is an error naming the record, since no tokens could be said to be
the assistant's, and ``loss_on = "all"`` is the way out.

``loss_on``:

* ``"assistant"`` (the default): every assistant turn, its end-of-turn marker
  included; system, user and tool turns and the template's scaffolding are
  labelled -100 (with TRL's prompt-completion form, only the completion's
  assistant turns);
* ``"last_assistant"``: only the last assistant turn;
* ``"all"``: every token.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftspec.core.errors import PeftspecError

IGNORE = -100
LOSS_ON = ("assistant", "last_assistant", "all")


class ChatTemplateError(PeftspecError):
    """Conversational data and a model without a usable chat template (exit 2)."""

    exit_code = 2


NO_TEMPLATE = ("conversational data needs a chat template, and this model's tokenizer has "
               "none; give one: chat_template = \"path.jinja\" in the spec's "
               "[train_config], or --chat-template FILE")


@dataclass(frozen=True)
class Rendered:
    """A conversation's text and the character spans the loss covers."""

    text: str
    spans: tuple[tuple[int, int], ...]


def _end_of_turn(delta: str, marker: str | None) -> int:
    """Where an assistant turn's scored text ends within ``delta`` (its text
    after the opened turn): after the last end-of-turn marker, else the turn
    without trailing whitespace."""
    if marker:
        k = delta.rfind(marker)
        if k >= 0:
            return k + len(marker)
    return len(delta.rstrip())


def render(tok, messages: list[dict], *, loss_on: str = "assistant", scored_from: int = 0,
           where: str = "") -> Rendered:
    """Render ``messages`` with ``tok``'s chat template and find the scored spans.

    ``scored_from``: the index of the first message that may be scored (TRL's
    prompt-completion form: the completion's first message)."""
    if not getattr(tok, "has_chat_template", False):
        raise ChatTemplateError(f"{where}: {NO_TEMPLATE}" if where else NO_TEMPLATE)
    text = _render(tok, messages, False, where)
    if loss_on == "all":
        return Rendered(text, ((0, len(text)),))
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= scored_from]
    if loss_on == "last_assistant":
        turns = turns[-1:]
    marker = getattr(tok, "end_of_turn", None)
    spans = []
    for i in turns:
        before = _render(tok, messages[:i], True, where) if i else _opened(tok, where)
        after = _render(tok, messages[:i + 1], False, where)
        if not (after.startswith(before) and text.startswith(after)):
            raise ChatTemplateError(
                f"{where}: the chat template renders the conversation up to message {i + 1} "
                "differently once later messages follow, so which tokens are the assistant's "
                "cannot be told; train on every token (loss_on = \"all\") or use a template "
                "that renders each turn the same way whatever follows")
        start = len(before)
        spans.append((start, start + _end_of_turn(after[start:], marker)))
    return Rendered(text, tuple(spans))


def _opened(tok, where: str) -> str:
    try:
        return _render(tok, [], True, where)
    except ChatTemplateError:
        return ""


def _render(tok, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
    try:
        return tok.render_chat(messages, add_generation_prompt=add_generation_prompt)
    except PeftspecError:
        raise
    except Exception as exc:  # noqa: BLE001 - a template's own error is the user's input
        raise ChatTemplateError(f"{where}: the chat template failed on this conversation: "
                                f"{type(exc).__name__}: {exc}") from None


def encode(tok, rendered: Rendered) -> tuple[list[int], list[int]]:
    """Token ids of the rendered text and their labels (-100 outside the spans)."""
    ids, offsets = tok.encode_offsets(rendered.text)
    labels = [IGNORE] * len(ids)
    spans = rendered.spans
    k = 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        if k == len(spans):
            break
        s, e = spans[k]
        if start < e and max(end, start + 1) > s:
            labels[t] = ids[t]
    return ids, labels
