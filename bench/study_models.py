"""The study's tiny model, as a ``py:`` model source for ``peftspec compare``:
``--model py:study_models:pretrained_tiny`` with ``bench/`` on ``PYTHONPATH``.

It is the built-in default model (a 0.86M-parameter byte-level nanoGPT)
after the brief pretraining ``bench/study.py`` gives it on the reference
text: every parameter trained (``[[train]] params = ["**"]``) and merged
back, read from the adapter file ``$PEFTSPEC_STUDY_TINY`` names. A toy that
has seen a few kilobytes of English, not a language model; the study labels
it so.
"""

from __future__ import annotations

import os


def pretrained_tiny():
    import peftspec

    path = os.environ.get("PEFTSPEC_STUDY_TINY")
    if not path or not os.path.isfile(path):
        raise peftspec.PeftspecError(
            "py:study_models:pretrained_tiny reads the pretrained weights from the adapter "
            "file $PEFTSPEC_STUDY_TINY names; run bench/study.py, which writes it")
    model = peftspec.load_model(None)
    peftspec.load_adapter(model, path)
    return peftspec.merge(model)
