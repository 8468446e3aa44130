"""One record of training data, validated: :class:`Example`.

The record shapes (keys, whatever the file format):

* ``{"messages": [{"role", "content"}, ...]}``: a conversation (roles
  ``system``, ``user``, ``assistant``, ``tool``; ``name``, ``tool_calls`` and
  ``tool_call_id`` pass through to the template), the format of TRL, axolotl
  and most published instruction datasets; other keys of the record are
  ignored (published sets carry ids and sources beside the messages);
* ``{"prompt": [...], "completion": [...]}`` with lists of messages: TRL's
  conversational prompt-completion form (only the completion is scored);
* ``{"prompt": str, "completion": str}``: one user turn and the answer (with a
  chat template, rendered as the conversation of those two turns);
* ``{"text": str}``: language modelling, every token scored;
* ``{"text": str, "label": int | str}``: sequence classification.

Outside ``messages`` records an unknown key is an error (a misspelt
``"completon"`` would otherwise train on nothing). :func:`parse` raises
:class:`DataError` naming the record's place (``FILE:LINE``, or ``FILE row N``
for a table) and what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftspec.core.errors import PeftspecError

ROLES = ("system", "user", "assistant", "tool")
PASS_THROUGH = ("name", "tool_calls", "tool_call_id")


class DataError(PeftspecError):
    """A data file is missing or malformed (exit code 2)."""

    exit_code = 2


@dataclass(frozen=True)
class Example:
    """One record: ``text`` alone, ``prompt`` + ``completion``, ``text`` +
    ``label``, or a conversation, ``messages`` (scored from message
    ``scored_from`` on: the completion of TRL's prompt-completion form)."""

    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    where: str = ""
    label: str | int | None = None
    messages: tuple[dict, ...] | None = None
    scored_from: int = 0

    @property
    def kind(self) -> str:
        """``"classification"`` or ``"language modelling"``."""
        return "classification" if self.label is not None else "language modelling"

    @property
    def shape(self) -> str:
        """The record's form, as ``data inspect`` reports it."""
        if self.messages is not None:
            return "conversational prompt-completion" if self.scored_from else "messages"
        if self.label is not None:
            return "text + label"
        return "text" if self.text is not None else "prompt-completion"

    def conversation(self) -> list[dict]:
        """The messages to render: ``messages``, or a prompt-completion record
        as a user turn and an assistant turn."""
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.prompt},
                {"role": "assistant", "content": self.completion}]


def parse(obj, where: str) -> Example:
    """The :class:`Example` of one decoded record, else a :class:`DataError`."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = _messages(obj["messages"], where, "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: the conversation has no assistant turn, so nothing to "
                            "learn from (give the answers as role \"assistant\")")
        return Example(messages=messages, where=where)
    if isinstance(obj.get("prompt"), list) or isinstance(obj.get("completion"), list):
        return _conversational_pc(obj, where)
    has_text, has_pc = "text" in obj, ("prompt" in obj or "completion" in obj)
    if has_text and has_pc:
        raise DataError(f"{where}: give either 'text' or 'prompt' and 'completion', not both")
    if "label" in obj:
        _check_label(obj, where, has_pc)
    keys = ("text",) if has_text else ("prompt", "completion")
    if not has_text and not has_pc:
        raise DataError(f"{where}: expected a 'text' key, 'prompt' and 'completion' keys, or "
                        f"'messages' (got {', '.join(map(repr, obj)) or 'no keys'})")
    for key in keys:
        if key not in obj:
            raise DataError(f"{where}: missing key '{key}'")
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: '{key}' must be a string, got {obj[key]!r:.40}")
    extra = sorted(set(obj) - set(keys) - {"label"})
    if extra:
        raise DataError(f"{where}: unknown key(s) {', '.join(map(repr, extra))}")
    return Example(**{k: obj[k] for k in keys}, where=where, label=obj.get("label"))


def _check_label(obj: dict, where: str, has_pc: bool) -> None:
    if has_pc:
        raise DataError(f"{where}: a classification record is {{\"text\", \"label\"}}; "
                        "'label' does not go with 'prompt' and 'completion'")
    label = obj["label"]
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise DataError(f"{where}: 'label' must be an integer class id or a string, got "
                        f"{label!r:.40}")
    if isinstance(label, int) and label < 0:
        raise DataError(f"{where}: 'label' {label} is negative; integer labels are class "
                        "ids 0, 1, 2, ...")
    if isinstance(label, str) and not label:
        raise DataError(f"{where}: 'label' is an empty string")


def _conversational_pc(obj: dict, where: str) -> Example:
    for key in ("prompt", "completion"):
        if key not in obj:
            raise DataError(f"{where}: missing key '{key}' (a conversational prompt-completion "
                            "record has both, each a list of messages)")
    extra = sorted(set(obj) - {"prompt", "completion"})
    if extra:
        raise DataError(f"{where}: unknown key(s) {', '.join(map(repr, extra))}")
    prompt = _messages(obj["prompt"], where, "prompt")
    completion = _messages(obj["completion"], where, "completion")
    if not any(m["role"] == "assistant" for m in completion):
        raise DataError(f"{where}: the completion has no assistant turn, so nothing to learn "
                        "from")
    return Example(messages=prompt + completion, scored_from=len(prompt), where=where)


def _messages(value, where: str, key: str) -> tuple[dict, ...]:
    if not isinstance(value, list):
        raise DataError(f"{where}: '{key}' must be a list of messages, got {value!r:.40}")
    if not value:
        raise DataError(f"{where}: '{key}' is an empty list")
    out = []
    for n, m in enumerate(value, start=1):
        at = f"{where}: {key}[{n}]"
        if not isinstance(m, dict):
            raise DataError(f"{at}: a message is an object {{\"role\", \"content\"}}, got "
                            f"{m!r:.40}")
        if "role" not in m:
            raise DataError(f"{at}: missing 'role' (one of {', '.join(ROLES)})")
        if m["role"] not in ROLES:
            raise DataError(f"{at}: unknown role {m['role']!r:.40}; roles are "
                            f"{', '.join(ROLES)}")
        if "content" not in m:
            raise DataError(f"{at}: missing 'content'")
        if not isinstance(m["content"], str):
            raise DataError(f"{at}: 'content' must be a string, got {m['content']!r:.40}")
        extra = sorted(set(m) - {"role", "content"} - set(PASS_THROUGH))
        if extra:
            raise DataError(f"{at}: unknown key(s) {', '.join(map(repr, extra))} in a message")
        out.append({k: m[k] for k in m if m[k] is not None or k == "content"})
    return tuple(out)
