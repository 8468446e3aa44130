"""File formats over the core: peftspec's own adapter file (``adapter_file``:
self-describing safetensors, saved atomically, loaded all-or-nothing), HF
PEFT's adapter folders both ways (``hf_peft``), and llama.cpp's LoRA GGUF
(``gguf_export``, ``gguf_file``).

Imports: :mod:`peftspec.core` only; independent of :mod:`peftspec.models`.
"""
