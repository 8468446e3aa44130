"""Talking to the result with the same framing (issue 24, point 9):
``generate --messages`` and ``peftspec chat`` on a real pseudo-terminal and
with piped stdin."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from peftspec.cli import cli
from test_data_cli import needs_smollm2

CONVERSATION = {"messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello."},
                             {"role": "user", "content": "Where is Marrowgate?"},
                             {"role": "assistant", "content": "In Brindlecombe."}]}


def test_read_conversations_answers_the_last_user_turn(tmp_path):
    from peftspec.generate import read_conversations

    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(CONVERSATION) + "\n", encoding="utf-8")
    [p] = read_conversations(str(path))
    assert p.text == "Where is Marrowgate?" and p.expected == "In Brindlecombe."
    assert [m["role"] for m in p.messages] == ["system", "user", "assistant", "user"]


@needs_smollm2
def test_generate_messages_starts_from_the_rendered_history(tmp_path, tiny_chat_model):
    from peftspec.generate import Prompt, prompt_ids
    from peftspec.models.tokenizer import tokenizer_of_source

    tok = tokenizer_of_source(f"hf:{tiny_chat_model}")
    history = CONVERSATION["messages"][:4]
    ids = prompt_ids(tok, Prompt("Where is Marrowgate?", messages=tuple(history)))
    assert ids == tok.tok.apply_chat_template(history, add_generation_prompt=True,
                                              tokenize=True, return_dict=False)
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(CONVERSATION) + "\n", encoding="utf-8")
    r = CliRunner().invoke(cli, ["generate", "--model", f"hf:{tiny_chat_model}", "--messages",
                                 str(path), "--max-new-tokens", "3", "--json"])
    assert r.exit_code == 0, r.output
    [answer] = json.loads(r.stdout)["answers"]
    assert answer["prompt"] == "Where is Marrowgate?" and answer["expected"] == "In Brindlecombe."
    assert answer["new_tokens"] >= 1


def _peftspec(*args):
    return [sys.executable, "-c", "from peftspec.cli import main; main()", *args]


@needs_smollm2
@pytest.mark.slow
def test_chat_on_a_pseudo_terminal(tiny_chat_model):
    main, child = pty.openpty()
    proc = subprocess.Popen(_peftspec("chat", "--model", f"hf:{tiny_chat_model}",
                                      "--max-new-tokens", "4"),
                            stdin=child, stdout=child, stderr=child, close_fds=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb"})
    os.close(child)
    seen = b""

    def until(marker: bytes, timeout=120):
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen:
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            ready, _, _ = select.select([main], [], [], 1)
            if ready:
                try:
                    seen += os.read(main, 4096)
                except OSError:
                    break
        return seen

    try:
        until(b"you> ")
        os.write(main, b"Hello there\n")
        until(b"assistant> ")
        seen = b""
        until(b"you> ")
        os.write(main, b"/reset\n")
        until(b"starts over")
        os.write(main, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)


@needs_smollm2
@pytest.mark.slow
def test_chat_with_piped_stdin_answers_each_line_and_ends_at_eof(tiny_chat_model):
    r = subprocess.run(_peftspec("chat", "--model", f"hf:{tiny_chat_model}",
                                 "--max-new-tokens", "3"),
                       input="first question\n\nsecond question\n", capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") >= 2  # an answer, ended by a newline, per non-blank line
    assert "Traceback" not in r.stderr


def test_chat_needs_a_chat_template():
    r = CliRunner().invoke(cli, ["chat"], input="hi\n")
    assert r.exit_code == 2 and "has no chat template" in r.output
