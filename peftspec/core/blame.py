"""Exceptions from plugin code, reported as peftspec errors saying whose code
raised, in which hook, for which rule of which spec.

Whatever a method's hook raises (``check``, ``apply``, ``merge``, ``detach``,
``rows_attach``, ``training``, ``pack``, an adapter module's
``load_adapter_state``...) reaches the user as a
:class:`~peftspec.core.errors.PeftspecError` naming the distribution, the
method, the rule and its spec line (``file:line``), with the original chained:

* a ``ValueError`` (in ``check`` and ``resolve_options`` a ``TypeError`` too) is
  the plugin refusing the input, the documented way:
  :class:`~peftspec.core.errors.PluginInputError`, exit code 2 (at compile time
  it is one of the spec's problems instead, reported with the others);
* a ``PeftspecError`` the plugin raised keeps its class, message and exit code,
  and gains the context;
* anything else is the plugin failing: :class:`~peftspec.core.errors.PluginError`,
  exit code 3.

The plugin-level hooks ``check_plan`` and ``after_apply`` are called through
:func:`plugin_hook`, which names the distribution whose implementation raised.

Call sites catch with a plain ``try``/``except`` (free when nothing is raised:
thousands of steps) and call :func:`reraise`.
"""

from __future__ import annotations

from typing import NoReturn

from peftspec.core.errors import PeftspecError, PluginError, PluginInputError

REFUSALS: tuple[type[BaseException], ...] = (ValueError,)
OPTION_REFUSALS: tuple[type[BaseException], ...] = (ValueError, TypeError)


def dist_of(registry, method: str) -> str:
    info = registry.methods.get(method) if registry is not None else None
    return info.dist if info is not None else "<unknown>"


def who(registry, method: str) -> str:
    """``plugin 'dist', method 'name'``."""
    return f"plugin {dist_of(registry, method)!r}, method {method!r}"


def where(rule: str, line: int | None, file: str | None) -> str:
    """``reparameterize[0], spec.toml:4``."""
    loc = file or "<spec>"
    return f"{rule}, {loc}:{line}" if line is not None else f"{rule}, {loc}"


def context(registry, steps, file: str | None) -> str:
    """Who and where, for one step or several (a hook called once per method)."""
    steps = list(steps) if not hasattr(steps, "method") else [steps]
    first = steps[0]
    rules = dict.fromkeys((s.rule, s.line) for s in steps)
    places = "; ".join(where(r, line, file) for r, line in rules)
    return f"{who(registry, first.method)} ({places})"


def reraise(exc: Exception, registry, steps, hook: str, file: str | None, *,
            target: str | None = None,
            refusals: tuple[type[BaseException], ...] = REFUSALS) -> NoReturn:
    """Raise ``exc``, which the hook ``hook`` of ``steps``' method raised, as the
    peftspec error described in the module docstring. Call it in the ``except``
    block. ``target``: the module the hook worked on, when it was one."""
    on = f" on '{target or '<model>'}'" if target is not None else ""
    ctx = context(registry, steps, file)
    _raise_blamed(exc, f"{ctx}, {hook}{on}", f"{ctx} refused{on} in {hook}",
                  f"{ctx} failed in {hook}{on}", refusals)


def _raise_blamed(exc: Exception, ctx: str, refused: str, failed: str,
                  refusals: tuple[type[BaseException], ...]) -> NoReturn:
    """Raise ``exc`` as the module docstring says: a PeftspecError gains ``ctx``;
    a refusal becomes ``PluginInputError("<refused>: ...")``, anything else
    ``PluginError("<failed>: ...")``, the original chained."""
    if isinstance(exc, PeftspecError):
        if not getattr(exc, "peftspec_blamed", False):
            exc.args = (f"{ctx}: {exc}", *exc.args[1:])
            exc.peftspec_blamed = True
        raise exc
    if isinstance(exc, refusals):
        new: PeftspecError = PluginInputError(f"{refused}: {exc}")
    else:
        new = PluginError(
            f"{failed}: {type(exc).__name__}: {exc}. This is the plugin failing, not the "
            "spec being wrong: if the message does not say what to do, report it to the "
            "plugin's authors (PEFTSPEC_DEBUG=1 prints the traceback)")
    new.peftspec_blamed = True
    raise new from exc


def plugin_hook(registry, hook: str, file: str | None, **kwargs):
    """Call the pluggy hook ``hook`` (``check_plan``, ``after_apply``) with
    ``kwargs``. An exception is reported as described in the module docstring,
    naming the plugin whose implementation raised (found in the traceback) and
    the spec; with no implementation registered nothing is called."""
    caller = getattr(registry.pm.hook, hook)
    impls = caller.get_hookimpls()
    if not impls:
        return []
    try:
        return caller(**kwargs)
    except Exception as exc:
        if isinstance(exc, PeftspecError) and getattr(exc, "peftspec_blamed", False):
            raise
        codes = {getattr(i.function, "__code__", None): i for i in impls}
        tb, impl = exc.__traceback__, None
        while tb is not None:  # the innermost implementation on the stack raised
            impl = codes.get(tb.tb_frame.f_code, impl)
            tb = tb.tb_next
        name = impl.plugin_name if impl is not None else "<unknown>"
        ctx = (f"plugin {name.split(':', 1)[0]!r} ({name.split(':', 1)[-1]}), "
               f"hook {hook}, spec {file or '<spec>'}")
        _raise_blamed(exc, ctx, f"{ctx} refused", f"{ctx} failed", REFUSALS)


def owner(records, name: str):
    """The record whose target is the longest prefix of the dotted ``name`` (a module
    path), or ``None``."""
    best = None
    for rec in records:
        t = rec.step.target
        if t == "" or name == t or name.startswith(t + "."):
            if best is None or len(t) >= len(best.step.target):
                best = rec
    return best
