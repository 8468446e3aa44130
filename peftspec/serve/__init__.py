"""``peftspec serve``: one base model, many adapters, behind an OpenAI-compatible API.

* :mod:`peftspec.serve.adapters`: the served set (load, check, unload), files
  only from the adapter folder.
* :mod:`peftspec.serve.engine`: the scheduler thread that owns the model and
  decodes every active request together, one forward pass per step, each row
  through its own adapter (:func:`peftspec.core.rows.rows`); no web imports.
* :mod:`peftspec.serve.app`: the ASGI app (Starlette, from the ``serve``
  extra) and the uvicorn runner.
"""
