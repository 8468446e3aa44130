"""The kit's ``buffers`` check: the buffers an adapter adds round-trip.

The contract (docs/plugins.md, :mod:`peftspec.core.buffers`): a buffer on a
module ``apply`` builds is adapter state; a persistent one is saved with the
adapter and copied back on load, a non-persistent one is recomputed by
``apply``, so it must come out the same; none stays when the adapter is off.
"""

from __future__ import annotations

import torch

from peftspec.core.buffers import adapter_buffers
from peftspec.testing.report import Skip, expect

# load_adapter re-applies under another seed than the first apply: a buffer drawn
# from the random generator, not saved, then differs, as it would for a user
OTHER_SEED = 7919


def check_buffers(c) -> str:
    """Run on a ``peftspec.testing.checks.Checks`` whose adapter was saved (``c.file``)."""
    ps, model = c.ps, c.base
    mine = {n: (t.detach().clone(), persistent)
            for n, (t, persistent) in adapter_buffers(model).items()}
    if not mine:
        raise Skip("the adapter registers no buffers")
    with ps.disabled(model):
        left = sorted(set(mine) & {n for n, _ in model.named_buffers()})
    expect(not left, f"buffer(s) {left[:3]} stay in the model when the adapter is switched "
                     "off: register them on a module apply builds, or remove them in detach")
    fresh = c.fresh()
    torch.manual_seed(c.seed + OTHER_SEED)
    ps.load_adapter(fresh, c.file, registry=c.reg)
    theirs = adapter_buffers(fresh)
    missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
    expect(not missing and not extra, f"after save and load the adapter's buffers differ in "
                                      f"names: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, (t, persistent) in mine.items():
        u, persistent_now = theirs[name]
        kind = "persistent" if persistent else "non-persistent"
        expect(persistent_now == persistent, f"buffer '{name}' is {kind} after apply, not after "
                                             "load: register it the same way each time")
        same = t.shape == u.shape and t.dtype == u.dtype and torch.equal(t, u.detach())
        if not persistent:
            expect(same, f"non-persistent buffer '{name}' differs after save and load: it is "
                         "not saved, so apply must recompute it the same (derive it from the "
                         "options and the base, or seed it); or register it persistent "
                         "(register_buffer's default) so that the adapter file keeps it")
        expect(same, f"persistent buffer '{name}' differs after save and load (shape "
                     f"{list(u.shape)} vs {list(t.shape)}): it is saved with the adapter; does "
                     "a load_adapter_state() overwrite it, or training change it after save?")
    n_saved = sum(p for _, p in mine.values())
    return (f"{len(mine)} buffer(s): {n_saved} persistent, saved; "
            f"{len(mine) - n_saved} non-persistent, recomputed")
