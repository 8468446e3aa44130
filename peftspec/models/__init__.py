"""Model sources' loaders: local transformers folders (``hf``), GGUF files and
their safetensors cache (``gguf``, ``cache``), a plain-torch Llama that needs no
transformers (``native``, ``native_llama``), the built-in nanoGPT default
(``nanogpt``), and the tokenizers (``tokenizer``, ``native_tokenizer``).

Imports: :mod:`peftspec.core` only; independent of :mod:`peftspec.formats`.
"""
