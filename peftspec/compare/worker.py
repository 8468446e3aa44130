"""One run of a comparison, in a process of its own: ``python -m
peftspec.compare.worker JOB.json``.

A process per run makes each peak resident set its own (Linux's high-water
mark starts afresh at exec) and frees everything between runs. The worker:

1. loads the model (the task, causal LM or classifier, comes from the data, as
   in ``peftspec train``) and measures the base: its size, the full
   fine-tuning column of the memory estimate, its loss on the reference text
   and its per-token generation latency;
2. trains through :func:`peftspec.train.loop.train` (the same loop as
   ``peftspec train``), forwarding each event to the parent as a line
   ``@@{json}`` on stdout;
3. measures the result: the spec's memory column, the reference loss after,
   the latency with the adapter active and merged (when its methods merge);
4. writes ``result.json`` atomically, last: a run killed before that leaves no
   record and is redone from the start next time.

A :class:`~peftspec.core.errors.PeftspecError` ends the run with an ``error``
event and the error's exit code.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from peftspec.core.errors import NotMergeableError
from peftspec.core.patching import merge
from peftspec.core.atomicio import atomic_write_bytes
from peftspec.core.plan import compile_plan
from peftspec.core.registry import get_registry
from peftspec.core.spec import load_spec
from peftspec.train import memory as mem
from peftspec.train import tasks
from peftspec.core.train_config import TrainConfig
from peftspec.generate import read_prompts
from peftspec.data.examples import encode_all, read_examples, split
from peftspec.core.modelinfo import context_length
from peftspec.train.loop import train
from peftspec.train.memory import peak_rss_mb
from peftspec.models.tokenizer import tokenizer_for
from peftspec.compare import measure
from peftspec.compare.settings import CompareError, Settings
from peftspec.core.patching import active_adapter
from peftspec.core.errors import PeftspecError

PREFIX = "@@"


def emit(event: dict) -> None:
    sys.stdout.write(PREFIX + json.dumps(event, default=str) + "\n")
    sys.stdout.flush()


def _train_command(entry: dict, s: dict, spec_path: str) -> str:
    """The ``peftspec train`` command that trains the same adapter."""
    parts = ["peftspec", "train", spec_path, "--out", "adapter.safetensors"]
    if s["model"]:
        parts += ["--model", s["model"]]
    parts += ["--data", s["data"]]
    parts += ["--eval", s["eval"]] if s["eval"] else ["--eval-split", str(s["eval_split"])]
    for key in ("steps", "batch_size", "lr", "warmup", "max_length", "seed", "precision"):
        value = entry["lr"] if key == "lr" else s[key]
        parts += ["--" + key.replace("_", "-"), str(value)]
    parts += ["--eval-every", str(max(1, s["steps"] // 10) if not s["eval_every"]
                                  else s["eval_every"])]
    return " ".join(parts)


def _train_speed(events: list[dict]) -> tuple[int, float]:
    """Tokens and seconds of the optimizer steps alone (evaluations excluded)."""
    tokens, seconds, prev = 0, 0.0, 0
    for e in events:
        step_tokens = e["tokens"] - prev
        prev = e["tokens"]
        if e["tokens_per_s"] > 0:
            tokens += step_tokens
            seconds += step_tokens / e["tokens_per_s"]
    return tokens, seconds


def run(job: dict) -> dict:
    """Do the run ``job`` describes (see :mod:`peftspec.compare.runner`); return its record."""
    import torch


    t_start = time.perf_counter()
    s = Settings(**job["settings"])
    run_dir = Path(job["dir"])
    entry = job["entry"]
    spec_path = entry["spec"] or str(run_dir / "spec.toml")
    if entry["spec"] is None:  # full fine-tuning: its generated spec, kept beside the record
        atomic_write_bytes(run_dir / "spec.toml", entry["text"].encode())
    for stale in ("metrics.jsonl", "adapter.safetensors"):
        (run_dir / stale).unlink(missing_ok=True)
    env_before = measure.environment()

    reg = get_registry()
    spec = load_spec(spec_path, registry=reg)
    lr = s.full_lr if entry["spec"] is None and s.full_lr is not None else \
        float(spec.train_config.get("lr", s.lr))
    entry = {**entry, "lr": lr}
    cfg = TrainConfig(data=s.data, eval=s.eval, eval_split=s.eval_split,
                      eval_every=s.curve_every, steps=s.steps, batch_size=s.batch_size,
                      lr=lr, warmup=s.warmup, max_length=s.max_length, seed=s.seed,
                      precision=s.precision, log=str(run_dir / "metrics.jsonl"),
                      streaming="off")  # the study encodes the data whole (its eval items)
    emit({"type": "phase", "phase": "loading model"})
    task = tasks.read(cfg)
    model = tasks.load_model(task, s.model, reg, s.seed)
    tok = tokenizer_for(s.model, model)
    rss_loaded = measure.rss_mb()
    limit = context_length(model)  # as train() truncates
    max_len = min(s.max_length, limit) if limit else s.max_length
    # the eval items train() scores (the same encoding, the same seeded split)
    eval_items = encode_all(task.eval, tok, max_len, task.labels)[0] \
        if task.eval is not None else split(encode_all(task.train, tok, max_len,
                                                       task.labels)[0], s.eval_split, s.seed)[1]
    if not eval_items:
        raise CompareError(f"{s.eval or s.data}: no evaluation example keeps a token to score "
                           f"within --max-length {s.max_length}; raise --max-length")
    plan = compile_plan(spec, model, registry=reg)
    base_cost = mem.full_finetune(model)
    dims = mem.model_dims(model)
    full_copy = measure.unique_bytes(model)
    generates = not task.classify and callable(getattr(model, "generate", None))
    reference = read_examples(s.reference) if s.reference and not task.classify else None
    prompts = read_prompts(s.probe) if s.probe and generates else None

    emit({"type": "phase", "phase": "measuring the base"})
    eval_before = None if task.classify else \
        measure.items_loss(model, tok, eval_items, s.batch_size)
    ref_before = measure.text_loss(model, tok, reference, max_len, s.batch_size) \
        if reference else None
    lat_base = measure.token_latency(model, tok, s.gen_tokens) if generates else None

    train_events: list[dict] = []
    evals: list[dict] = []

    def on_event(e: dict) -> None:
        if e["type"] == "train":
            train_events.append(e)
        elif e["type"] == "eval":
            evals.append(e)
        emit({k: v for k, v in e.items() if k != "labels"})

    torch.manual_seed(s.seed)
    result = train(spec, cfg, model=model, model_source=s.model,
                   out=run_dir / "adapter.safetensors", registry=reg, on_event=on_event,
                   force=entry["spec"] is None)
    peak = result.peak_rss_mb
    tokens, seconds = _train_speed(train_events)
    extra = sum(int(getattr(st.options, "tokens", 0) or 0)
                for st in plan.steps if st.family == "prefix")
    table = mem.memory_table(base_cost, mem.with_spec(model), dims, batch=s.batch_size,
                             seq=s.max_length, precision=s.precision, checkpointing=False,
                             spec_extra_tokens=extra)

    emit({"type": "phase", "phase": "measuring the adapter"})
    ref_after = measure.text_loss(model, tok, reference, max_len, s.batch_size) \
        if reference else None
    lat_unmerged = measure.token_latency(model, tok, s.gen_tokens) if generates else None
    answers = None
    if prompts:

        emit({"type": "phase", "phase": "answering the probe prompts"})
        answers = measure.probe(model, tok, prompts, active_adapter(model), s.probe_tokens)
    lat_merged, not_merged = None, None
    if generates:
        try:
            merge(model)
            lat_merged = measure.token_latency(model, tok, s.gen_tokens)
        except NotMergeableError as exc:
            not_merged = str(exc)
    last_eval = evals[-1] if evals else {}
    trainable = table["columns"]["spec"]["trainable"]
    return {
        "name": entry["name"], "spec": entry["spec"], "full": entry["spec"] is None,
        "key": job["key"], "lr": lr,
        "methods": sorted({st.method for st in plan.steps}),
        "task": "sequence-classification" if task.classify else "causal-lm",
        "command": _train_command(entry, s.to_dict(), spec_path),
        "environment": {**env_before, "loadavg_end": measure.environment()["loadavg"]},
        "params": {"base": base_cost["params"], "trainable": trainable,
                   "trainable_pct": 100.0 * trainable / base_cost["params"]},
        "storage": {"adapter_bytes": (run_dir / "adapter.safetensors").stat().st_size,
                    "full_copy_bytes": full_copy},
        "memory": {"estimate": table, "peak_rss_mb": peak, "loaded_rss_mb": rss_loaded,
                   "peak_rss_mb_end": peak_rss_mb()},
        "speed": {"tokens": tokens, "seconds": seconds,
                  "tokens_per_s": tokens / seconds if seconds else None,
                  "loop_seconds": result.seconds},
        "quality": {"eval_loss_before": eval_before, "eval_loss": result.eval_loss, "eval_accuracy": last_eval.get("accuracy"),
                    "train_loss": result.train_loss,
                    "train_curve": [[e["step"], e["loss"]] for e in train_events],
                    "eval_curve": [[e["step"], e["loss"]] + ([e["accuracy"]] if "accuracy" in e
                                                             else []) for e in evals]},
        "forgetting": {"reference": s.reference, "before": ref_before, "after": ref_after,
                       "increase": (ref_after - ref_before) if ref_before is not None and
                       ref_after is not None else None},
        "latency": {"tokens": s.gen_tokens, "base_ms": _ms(lat_base),
                    "unmerged_ms": _ms(lat_unmerged), "merged_ms": _ms(lat_merged),
                    "not_mergeable": not_merged},
        "answers": answers,
        "wall_seconds": time.perf_counter() - t_start,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def main(argv: list[str] | None = None) -> int:

    argv = sys.argv[1:] if argv is None else argv
    job_path = Path(argv[0])
    job = json.loads(job_path.read_text())
    try:
        record = run(job)
    except PeftspecError as exc:
        emit({"type": "error", "message": str(exc), "exit_code": exc.exit_code})
        return exc.exit_code
    atomic_write_bytes(Path(job["dir"]) / "result.json",
                       json.dumps(record, indent=1, default=str).encode())
    emit({"type": "done"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
