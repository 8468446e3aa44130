"""Finding, loading and indexing plugins.

Built-in methods live in the ``peftspec_plugins`` package (the repository's
``plugins/`` folder) and are registered through the same ``peftspec``
entry-point group as a third party's. ``PEFTSPEC_DISABLE_PLUGIN_AUTOLOAD=1``
loads only the entry points of the ``peftspec`` distribution itself.

A plugin that fails to import, fails ``check_pending`` (a misspelled hook), or
raises while registering is recorded as a :class:`LoadFailure` naming its
distribution; the other plugins keep working.

There is no plugin manager built at import time: :func:`build_registry` makes
a fresh one, and :func:`get_registry` caches one for the CLI and the
convenience API.
"""

from __future__ import annotations

import importlib
import inspect
import os
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Iterable

import pluggy

from peftspec.core import hookspecs
from peftspec.core.capabilities import Mergeable
from peftspec.core.errors import ModelSourceError, PluginError, did_you_mean
from peftspec.core.method import FAMILIES, Method
from peftspec.core.options import options_problem

GROUP = "peftspec"
OWN_DIST = "peftspec"
DISABLE_ENV = "PEFTSPEC_DISABLE_PLUGIN_AUTOLOAD"


@dataclass(frozen=True)
class MethodInfo:
    method: Method
    dist: str  # distribution that provides it ("<local>" for in-process plugins)


@dataclass(frozen=True)
class CodecInfo:
    codec: Any  # a peftspec.formats.hf_peft.codec.HFPeftCodec
    dist: str


@dataclass(frozen=True)
class SourceInfo:
    prefix: str
    loader: Callable[[str], Any]
    help: str
    dist: str


@dataclass(frozen=True)
class LoadFailure:
    dist: str
    entry_point: str
    error: str

    def __str__(self) -> str:
        return f"plugin {self.entry_point!r} from distribution {self.dist!r} was not loaded: {self.error}"


@dataclass(frozen=True)
class EmptyPlugin:
    """A plugin that loaded but registered nothing (no method, source or other hook)."""

    dist: str
    entry_point: str
    reason: str

    def __str__(self) -> str:
        return (f"plugin {self.entry_point!r} from distribution {self.dist!r} registered "
                f"nothing: {self.reason}")


@dataclass
class Registry:
    """Plugin manager plus the methods and model sources the plugins registered."""

    pm: pluggy.PluginManager
    methods: dict[str, MethodInfo] = field(default_factory=dict)
    sources: dict[str, SourceInfo] = field(default_factory=dict)
    codecs: dict[str, CodecInfo] = field(default_factory=dict)  # by method name
    failures: list[LoadFailure] = field(default_factory=list)
    empty: list[EmptyPlugin] = field(default_factory=list)

    def method(self, name: str) -> Method:
        try:
            return self.methods[name].method
        except KeyError:
            hint = did_you_mean(name, self.methods)
            raise PluginError(f"unknown method {name!r}" + (f" ({hint})" if hint else "")) from None

    def method_names(self, family: str | None = None) -> list[str]:
        return sorted(n for n, i in self.methods.items()
                      if family is None or i.method.family == family)

    def load_model(self, source: str | None, *, num_labels: int | None = None):
        """Resolve a ``--model`` string (``None`` = the built-in default).

        ``num_labels``: build the model's sequence classification variant with
        that many classes (the loader must accept ``num_labels``)."""
        source = source or "default"
        prefix, _, rest = source.partition(":")
        if prefix not in self.sources:
            known = ", ".join(f"{p}:" if p != "default" else p for p in sorted(self.sources))
            raise ModelSourceError(
                f"unknown model source {source!r}: expected one of {known} "
                "(e.g. 'hf:./my-model' or 'py:my_pkg.models:build')")
        info = self.sources[prefix]
        if num_labels is None:
            return info.loader(rest)
        try:
            accepts = "num_labels" in inspect.signature(info.loader).parameters
        except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
            accepts = False
        if not accepts:
            raise ModelSourceError(
                f"model source '{prefix}' (from {info.dist!r}) cannot build a sequence "
                "classifier: its loader takes no num_labels; use --model default or hf:PATH")
        return info.loader(rest, num_labels=num_labels)


def build_registry(*, autoload: bool | None = None, plugins: Iterable[object] = ()) -> Registry:
    """Make a fresh plugin manager and index what its plugins register.

    Args:
        autoload: load third-party entry points; defaults to ``True`` unless
            ``PEFTSPEC_DISABLE_PLUGIN_AUTOLOAD`` is set to a non-empty value.
        plugins: extra in-process plugin objects (tests, notebooks).
    """
    if autoload is None:
        autoload = os.environ.get(DISABLE_ENV, "") in ("", "0")
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    reg = Registry(pm)
    dist_of: dict[int, str] = {}

    eps = sorted(metadata.entry_points(group=GROUP),
                 key=lambda ep: (ep.dist is None or ep.dist.name != OWN_DIST, ep.name))
    seen: set[str] = set()
    for ep in eps:
        dist = ep.dist.name if ep.dist is not None else "<unknown>"
        if (dist, ep.name) in seen:  # the same dist found twice on sys.path
            continue
        seen.add((dist, ep.name))
        if dist != OWN_DIST and not autoload:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break others
            reg.failures.append(LoadFailure(dist, ep.name, f"import failed: {exc!r}"))
            continue
        _register(reg, plugin, ep.name, dist, dist_of)
    for plugin in plugins:
        _register(reg, plugin, getattr(plugin, "__name__", repr(plugin)),
                  getattr(plugin, "__peftspec_dist__", "<local>"), dist_of)

    added: dict[int, int] = {}  # id(plugin) -> methods and sources it registered
    for impl in pm.hook.register_methods.get_hookimpls():
        dist = dist_of.get(id(impl.plugin), "<unknown>")
        _call_register(reg, impl, dist, lambda m, dist=dist, impl=impl: _counted(
            reg, impl, added, lambda: _add_method(reg, m, dist)))
    for impl in pm.hook.register_hf_peft_codecs.get_hookimpls():  # after every method
        dist = dist_of.get(id(impl.plugin), "<unknown>")
        _call_register(reg, impl, dist, lambda c, dist=dist, impl=impl: _counted(
            reg, impl, added, lambda: _add_codec(reg, c, dist)))
    for impl in pm.hook.register_model_sources.get_hookimpls():
        dist = dist_of.get(id(impl.plugin), "<unknown>")
        _call_register(reg, impl, dist,
                       lambda prefix, loader, help="", dist=dist, impl=impl: _counted(
                           reg, impl, added,
                           lambda: _add_source(reg, prefix, loader, help, dist)))
    _find_empty(reg, dist_of, added)
    return reg


def _counted(reg: Registry, impl, added: dict, add: Callable) -> None:
    """Run one ``register(...)`` call; a bad item is recorded against its plugin's
    distribution and the plugin's other items still register."""
    try:
        add()
    except PluginError as exc:
        reg.failures.append(LoadFailure(_dist_of_impl(impl), _entry_point(impl), str(exc)))
        return
    added[id(impl.plugin)] = added.get(id(impl.plugin), 0) + 1


def _dist_of_impl(impl) -> str:
    return impl.plugin_name.split(":", 1)[0] if ":" in impl.plugin_name else "<unknown>"


def _entry_point(impl) -> str:
    return impl.plugin_name.split(":", 1)[-1]


_REGISTERING = ("register_methods", "register_hf_peft_codecs", "register_model_sources")


def _find_empty(reg: Registry, dist_of: dict, added: dict) -> None:
    """Record every loaded plugin that contributed nothing, with the likely cause.

    A module whose hook function lacks ``@hookimpl`` loads without error and
    pluggy silently ignores the function: the spec then only says "unknown
    method". Naming the unmarked function here turns that into a one-line fix.
    """
    spec_names = {n for n in dir(hookspecs) if callable(getattr(hookspecs, n, None)) and
                  hasattr(getattr(hookspecs, n), "peftspec_spec")}
    for name, plugin in reg.pm.list_name_plugin():
        if id(plugin) not in dist_of or name is None:
            continue
        dist, _, entry = name.partition(":")
        callers = {c.name for c in (reg.pm.get_hookcallers(plugin) or [])}
        if callers - set(_REGISTERING) or added.get(id(plugin)):
            continue  # check_plan/after_apply/commands, or it registered something
        if any(f.dist == dist and f.entry_point == entry for f in reg.failures):
            continue  # already reported as a failure
        unmarked = sorted(n for n in spec_names if callable(getattr(plugin, n, None)) and
                          not hasattr(getattr(plugin, n), "peftspec_impl"))
        if unmarked:
            reason = (", ".join(f"function {n}()" for n in unmarked) + " is not marked with "
                      "@peftspec.hookimpl, so pluggy ignores it: decorate it")
        elif callers:
            reason = (" and ".join(sorted(callers)) + " ran but called register() "
                      "for nothing")
        else:
            reason = ("it has no @peftspec.hookimpl functions (is the entry point the "
                      "module that defines them?)")
        reg.empty.append(EmptyPlugin(dist, entry, reason))


def _register(reg: Registry, plugin: object, name: str, dist: str, dist_of: dict) -> None:
    pm = reg.pm
    if pm.is_registered(plugin):
        return
    try:
        pm.register(plugin, name=f"{dist}:{name}")
        pm.check_pending()
    except Exception as exc:  # noqa: BLE001
        if pm.is_registered(plugin):
            pm.unregister(plugin)
        reg.failures.append(LoadFailure(dist, name, f"registration failed: {exc}"))
        return
    dist_of[id(plugin)] = dist


def _call_register(reg: Registry, impl, dist: str, register: Callable) -> None:
    try:
        impl.function(register=register)
    except Exception as exc:  # noqa: BLE001
        reg.failures.append(LoadFailure(dist, impl.plugin_name.split(":", 1)[-1],
                                        f"{impl.function.__name__} raised {exc!r}"))


def _add_method(reg: Registry, method: Method, dist: str) -> None:
    if not isinstance(method, Method):
        raise PluginError(f"register() takes a peftspec.Method instance, got {method!r}"
                          + (" (a class: register an instance, MyMethod())"
                             if isinstance(method, type) else ""))
    name = getattr(method, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"method {method!r} has no name")
    if getattr(method, "family", None) not in FAMILIES:
        raise PluginError(f"method {name!r} has family {getattr(method, 'family', None)!r}; "
                          f"expected one of {', '.join(FAMILIES)}")
    why = options_problem(method.Options)
    if why:
        raise PluginError(f"method {name!r}: {why}")
    if method.mergeable and not isinstance(method, Mergeable) and method.family != "train":
        raise PluginError(f"method {name!r} says mergeable = True but does not implement "
                          "merge(installed, original)")
    if name in reg.methods:
        raise PluginError(f"method {name!r} is already provided by "
                          f"{reg.methods[name].dist!r}")
    reg.methods[name] = MethodInfo(method, dist)


def _add_codec(reg: Registry, codec: Any, dist: str) -> None:
    if isinstance(codec, type):
        raise PluginError(f"register() takes a codec instance, got the class {codec!r} "
                          "(register an instance, MyCodec())")
    name = getattr(codec, "method", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"codec {codec!r} names no method (set its class attribute "
                          "method = 'NAME')")
    if name not in reg.methods:
        hint = did_you_mean(name, reg.methods)
        raise PluginError(f"codec {codec!r} is for method {name!r}, which no installed "
                          "plugin provides" + (f" ({hint})" if hint else ""))
    if name in reg.codecs:
        raise PluginError(f"an HF PEFT codec for method {name!r} is already provided by "
                          f"{reg.codecs[name].dist!r}")
    reg.codecs[name] = CodecInfo(codec, dist)


def _add_source(reg: Registry, prefix: str, loader: Callable, help: str, dist: str) -> None:
    if prefix in reg.sources:
        raise PluginError(f"model source {prefix!r} is already provided by "
                          f"{reg.sources[prefix].dist!r}")
    reg.sources[prefix] = SourceInfo(prefix, loader, help, dist)


_cached: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use (not at import)."""
    global _cached
    if _cached is None:
        _cached = build_registry()
        for failure in _cached.failures:
            warnings.warn(str(failure), RuntimeWarning, stacklevel=2)
    return _cached


def registry_or_default(registry: Registry | None) -> Registry:
    """``registry``, or the process-wide one (:func:`get_registry`) when it is
    ``None``: the one fallback every public entry point uses for its
    ``registry=None`` argument."""
    return get_registry() if registry is None else registry


def reset_registry() -> None:
    """Forget the cached registry (after installing a plugin at run time)."""
    global _cached
    _cached = None
    importlib.invalidate_caches()
