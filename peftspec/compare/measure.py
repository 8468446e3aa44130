"""The measurements a run takes around training: the loss on a reference text
(forgetting), per-token generation latency, sizes, and the environment.

Latency is the cost of one more token: generating ``n`` new tokens and one new
token from the same prompt, best of ``repeats`` each, and
``(t_n - t_1) / (n - 1)``, so that the prompt's own forward pass (which a soft
prompt lengthens) is not spread over the tokens. Every token is generated
(``min_new_tokens`` for transformers models), whatever the text says, so the
count is the same for the base, the adapter and the merged model.
"""

from __future__ import annotations

import os
import platform
import sys
import time

import torch

from peftspec.data import examples as data
from peftspec.generate import is_transformers, prompt_ids
from peftspec.core.version import __version__
from peftspec.generate import generate

LATENCY_PROMPT = "The capital of France is"


def text_loss(model, tok, examples: list, max_length: int, batch_size: int) -> float | None:
    """``model``'s loss on ``examples`` (a data file's language-modelling
    records; :func:`items_loss`); None when no example has a token to score."""
    items, _ = data.encode_all(examples, tok, max_length)
    return items_loss(model, tok, items, batch_size)


@torch.no_grad()
def items_loss(model, tok, items: list, batch_size: int) -> float | None:
    """``model``'s loss on encoded ``items`` as ``peftspec train`` evaluates:
    each batch's mean loss, averaged over the batches weighted by their rows."""
    if not items:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    try:
        for batch in data.eval_batches(items, batch_size, tok.pad_id):
            n = int(batch["labels"].shape[0])
            out = model(**{k: v.to(device) for k, v in batch.items()})
            loss = out.loss if hasattr(out, "loss") else out["loss"]
            total += float(loss) * n
            count += n
    finally:
        model.train(was_training)
    return total / count if count else None


def _generate(model, ids: torch.Tensor, n: int, hf: bool, pad_id: int) -> None:
    mask = torch.ones_like(ids)
    if hf:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                       min_new_tokens=n, do_sample=False, pad_token_id=pad_id,
                       temperature=None, top_p=None, top_k=None)
    else:
        model.generate(ids, n, attention_mask=mask)


@torch.no_grad()
def token_latency(model, tok, n: int, repeats: int = 2) -> float:
    """Seconds per generated token beyond the first (see the module docstring)."""

    hf = is_transformers(model)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tok, LATENCY_PROMPT, chat=False)], device=device)
    was_training = model.training
    model.eval()
    try:
        _generate(model, ids, 2, hf, tok.pad_id)  # warm-up: first-call costs
        best = {}
        for count in (1, n):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                _generate(model, ids, count, hf, tok.pad_id)
                times.append(time.perf_counter() - t0)
            best[count] = min(times)
    finally:
        model.train(was_training)
    return max(best[n] - best[1], 0.0) / (n - 1)


def unique_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, tied tensors once: a full copy."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def rss_mb() -> float | None:
    """This process's resident memory now (MiB), from /proc; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def environment() -> dict:
    """What a figure depends on besides the code: versions, machine, load."""

    env = {"peftspec": __version__, "python": sys.version.split()[0],
           "torch": torch.__version__, "platform": platform.platform(),
           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    try:
        env["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        env["loadavg"] = None
    return env


def probe(model, tok, prompts: list, adapter: str | None, max_new_tokens: int) -> list[dict]:
    """Greedy answers of the base and of ``adapter`` to ``prompts`` (a prompts
    file's :class:`peftspec.generate.Prompt` list), in one batch where the
    methods allow: ``[{"prompt", "expected", "base", "adapter"}]``."""

    wanted = [None] if adapter is None else [None, adapter]
    answers = generate(model, tok, prompts, adapters=wanted, max_new_tokens=max_new_tokens)
    by = {(a.prompt, a.adapter): a.text for a in answers}
    return [{"prompt": p.text, "expected": p.expected, "base": by[(p.text, None)],
             "adapter": by.get((p.text, adapter))} for p in prompts]
