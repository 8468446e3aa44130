"""``peftspec chat``: talk to a model (and an adapter) with the framing it trained on.

An interactive loop over :func:`peftspec.generate.generate`: each turn is
answered with the whole conversation so far rendered by the chat template,
the answer streamed as it is decoded. Works on a terminal and with piped
stdin (one user turn a line).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from peftspec.cli.common import MODEL_HELP, err, registry
from peftspec.generate import GenerateError, Prompt, generate as run, load

HELP = "/reset: start over   /exit (or Ctrl-D): leave"


@click.command()
@click.option("--model", "-m", "model_source", default=None, metavar="M", help=MODEL_HELP)
@click.option("--adapter", "-a", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="an adapter file to answer with (default: the base model)")
@click.option("--system", default=None, metavar="TEXT", help="a system prompt")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0: greedy; above 0: sample")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0,
              show_default=True, help="nucleus sampling (with --temperature)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed for sampling")
def chat(model_source: str | None, adapter: Path | None, system: str | None,
         max_new_tokens: int, temperature: float, top_p: float, seed: int):
    """Chat with a model and, with --adapter, the adapter on it.

    \b
    Each answer sees the whole conversation, rendered with the model's chat
    template as `peftspec train` renders {"messages"} records, and streams as
    it is generated. Type a message and press Enter.
    \b
      /reset   forget the conversation (the system prompt stays)
      /exit    leave (Ctrl-D too)
    \b
    Piped stdin works too, one user turn a line:
      printf 'Where is Brindlecombe?\\nWho founded it?\\n' | peftspec chat --model smollm2 -a chat.safetensors
    """
    reg = registry()
    with err.status(f"loading model {model_source or 'default'}..."):
        session = load(model_source, [adapter] if adapter else [], registry=reg)
    if not getattr(session.tokenizer, "has_chat_template", False):
        raise GenerateError(f"the model {model_source or 'default'} has no chat template; "
                            "`peftspec generate --raw` feeds text as it is")
    tty = sys.stdin.isatty()
    name = session.names[0] if session.names else None
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    if tty:
        err.print(f"chatting with {model_source or 'default'}"
                  f"{' + ' + name if name else ''}; {HELP}")
    while True:
        try:
            line = input("you> " if tty else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(start)
            err.print("(the conversation starts over)")
            continue
        history.append({"role": "user", "content": text})
        printed = [""]

        def stream(answers, printed=printed):
            if not answers:
                return
            now = answers[-1].text
            if now.startswith(printed[0]) and len(now) > len(printed[0]):
                sys.stdout.write(now[len(printed[0]):])
                sys.stdout.flush()
                printed[0] = now

        sys.stdout.write("assistant> " if tty else "")
        answer = run(session.model, session.tokenizer,
                     [Prompt(text, messages=tuple(history))], adapters=[name],
                     max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                     seed=seed, batch_size=1, on_update=stream)[0]
        stream([answer])
        sys.stdout.write(("" if answer.finished else " …") + "\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": answer.text})
