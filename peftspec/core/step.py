"""One unit of a compiled plan: a :class:`Step` applies one method to one target.

Below the plan and the method contract (both name it), above nothing but the
standard library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Step:
    """One unit of work: apply ``method`` to ``target`` with ``options``.

    ``roles`` names the selector options that picked the target (e.g.
    ``("modules", "feedforward")`` for IA3); ``rule`` and ``line`` say where
    in the spec it came from.
    """

    target: str
    method: str
    family: str
    options: Any
    roles: tuple[str, ...]
    rule: str
    line: int | None
    params_added: int = 0
    bytes_added: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "method": self.method, "family": self.family,
                "roles": list(self.roles), "rule": self.rule, "line": self.line,
                "params_added": self.params_added, "bytes_added": self.bytes_added}


_new = object.__new__


def new_step(target: str, method: str, family: str, options: Any, roles: tuple[str, ...],
          rule: str, line: int | None) -> Step:
    """``Step(...)`` for the compiler, which makes one per target (thousands on a deep
    model): the same fields in the instance ``__dict__`` that the frozen dataclass's
    ``__init__`` would set one ``object.__setattr__`` call at a time, stored
    directly (a quarter of the cost). A field added to :class:`Step` must be added
    here: ``test_compiler_steps_equal_dataclass_steps`` compares the two."""
    step = _new(Step)
    d = step.__dict__
    d["target"] = target
    d["method"] = method
    d["family"] = family
    d["options"] = options
    d["roles"] = roles
    d["rule"] = rule
    d["line"] = line
    d["params_added"] = 0
    d["bytes_added"] = 0
    return step
