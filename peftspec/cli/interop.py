"""``peftspec export`` and ``peftspec import``: HF PEFT's adapter folders, and
llama.cpp's LoRA adapter GGUF files (export only).

The work is done by :mod:`peftspec.formats.hf_peft` and :mod:`peftspec.formats.gguf_export`.
"""

from __future__ import annotations

from pathlib import Path

import click

from peftspec.formats.hf_peft import CONFIG_FILE, TASK_TYPES, WEIGHTS_FILE
from peftspec.cli.common import MODEL_HELP, err, human_bytes, out, registry
from peftspec.formats.gguf_export import export_gguf
from peftspec.formats.hf_peft import export_hf_peft
from peftspec.formats.hf_peft import import_hf_peft


@click.command("export")
@click.argument("adapter", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["hf-peft", "gguf"]), default="hf-peft",
              show_default=True, help="hf-peft: an HF PEFT folder; gguf: a llama.cpp LoRA "
                                      "adapter file")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help=f"hf-peft: folder to write {CONFIG_FILE} and {WEIGHTS_FILE} into; "
                   "gguf: the .gguf file to write")
@click.option("--model", "-m", default=None, metavar="M",
              help="the base model ('hf:PATH', 'py:pkg.module:factory' or 'default'); "
                   "required for gguf. hf-peft: optional, checks the adapter against it and "
                   "fills in its geometry; 'hf:PATH' becomes base_model_name_or_path")
@click.option("--task-type", default="auto", show_default=True,
              type=click.Choice(["auto", "none", *TASK_TYPES]),
              help="HF PEFT's task_type; auto: from the model's class (CAUSAL_LM for causal "
                   "LMs and for soft prompts)")
@click.option("--outtype", type=click.Choice(["f32", "f16"]), default="f32", show_default=True,
              help="gguf: the tensors' type")
def export_cmd(adapter: Path, fmt: str, out_dir: Path, model: str | None, task_type: str,
               outtype: str):
    """Write the peftspec ADAPTER file as an HF PEFT adapter folder, or (--format
    gguf) as a llama.cpp LoRA adapter.

    The folder loads with peft.PeftModel.from_pretrained(base, OUT). Several
    LoRA rules become one LoraConfig (rank_pattern / alpha_pattern); whole
    modules trained by [[train]] become modules_to_save. What HF PEFT cannot
    express (bottleneck adapters, BitFit-style parameter picks, several method
    types in one spec, rules differing in dropout/rslora/dora) is refused with
    exit code 2, naming the rule and option.

    With --format gguf the file loads in llama.cpp (--lora adapter.gguf) and
    Ollama (ADAPTER in a Modelfile) over the base model's GGUF: Llama models,
    LoRA only; rules differing in alpha or rslora are folded into one alpha.
    DoRA, other methods, soft prompts and [[train]] rules are refused (exit 2).

    \b
    Examples:
      peftspec export lora.safetensors --out hf-lora/ --model hf:./tiny-llama
      peftspec export lora.safetensors --format gguf --out lora.gguf --model smollm2
    """
    if fmt == "gguf":

        if model is None:
            raise click.UsageError("--format gguf needs --model (the base the adapter was "
                                   "trained on)")
        with err.status(f"loading model {model}..."):
            reg = registry()
            base = reg.load_model(model)
        path = export_gguf(adapter, out_dir, model=base, registry=reg, outtype=outtype)
        out.print(f"wrote {path} ({human_bytes(path.stat().st_size)}); use it with "
                  f"llama.cpp's --lora {path} or Ollama's ADAPTER line", soft_wrap=True)
        return

    if out_dir.exists() and not out_dir.is_dir():
        raise click.BadParameter(f"{out_dir} is a file; hf-peft writes a folder",
                                 param_hint="'--out'")

    export_hf_peft(adapter, out_dir, model=model, task_type=None if task_type == "none"
                   else task_type, registry=registry())
    size = (out_dir / WEIGHTS_FILE).stat().st_size
    out.print(f"wrote {out_dir / CONFIG_FILE} and {out_dir / WEIGHTS_FILE} "
              f"({human_bytes(size)})", soft_wrap=True)


@click.command("import")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--out", "out_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="peftspec adapter file to write (.safetensors)")
@click.option("--spec-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="where to write the equivalent spec (default: OUT with suffix .toml)")
@click.option("--model", "-m", default=None, metavar="M",
              help=MODEL_HELP + "; default: the config's base_model_name_or_path when it "
                                "is a local folder")
def import_cmd(src: Path, out_path: Path, spec_out: Path | None, model: str | None):
    """Convert the HF PEFT adapter folder SRC into a peftspec adapter file.

    SRC holds adapter_config.json and adapter_model.safetensors (a .bin pickle
    is refused: nothing is ever unpickled). Writes OUT and a readable TOML spec
    (one LoRA rule per distinct r/alpha; target_modules, exclude_modules,
    layers_to_transform and the patterns as selectors). Every tensor is
    checked by name and shape against the base first; on any problem nothing
    is written and the exit code is 2.

    \b
    Example:
      peftspec import hf-lora/ --out lora.safetensors --spec-out lora.toml \\
          --model hf:./tiny-llama
    """

    adapter, spec = import_hf_peft(src, out_path, spec_out, model=model, registry=registry())
    out.print(f"wrote {adapter} ({human_bytes(adapter.stat().st_size)}) and {spec}",
              soft_wrap=True)
