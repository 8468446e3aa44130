"""What the fuzz tests share: the outcome rule, per-reader counts, TOML emitting,
and mutations of real files.

The rule: every example ends in success or a :class:`PeftspecError` with a
message; any other exception fails the test, and so does an example that
takes longer than :data:`LIMIT_S` of CPU time (one second under
``HYPOTHESIS_PROFILE=explore``, a looser hang guard elsewhere). CPU time, not
wall time: on a shared, loaded box wall time measures the neighbours; a hang
or a super-linear blow-up shows in CPU time either way.

Counts: with ``PEFTSPEC_FUZZ_STATS=FILE`` each test appends one JSON line per
reader (examples, successes, errors by class, slowest example) to FILE at
the end of the session, for the closing note's table.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import struct
import time
from collections import Counter, defaultdict

from hypothesis import strategies as st

from peftspec.core.errors import PeftspecError

EXPLORE = os.environ.get("HYPOTHESIS_PROFILE") == "explore"
LIMIT_S = float(os.environ.get("PEFTSPEC_FUZZ_LIMIT_S", 1.0 if EXPLORE else 10.0))

STATS: dict[str, Counter] = defaultdict(Counter)
SLOWEST: dict[str, float] = defaultdict(float)  # CPU seconds: a loaded box stretches wall time
WALL: dict[str, float] = defaultdict(float)


def outcome(reader: str, fn, *args, limit_s: float | None = None, **kwargs) -> str:
    """Run ``fn``; return "ok" or the PeftspecError's class name. Anything else raises.

    ``limit_s``: a larger CPU limit for a reader whose success is real work
    (converting a GGUF file runs transformers' loader); failures still count."""
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        fn(*args, **kwargs)
        result = "ok"
    except PeftspecError as exc:
        message = str(exc).strip()
        assert message, f"{type(exc).__name__} without a message"
        result = type(exc).__name__
    finally:
        cpu = time.process_time() - c0
        SLOWEST[reader] = max(SLOWEST[reader], cpu)
        WALL[reader] = max(WALL[reader], time.perf_counter() - t0)
    limit = max(LIMIT_S, limit_s or 0)
    assert cpu < limit, f"{reader}: one example took {cpu:.2f} s of CPU (limit {limit} s)"
    STATS[reader]["examples"] += 1
    STATS[reader][result] += 1
    return result


def _dump() -> None:
    path = os.environ.get("PEFTSPEC_FUZZ_STATS")
    if not path or not STATS:
        return
    with open(path, "a", encoding="utf-8") as f:
        for reader, counts in sorted(STATS.items()):
            f.write(json.dumps({"reader": reader, **counts,
                                "slowest_cpu_s": round(SLOWEST[reader], 4),
                                "slowest_wall_s": round(WALL[reader], 4)}) + "\n")


atexit.register(_dump)


# --- TOML documents ----------------------------------------------------------------------

KEYS = ["spec", "name", "description", "train", "reparameterize", "augment", "prefix",
        "train_config", "method", "modules", "params", "exclude", "optional", "r", "alpha",
        "dropout", "dora", "rslora", "init", "size", "after", "parallel_to", "preset",
        "tokens", "text", "token_ids", "encoder", "steps", "lr", "data", "x", "a b", "é"]
METHODS = ["lora", "bottleneck", "prompt-tuning", "p-tuning", "prefix-tuning", "select",
           "nope"]
SELECTORS = ["**.q_proj", "**.v_proj", "**.bias", "blocks.*.mlp", "type:Linear", "re:.*",
             "re:(a)\\1", "re:([\\w.]+)+[!?]", "**", "", " x", "type:", "re:(", "lm_head",
             "**.**.**.**.x", "blocks.?.attn.**"]

SCALARS = st.one_of(
    st.integers(min_value=-2**63, max_value=2**63 - 1),
    st.sampled_from([0, 1, 2, 4, 8, 16, 64, 10**9, 10**11, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=20),
    st.sampled_from(METHODS + SELECTORS),
)


def values(depth: int = 2):
    if depth <= 0:
        return SCALARS
    inner = values(depth - 1)
    return st.one_of(SCALARS,
                     st.lists(st.one_of(SCALARS, st.sampled_from(SELECTORS)), max_size=4),
                     st.dictionaries(st.sampled_from(KEYS), inner, max_size=3))


def _key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "_-" for c in k) and k.isascii() else \
        json.dumps(k)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        # JSON's escapes are TOML's basic-string escapes; TOML also forbids a raw DEL
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def to_toml(doc: dict) -> str:
    """``doc`` as TOML: scalars and arrays inline, tables as [headers], lists of
    tables as [[headers]] (one level deep, as specs are)."""
    lines = [f"{_key(k)} = {toml_value(v)}" for k, v in doc.items()
             if not isinstance(v, dict) and not _tables(v)]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"[{_key(k)}]")
            lines += [f"{_key(a)} = {toml_value(b)}" for a, b in v.items()]
        elif _tables(v):
            for t in v:
                lines.append(f"[[{_key(k)}]]")
                lines += [f"{_key(a)} = {toml_value(b)}" for a, b in t.items()]
    return "\n".join(lines) + "\n"


def _tables(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, dict) for t in v)


RULE = st.fixed_dictionaries(
    {"method": st.sampled_from(METHODS)},
    optional={k: values(1) for k in KEYS[9:]})
TOML_DOCS = st.fixed_dictionaries(
    {}, optional={"spec": st.dictionaries(st.sampled_from(KEYS), SCALARS, max_size=3),
                  "reparameterize": st.lists(RULE, max_size=2),
                  "augment": st.lists(RULE, max_size=2),
                  "train": st.lists(RULE, max_size=2),
                  "prefix": RULE,
                  "train_config": st.dictionaries(st.sampled_from(KEYS), SCALARS, max_size=3),
                  "x": values(2)})


def mutate_doc(draw, doc):
    """Change one thing in a parsed TOML document: a value replaced, a key deleted,
    or a key added, at a random depth."""
    node = doc
    path = []
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        k = draw(st.sampled_from(keys))
        child = node[k]
        if isinstance(child, (dict, list)) and child and draw(st.booleans()):
            node, path = child, path + [k]
            continue
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            node[k] = draw(values(1))
        elif action == "delete" and isinstance(node, dict):
            del node[k]
        elif isinstance(node, dict):
            node[draw(st.sampled_from(KEYS))] = draw(values(1))
        break
    return doc


# --- safetensors files -------------------------------------------------------------------

DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "X",
          "", "F32 ", "f32"]


def split_file(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_file(header: dict, data: bytes, length_delta: int = 0) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", max(0, len(text) + length_delta)) + text + data


@st.composite
def mutated_safetensors(draw, raw: bytes, metadata_values=()):
    """A real safetensors file with one or two things changed: the header length,
    a tensor's dtype, shape or offsets, a metadata entry, bytes of the data, the end."""
    header, data = split_file(raw)
    names = [k for k in header if k != "__metadata__"]
    delta = 0
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["length", "dtype", "shape", "offsets", "metadata",
                                     "drop-tensor", "flip", "truncate", "append", "json"]))
        if kind == "length":
            delta = draw(st.sampled_from([-8, -1, 1, 7, 8, 1 << 20, -(1 << 10), 1 << 62]))
        elif kind == "dtype" and names:
            header[draw(st.sampled_from(names))]["dtype"] = draw(st.sampled_from(DTYPES))
        elif kind == "shape" and names:
            header[draw(st.sampled_from(names))]["shape"] = draw(st.lists(
                st.one_of(st.integers(-3, 70), st.sampled_from([2**31, 2**62, 2**64])),
                max_size=4))
        elif kind == "offsets" and names:
            header[draw(st.sampled_from(names))]["data_offsets"] = draw(st.lists(
                st.one_of(st.integers(-1, len(data) + 8), st.sampled_from([2**63, 2**64])),
                max_size=3))
        elif kind == "metadata":
            meta = header.setdefault("__metadata__", {})
            keys = list(meta) + ["format", "format_version", "spec", "base_digest",
                                 "base_fingerprint", "targets", "task", "labels", "x"]
            key = draw(st.sampled_from(keys))
            choice = draw(st.sampled_from(["text", "known", "delete", "nonstring"]))
            if choice == "text":
                meta[key] = draw(st.text(max_size=40))
            elif choice == "known":
                meta[key] = draw(st.sampled_from(list(metadata_values) or [""]))
            elif choice == "delete":
                meta.pop(key, None)
            else:
                meta[key] = draw(st.one_of(st.integers(), st.lists(st.integers(), max_size=2)))
        elif kind == "drop-tensor" and names:
            dropped = draw(st.sampled_from(names))
            header.pop(dropped)
            names.remove(dropped)
        elif kind == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
        elif kind == "truncate":
            data = data[:draw(st.integers(0, max(0, len(data) - 1)))]
        elif kind == "append":
            data = data + draw(st.binary(min_size=1, max_size=64))
        elif kind == "json":
            raw_json = json.dumps(header).encode()
            i = draw(st.integers(0, len(raw_json) - 1))
            broken = raw_json[:i] + draw(st.binary(max_size=3)) + raw_json[i + 1:]
            broken += b" " * (-len(broken) % 8)
            return struct.pack("<Q", len(broken)) + broken + data
    return join_file(header, data, delta)


# JSON values for configs and data lines
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12)),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.text(max_size=8), children, max_size=3)),
    max_leaves=8)
