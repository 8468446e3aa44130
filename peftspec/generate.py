"""Text generation with a base model and any number of adapters side by side.

``peftspec generate`` is a thin command over this module; Python users call
:func:`load` and :func:`generate`::

    from peftspec.generate import generate, load

    session = load("smollm2", ["town.safetensors"])        # base + one adapter
    for a in generate(session.model, session.tokenizer, ["Where is Brindlecombe?"],
                      adapters=[None, *session.names]):    # None: the base model
        print(a.adapter or "base", a.text)

How it runs:

* Prompts go through the tokenizer's chat template when it has one (as one
  user turn, with the assistant's turn opened), as ``peftspec train`` formats
  prompt/completion records, so an adapter sees at generation what it saw in
  training; ``chat=False`` feeds the raw text.
* Greedy by default; ``temperature > 0`` samples (with ``top_p``), seeded.
* Every (prompt, adapter) pair is one row. Rows of the base and of adapters
  that support per-row batching (LoRA, rsLoRA, DoRA, bottleneck, IA3; see
  :func:`peftspec.rows`) run in one left-padded batch; an adapter that does
  not (soft prompts, ``[[train]]`` picks) runs in its own pass with
  :func:`peftspec.use`. The result is the same either way, up to float
  rounding.
* transformers models (``hf:``, ``gguf:``, ``smollm2``, merged folders)
  decode with transformers' ``generate()``, stopping at the end-of-turn
  token; other models (the built-in one) with their own greedy
  ``generate(input_ids, max_new_tokens, attention_mask)``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from peftspec.core.errors import PeftspecError
from peftspec.data import reading
from peftspec.data.chat import NO_TEMPLATE
from peftspec.data.examples import DataError, read_text
from peftspec.formats.adapter_file import load_adapter
from peftspec.core.registry import registry_or_default
from peftspec.train.tasks import adapter_labels
from peftspec.models.tokenizer import tokenizer_for
from peftspec.core.rows import rows
from peftspec.core.patching import state_of
from peftspec.core.patching import active_adapter, disabled, is_patched, use


class GenerateError(PeftspecError):
    """Bad input to generation: prompts, adapters or settings (exit code 2)."""

    exit_code = 2


@dataclass(frozen=True)
class Prompt:
    """A prompt, with the answer a prompts file expects when it gives one.

    With ``messages`` (a conversation up to its last user turn), generation
    answers that turn with the whole history rendered by the chat template;
    ``text`` is then the last user turn, for display."""

    text: str
    expected: str | None = None
    messages: tuple[dict, ...] | None = None


@dataclass(frozen=True)
class Answer:
    """One row's output: ``adapter`` is the adapter's name (None: the base)."""

    prompt: str
    adapter: str | None
    text: str
    new_tokens: int
    finished: bool  # ended with the end-of-text token (else max_new_tokens ran out)
    ids: tuple[int, ...] = ()  # the new tokens, the stop token excluded

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "adapter": self.adapter, "text": self.text,
                "new_tokens": self.new_tokens, "finished": self.finished,
                "ids": list(self.ids)}


@dataclass
class Session:
    """A model with its adapters loaded (``names``, in the order given) and its tokenizer."""

    model: torch.nn.Module
    tokenizer: object
    names: list[str]


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from ``path``: JSONL records ``{"prompt": ...}`` (a ``completion``
    or ``expected`` key is kept as the expected answer; training data works as
    is), or any other file as one prompt per non-blank line."""

    path = Path(path)
    raw = read_text(path, "prompts file")
    prompts = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(Prompt(line.strip()))
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") \
                from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise DataError(f'{where}: expected an object with a "prompt" string, e.g. '
                            '{"prompt": "What is the capital of France?"}')
        expected = obj.get("completion", obj.get("expected"))
        if expected is not None and not isinstance(expected, str):
            raise DataError(f"{where}: the expected answer must be a string, got "
                            f"{expected!r:.40}")
        prompts.append(Prompt(obj["prompt"], expected))
    if not prompts:
        raise DataError(f"{path}: no prompts in the file")
    return prompts


def read_conversations(data) -> list[Prompt]:
    """Conversations to answer (``generate --messages``): each record of
    ``data`` (any format ``train`` reads) up to its last user turn; the
    assistant turn after it, when there is one, is the expected answer."""
    prompts = []
    for ex in reading.read(data).examples:
        messages = ex.conversation() if ex.text is None else None
        last = max((i for i, m in enumerate(messages or []) if m["role"] == "user"),
                   default=None)
        if last is None:
            raise DataError(f"{ex.where}: no user turn to answer")
        after = messages[last + 1] if last + 1 < len(messages) else None
        expected = after["content"] if after and after["role"] == "assistant" else None
        prompts.append(Prompt(messages[last]["content"], expected, tuple(messages[:last + 1])))
    return prompts


def load(source: str | None, adapters: Sequence[str | Path] = (), *, registry=None) -> Session:
    """Load the model ``source`` names, its tokenizer, and each adapter file
    beside the others (named after its file stem, made unique)."""

    registry = registry_or_default(registry)
    for path in adapters:
        if not Path(path).is_file():
            raise GenerateError(f"{path}: no such adapter file")
        if adapter_labels(path) is not None:
            raise GenerateError(f"{path} is a sequence classifier's adapter; it predicts "
                                "labels and does not generate text")
    model = registry.load_model(source)
    if not callable(getattr(model, "generate", None)):
        raise GenerateError(f"the model {source or 'default'} ({type(model).__name__}) has no "
                            "generate(); generation needs a causal LM")
    tokenizer = tokenizer_for(source, model)
    names: list[str] = []
    for path in adapters:
        stem = Path(path).name.removesuffix(".safetensors") or "adapter"
        name, n = stem, 2
        while name in names:
            name, n = f"{stem}-{n}", n + 1
        load_adapter(model, path, name=name, registry=registry)
        names.append(name)
    model.eval()
    return Session(model, tokenizer, names)


def prompt_ids(tokenizer, text: str | Prompt, chat: bool = True) -> list[int]:
    """The token ids generation starts from: the chat template's user turn
    (or a :class:`Prompt`'s whole conversation) with the assistant's turn
    opened, or the raw text's tokens."""
    if isinstance(text, Prompt) and text.messages is not None:
        if not getattr(tokenizer, "has_chat_template", False):
            raise GenerateError(NO_TEMPLATE)
        return tokenizer.encode(tokenizer.render_chat(list(text.messages),
                                                      add_generation_prompt=True))
    text = text.text if isinstance(text, Prompt) else text
    if chat and getattr(tokenizer, "has_chat_template", False):
        return tokenizer.encode_chat(text)
    ids = tokenizer.encode(text)
    if not ids:
        raise GenerateError(f"the prompt {text!r} has no tokens")
    return ids


def generate(model, tokenizer, prompts: Sequence[str | Prompt], *,
             adapters: Sequence[str | None] = (None,), chat: bool = True,
             max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, batch_size: int = 16,
             on_update: Callable[[list[Answer]], None] | None = None) -> list[Answer]:
    """Answer every prompt with every adapter (``None``: the base model).

    Returns one :class:`Answer` per (prompt, adapter) pair, prompt-major
    (prompt 0 with each adapter in the order given, then prompt 1, ...).
    ``on_update`` is called with every answer so far (partial ones
    included) as tokens arrive: streaming.
    """
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise GenerateError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} "
                            f"and {top_p}")
    if batch_size < 1:
        raise GenerateError(f"batch_size must be at least 1, got {batch_size}")
    texts = [p.text if isinstance(p, Prompt) else p for p in prompts]
    if not texts or not adapters:
        raise GenerateError("nothing to generate: give at least one prompt and one model "
                            "(the base, or an adapter)")
    ids = [prompt_ids(tokenizer, p, chat) for p in prompts]
    jobs = [(i, a) for i in range(len(texts)) for a in adapters]
    answers: list[Answer | None] = [None] * len(jobs)
    hf = is_transformers(model)
    stops = _stop_ids(tokenizer, model)
    if not hf and temperature > 0:
        raise GenerateError(f"{type(model).__name__}'s own generate() is greedy; sampling "
                            "(temperature > 0) needs a transformers model (hf:, gguf:)")

    def report(slot_rows, partial):
        for slot, answer in zip(slot_rows, partial):
            answers[slot] = answer
        if on_update is not None:
            on_update([a for a in answers if a is not None])

    for group in _passes(model, list(dict.fromkeys(adapters))):
        slots = [k for k, (_, a) in enumerate(jobs) if a in group]
        for start in range(0, len(slots), batch_size):
            chunk = slots[start:start + batch_size]
            names = [jobs[k][1] for k in chunk]
            rows_ids = [ids[jobs[k][0]] for k in chunk]

            def partial(new, _done, chunk=chunk):
                report(chunk, [_answer(texts[jobs[k][0]], jobs[k][1], tokenizer, n, stops)
                               for k, n in zip(chunk, new)])

            torch.manual_seed(seed)
            with adapters_for(model, names):
                new = _decode(model, tokenizer, rows_ids, hf, max_new_tokens, temperature,
                              top_p, partial if on_update else None)
            partial(new, None)
    return [a for a in answers if a is not None]


def _answer(prompt: str, adapter, tokenizer, new: list[int], stops: set[int]) -> Answer:
    """The row's text up to its first stop token (padding follows it)."""
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    return Answer(prompt, adapter, tokenizer.decode_clean(new[:cut]).strip(), cut,
                  cut < len(new), tuple(new[:cut]))


def _stop_ids(tokenizer, model) -> set[int]:
    ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    return ids


def is_transformers(model) -> bool:
    """Whether ``model`` is a transformers model that can ``generate()`` (it has a
    generation config), as opposed to the built-in nanoGPT or a plain module."""
    can = getattr(model, "can_generate", None)
    return callable(can) and getattr(model, "generation_config", None) is not None and \
        bool(can())


def _passes(model, adapters: list[str | None]) -> list[set]:
    """Which adapters run together: the base and every adapter made only of
    module-replacing rules (``[[reparameterize]]``, ``[[augment]]``: LoRA
    family, bottleneck, IA3) in one per-row pass; each other adapter alone.

    Soft prompts (``[prefix]``) change the sequence, and ``[[train]]`` rules
    change base tensors in place, which :func:`peftspec.rows` does not
    switch per row (it would silently run such rows as the base), so those
    adapters get a pass of their own through :func:`peftspec.use`."""

    named = [a for a in adapters if a is not None]
    if not named or (len(named) == 1 and None not in adapters):
        return [set(adapters)]

    state = state_of(model)
    together, alone = [], []
    for name in named:
        families = {rec.step.family for rec in state.adapters[name].records} | \
            {s.family for s in state.adapters[name].plan.steps}
        (together if families <= {"reparameterize", "augment"} else alone).append(name)
    if together:
        try:  # a method without per-row support refuses on entry; nothing runs
            with rows(model, together + [None]):
                pass
        except (NotImplementedError, PeftspecError):
            alone, together = alone + together, []
    first = set(together) | ({None} if None in adapters else set())
    return ([first] if first else []) + [{a} for a in alone]


@contextlib.contextmanager
def adapters_for(model, names: list[str | None], keep: bool = False):
    """Row ``i`` through ``names[i]``: one adapter (or none) by switching, several by rows.

    ``keep``: where every row names one adapter (or the base), leave it active
    after the block instead of switching back, so that the next block for the
    same one switches nothing (the server's scheduler, step after step: a
    switch walks the model's modules)."""

    distinct = set(names)
    if not is_patched(model):
        yield
    elif keep and len(distinct) == 1:
        use(model, names[0])
        yield
    elif distinct == {None}:
        with disabled(model):
            yield
    elif len(distinct) == 1:
        previous = active_adapter(model)
        use(model, names[0])
        try:
            yield
        finally:
            use(model, previous)
    else:
        with rows(model, names):
            yield


def _decode(model, tokenizer, rows_ids: list[list[int]], hf: bool, max_new_tokens: int,
            temperature: float, top_p: float, on_step) -> list[list[int]]:
    """New token ids per row, prompts left-padded into one batch."""
    width = max(len(r) for r in rows_ids)
    pad = tokenizer.pad_id
    device = next(model.parameters()).device
    input_ids = torch.full((len(rows_ids), width), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows_ids):
        input_ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    with torch.no_grad():
        if not hf:
            out = model.generate(input_ids, max_new_tokens, attention_mask=mask)
            return [row[width:].tolist() for row in out]
        stops = sorted(_stop_ids(tokenizer, model))
        kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": pad,
                  "eos_token_id": stops or None, "do_sample": temperature > 0}
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        else:  # a greedy run must not inherit a checkpoint's sampling defaults
            kwargs.update(temperature=None, top_p=None, top_k=None)
        streamer = _Streamer(len(rows_ids), stops, on_step) if on_step else None
        out = model.generate(input_ids=input_ids, attention_mask=mask, streamer=streamer,
                             **kwargs)
    return [row[width:].tolist() for row in out]


class _Streamer:
    """transformers' streamer protocol (``put``/``end``) for a whole batch: the
    first ``put`` is the prompt, each later one a token per row."""

    def __init__(self, rows: int, stops: list[int], on_step):
        self.new: list[list[int]] = [[] for _ in range(rows)]
        self.done = [False] * rows
        self.stops, self.on_step, self.prompt_seen = set(stops), on_step, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for i, t in enumerate(value.reshape(len(self.new), -1)[:, -1].tolist()):
            if not self.done[i]:
                self.new[i].append(t)
                self.done[i] = t in self.stops
        self.on_step(self.new, self.done)

    def end(self) -> None:
        pass
