"""The codec layer: how one method's rules read and write HF PEFT's format.

A method plugin knows nothing of HF PEFT. A codec, registered through the
``register_hf_peft_codecs`` hook (the same plugin mechanism as methods, so a
third-party method can ship one), converts one method's rules:

* export: :meth:`HFPeftCodec.to_hf_peft` gets all rules of its method as
  :class:`~peftspec.formats.hf_peft.ExportRule` and returns
  ``context.part(peft_type, config, tensors)``;
* import: :attr:`HFPeftCodec.peft_types` lists the ``peft_type`` values it
  reads, and :meth:`HFPeftCodec.from_hf_peft` returns
  ``context.imported(rules, tensors)``;
* beside another method: a method HF PEFT expresses as fields of another
  method's config (trainable tokens as LoRA's ``trainable_token_indices``)
  lists those ``peft_type`` values in :attr:`~HFPeftCodec.beside_types` and the
  keys in :attr:`~HFPeftCodec.beside_keys`, with ``to_hf_peft_beside`` /
  ``from_hf_peft_beside``.

The built-in codecs live in ``peftspec_plugins.hf_peft`` (``plugins/hf_peft/``).
A method of an earlier release that still defines ``to_hf_peft`` /
``from_hf_peft`` / ``hf_peft_types`` on itself keeps working for one release
through :class:`MethodCodec`, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

HOOK = "register_hf_peft_codecs"


class HFPeftCodec:
    """Base class of a codec: subclass it, set :attr:`method`, register an instance.

    Class attributes:
        method: the peftspec method (its ``name``) whose rules this converts.
        peft_types: HF PEFT ``peft_type`` values :meth:`from_hf_peft` reads.
        beside_types: ``peft_type`` values of other methods' configs that can
            carry this method's rules (:meth:`to_hf_peft_beside`).
        beside_keys: the config keys that carry them; :meth:`from_hf_peft_beside`
            reads a config where one is set, and the main method sees them unset.
    """

    method: ClassVar[str]
    peft_types: ClassVar[tuple[str, ...]] = ()
    beside_types: ClassVar[tuple[str, ...]] = ()
    beside_keys: ClassVar[tuple[str, ...]] = ()

    def to_hf_peft(self, rules: list, context: Any) -> Any:
        """Describe this method's rules of one adapter in HF PEFT's terms.

        ``rules`` are :class:`~peftspec.formats.hf_peft.ExportRule` (options,
        targets, ``rule.tensor(name)``); return ``context.part(peft_type, config,
        tensors)`` with HF PEFT's config fields and tensor names, or ``None``
        when HF PEFT has no counterpart. Call ``context.refuse(message)`` for
        options it cannot express."""
        return None

    def from_hf_peft(self, config: dict, context: Any) -> Any:
        """Turn HF PEFT's ``adapter_config.json`` (a ``peft_type`` of
        :attr:`peft_types`) into spec rules and a tensor mapping: return
        ``context.imported(rules, tensors)`` (see
        :class:`~peftspec.formats.hf_peft.ImportContext`)."""
        raise NotImplementedError(f"the codec of {self.method!r} does not read HF PEFT adapters")

    def to_hf_peft_beside(self, rules: list, context: Any, main: Any) -> Any:
        """Add this method's rules to another method's HF PEFT config.

        Called when a spec mixes this method with one other exported method whose
        part ``main`` (an :class:`~peftspec.formats.hf_peft.HFPeftPart`) has a
        ``peft_type`` of :attr:`beside_types`; return ``context.part(
        main.peft_type, config_fields, tensors)`` with the fields and tensors to
        add, or ``None`` when this config cannot carry them."""
        return None

    def from_hf_peft_beside(self, config: dict, context: Any) -> Any:
        """Read this method's rules out of another method's config (one of
        :attr:`beside_keys` is set): return ``context.imported(rules, tensors)``."""
        raise NotImplementedError(f"the codec of {self.method!r} does not read HF PEFT adapters")


_LEGACY = ("to_hf_peft", "from_hf_peft", "hf_peft_types", "to_hf_peft_beside",
           "from_hf_peft_beside", "hf_peft_beside_types", "hf_peft_beside_keys")


def _defines_legacy(method: object) -> bool:
    """Whether ``method``'s class (not the base :class:`~peftspec.core.method.Method`)
    defines the HF PEFT members that methods carried before the codec layer."""
    return any(name in vars(cls) for cls in type(method).__mro__[:-1]
               for name in _LEGACY if cls.__module__ != "peftspec.core.method")


class MethodCodec(HFPeftCodec):
    """A codec over a method that carries the pre-codec HF PEFT members itself
    (deprecated: move them to an :class:`HFPeftCodec`, registered through
    ``register_hf_peft_codecs``)."""

    def __init__(self, method: Any):
        self._of = method
        self.method = method.name
        self.peft_types = tuple(getattr(method, "hf_peft_types", ()))
        self.beside_types = tuple(getattr(method, "hf_peft_beside_types", ()))
        self.beside_keys = tuple(getattr(method, "hf_peft_beside_keys", ()))

    def to_hf_peft(self, rules, context):
        fn = getattr(self._of, "to_hf_peft", None)
        return fn(rules, context) if fn else None

    def from_hf_peft(self, config, context):
        fn = getattr(self._of, "from_hf_peft", None)
        return fn(config, context) if fn else super().from_hf_peft(config, context)

    def to_hf_peft_beside(self, rules, context, main):
        fn = getattr(self._of, "to_hf_peft_beside", None)
        return fn(rules, context, main) if fn else None

    def from_hf_peft_beside(self, config, context):
        fn = getattr(self._of, "from_hf_peft_beside", None)
        return fn(config, context) if fn else super().from_hf_peft_beside(config, context)


def _legacy(registry, name: str) -> HFPeftCodec | None:
    method = registry.method(name)
    if not _defines_legacy(method):
        return None
    warnings.warn(f"method {name!r} ({registry.methods[name].dist}) carries HF PEFT "
                  "conversion itself (to_hf_peft / from_hf_peft / hf_peft_types); move it "
                  "to a peftspec.plugin_api.HFPeftCodec registered with "
                  "register_hf_peft_codecs: the old members stop working in the next "
                  "release", DeprecationWarning, stacklevel=3)
    return MethodCodec(method)


def codec_for(registry, method_name: str) -> HFPeftCodec | None:
    """The codec of method ``method_name``, or ``None`` when none is installed."""
    info = registry.codecs.get(method_name)
    return info.codec if info is not None else _legacy(registry, method_name)


def all_codecs(registry) -> list[HFPeftCodec]:
    """Every installed codec (legacy ones included), in method-name order."""
    out = []
    for name in sorted(registry.methods):
        codec = codec_for(registry, name)
        if codec is not None:
            out.append(codec)
    return out


def codec_reading(registry, peft_type: str) -> HFPeftCodec | None:
    """The codec that reads HF PEFT's ``peft_type``, or ``None``."""
    return next((c for c in all_codecs(registry) if peft_type in c.peft_types), None)
