"""Batched evaluation (zopeft.batched): the N+1 perturbed losses of a step in one forward pass.

Tolerances.  The batched path computes the same function as the sequential one, but with
different kernel shapes: the base matmuls see R·b rows instead of b, the LoRA terms are
``torch.bmm`` instead of ``F.linear``, and the vocabulary projection runs only at labelled
positions (``logits_to_keep``).  fp32 rounding then differs at the 1e-7 relative level, hence
``rtol=1e-5`` on the losses.  The same holds for the quantized bases: bitsandbytes 4-bit
dequantizes the (frozen, shared) weight to fp32 and runs an fp32 matmul, so only the GEMM
blocking differs; 8-bit quantizes every input row with its own absmax and multiplies in
int8 with int32 accumulation (exact), so rows do not interact - except through the set of
outlier columns (|x| > threshold, 6.0), which is taken over all rows of one forward and may
grow with more replicas; the perturbed replicas differ by ε-sized amounts, so in practice the
set is the same (the tiny model here gives the same losses to ~1e-7).

FZOO divides the loss differences by σ (their spread, ~1e-3 here), which amplifies a loss
rounding error δ into a coefficient error δ/σ; the updates are therefore compared relative
to their own size (1e-3), not elementwise at fp32 resolution.  δ is the CPU's rounding (about
2e-7 here, on an AVX2 EPYC and with its kernels held to SSE4 alike), so each adapter gets an ε
whose σ keeps the comparison's bound 10·√N·δ/σ far below its limit 0.05 on any CPU: at ε = 1e-2
prompt tuning, prefix tuning and IA3 move the loss by only ~1e-4 (bounds up to 0.05 measured).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import VOCAB, fixed_batch, saved_tiny_model, tiny_model
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

import zopeft
from zopeft.batched import BatchedLoss, batched_support, loss_closure
from zopeft.optim.evaluation_log import evaluation_path

ADAPTERS = {
    "lora": lambda tt: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type=tt),
    "lora_bias": lambda tt: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_bias=True, task_type=tt),
    "prefix": lambda tt: PrefixTuningConfig(num_virtual_tokens=4, task_type=tt),
    "prefix_proj": lambda tt: PrefixTuningConfig(
        num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=32, task_type=tt
    ),
    "prompt": lambda tt: PromptTuningConfig(num_virtual_tokens=4, task_type=tt),
    "ia3": lambda tt: IA3Config(task_type=tt),  # init 1: perturbations of ε change the loss
    "dora": lambda tt: LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, task_type=tt),
}
LR, EPS, N = 1e-3, 1e-2, 5
EPS_OF = {"prefix": 1e-1, "prompt": 1e-1, "ia3": 1e-1}  # adapters whose loss moves little at EPS (docstring)


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """These tests seed torch; later test modules must see the global RNG as if they had not run."""
    state = torch.random.get_rng_state()
    yield
    torch.random.set_rng_state(state)


@pytest.fixture(autouse=True, scope="module")
def _leave_the_model_cache_as_found():
    """Creating a cached tiny model seeds torch: leave that to whichever later test would have done it."""
    empty = saved_tiny_model.cache_info().currsize == 0
    yield
    if empty:
        saved_tiny_model.cache_clear()


def peft_model(arch: str, adapter: str, quant: str | None = None):
    saved_tiny_model(arch)  # its random init must not shift the adapter's seed
    torch.manual_seed(0)
    tt = TaskType.SEQ_CLS if arch == "bert" else TaskType.CAUSAL_LM
    model = get_peft_model(tiny_model(arch, quant), ADAPTERS[adapter](tt))
    if adapter.startswith("lora"):  # B = 0 at init would make every LoRA perturbation of A invisible
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    return model


def padded_batch(arch: str = "llama") -> dict[str, torch.Tensor]:
    """Right-padded rows of different lengths; loss only on the last two real tokens (MeZO-style)."""
    batch = fixed_batch(arch, batch=3, length=10, seed=5)
    lengths = [10, 7, 5]
    for i, n in enumerate(lengths):
        batch["attention_mask"][i, n:] = 0
        batch["input_ids"][i, n:] = 0
    if arch != "bert":
        labels = torch.full_like(batch["input_ids"], -100)
        for i, n in enumerate(lengths):
            labels[i, n - 2 : n] = batch["input_ids"][i, n - 2 : n]
        batch["labels"] = labels
    return batch


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def one_step(model, batch, *, batched: bool, name: str = "fzoo", **kw):
    """One step from the model's current weights; returns (losses, update, optimizer); the weights are put back."""
    start = trainable(model)
    opt_kw = {"lr": LR, "eps": EPS, "seed": 7, "batched": batched, **kw}
    if name == "fzoo":
        opt_kw["n_perturbations"] = N
    opt = zopeft.get_optimizer(name, model, **opt_kw)
    opt.step(loss_closure(model, batch))
    assert evaluation_path(opt) == ("batched" if batched else None), "the batched path fell back to sequential"
    update = {n: p.detach() - start[n] for n, p in model.named_parameters() if n in start}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in start:
                p.copy_(start[n])
    return opt.step_log[-1]["losses"], update, opt


def assert_same_step(model, batch, loss_rtol=1e-5, **kw):
    seq_losses, seq_update, seq_opt = one_step(model, batch, batched=False, **kw)
    bat_losses, bat_update, bat_opt = one_step(model, batch, batched=True, **kw)
    assert all(map(math.isfinite, seq_losses))
    assert len(set(seq_losses)) > 1, "perturbations must change the loss for the comparison to mean anything"
    torch.testing.assert_close(torch.tensor(bat_losses), torch.tensor(seq_losses), rtol=loss_rtol, atol=0)
    num = math.sqrt(sum(float((bat_update[n] - seq_update[n]).pow(2).sum()) for n in seq_update))
    den = math.sqrt(sum(float(seq_update[n].pow(2).sum()) for n in seq_update))
    # the update is a function of the losses: its error is the loss error δ amplified by 1/σ (FZOO) or 1/ε (MeZO)
    delta = max(abs(a - b) for a, b in zip(bat_losses, seq_losses))
    scale = zopeft.FZOO.sigma(seq_losses) if len(seq_losses) > 2 else abs(seq_losses[0] - seq_losses[1])
    bound = 1e-5 + 10 * math.sqrt(len(seq_losses)) * delta / scale
    assert bound < 0.05, f"loss error {delta} is too large next to σ {scale} for the update comparison to mean anything"
    assert den > 0 and num <= bound * den, (num, den, delta, scale)
    assert bat_opt.forward_passes == seq_opt.forward_passes == len(seq_losses)
    return seq_losses, bat_losses


SUPPORTED = [
    ("llama", "lora", None), ("llama", "lora", "nf4"), ("llama", "lora", "fp4"), ("llama", "lora", "int8"),
    ("llama", "lora_bias", None), ("llama", "prefix", None), ("llama", "prefix", "nf4"), ("llama", "prefix_proj", None),
    ("llama", "prompt", None), ("llama", "prompt", "int8"), ("llama", "ia3", None), ("llama", "ia3", "nf4"),
    ("opt", "lora", None), ("opt", "prefix", None), ("bert", "lora", None), ("bert", "prompt", None),
    ("bert", "ia3", None),
]


@pytest.mark.parametrize("arch,adapter,quant", SUPPORTED)
def test_batched_losses_and_update_equal_sequential(arch, adapter, quant, caplog):
    model = peft_model(arch, adapter, quant)
    batch = fixed_batch(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert batched_support(model, zopeft.FZOO(model, n_perturbations=2), batch) is None
    with caplog.at_level(logging.INFO, logger="zopeft"):
        assert_same_step(model, batch, eps=EPS_OF.get(adapter, EPS))
    assert any("batched evaluation" in r.message for r in caplog.records)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # incl. quantized bytes


@pytest.mark.parametrize("arch,adapter", [("llama", "lora"), ("llama", "prompt"), ("llama", "prefix"), ("bert", "lora")])
def test_padded_batch_with_ignored_labels(arch, adapter):
    model = peft_model(arch, adapter)
    batch = padded_batch(arch)
    seq, _ = assert_same_step(model, batch, eps=EPS_OF.get(adapter, EPS))
    model.eval()
    assert seq[0] == pytest.approx(model(**batch).loss.item(), rel=1e-6)  # L0 is the model's own loss


def test_mezo_can_use_the_batched_path():
    model = peft_model("llama", "lora", "nf4")
    losses, _ = assert_same_step(model, fixed_batch("llama"), name="mezo")
    assert len(losses) == 2


def test_batched_evaluation_never_writes_the_model_weights():
    model = peft_model("llama", "lora")
    batch = fixed_batch("llama")
    opt = zopeft.FZOO(model, n_perturbations=N, eps=EPS)
    seen = []
    tensors = list(opt.points.tensors)
    start = [p.detach().clone() for p in tensors]
    # checked as every module's forward begins (inside the pass too) and after it
    hooks = [m.register_forward_pre_hook(lambda *_: seen.append(all(torch.equal(p, s) for p, s in zip(tensors, start))))
             for m in model.modules()]
    try:
        losses = loss_closure(model, batch).losses(opt, opt.evaluations())
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) > 10 and all(seen) and len(losses) == N + 1
    assert all(torch.equal(p, s) for p, s in zip(tensors, start))


@pytest.mark.parametrize("size", [1, 2, 4, 6])
def test_perturbation_batch_size_chunks_the_replicas(size):
    model = peft_model("llama", "lora")
    batch = fixed_batch("llama")
    calls = []
    hook = model.register_forward_pre_hook(lambda _m, args, kwargs: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        opt = zopeft.FZOO(model, n_perturbations=N, eps=EPS, perturbation_batch_size=size)
        chunked = loss_closure(model, batch).losses(opt, opt.evaluations())
    finally:
        hook.remove()
    chunks = math.ceil((N + 1) / size)
    assert len(calls) == chunks and sum(calls) == (N + 1) * batch["input_ids"].shape[0]
    assert max(calls) - min(calls) <= batch["input_ids"].shape[0]  # even chunks
    whole = loss_closure(model, batch, perturbation_batch_size=N + 1).losses(opt, opt.evaluations())
    torch.testing.assert_close(torch.tensor(chunked), torch.tensor(whole), rtol=1e-5, atol=0)


def test_one_replica_per_forward_is_the_sequential_computation():
    """With one replica and a classification head, the batched path runs the very same kernels: bit-identical."""
    model = peft_model("bert", "lora")
    batch = fixed_batch("bert")
    seq, seq_update, _ = one_step(model, batch, batched=False)
    bat, bat_update, _ = one_step(model, batch, batched=True, perturbation_batch_size=1)
    assert bat == seq
    assert all(torch.equal(bat_update[n], seq_update[n]) for n in seq_update)


def test_several_steps_follow_the_sequential_trajectory():
    """Four nf4 steps: the displacement agrees to 1% of its size (the 1/σ amplification of
    ~1e-5 loss rounding differences, compounded over the steps; see the module docstring)."""
    moves = []
    for batched in (False, True):
        model = peft_model("llama", "lora", "nf4")
        start = trainable(model)
        batch = fixed_batch("llama")
        opt = zopeft.FZOO(model, lr=LR, eps=EPS, n_perturbations=4, seed=3, batched=batched)
        for _ in range(4):
            opt.step(loss_closure(model, batch))
        moves.append({n: p - start[n] for n, p in trainable(model).items()})
    num = math.sqrt(sum(float((moves[1][n] - moves[0][n]).pow(2).sum()) for n in moves[0]))
    den = math.sqrt(sum(float(moves[0][n].pow(2).sum()) for n in moves[0]))
    assert den > 0 and num < 1e-2 * den, (num, den)


@pytest.mark.parametrize("adapter", ["lora", "prompt", "prefix"])
@pytest.mark.parametrize("labels", ["all", "padded"])
def test_closure_is_the_models_own_loss_with_the_head_in_chunks(adapter, labels, monkeypatch):
    """The sequential closure projects onto the vocabulary only at labelled rows, a few rows at a time."""
    from zopeft.batched import loss as loss_room

    model = peft_model("llama", adapter)
    model.eval()
    batch = fixed_batch("llama") if labels == "all" else padded_batch("llama")
    with torch.no_grad():
        expected = model(**batch).loss
    monkeypatch.setattr(loss_room, "HEAD_CHUNK_BYTES", 3 * VOCAB * 10)  # 3 rows of logits per chunk
    rows = []
    head = model.get_base_model().lm_head
    project = head.forward
    monkeypatch.setattr(head, "forward", lambda x: (rows.append(x.shape[0]), project(x))[1], raising=False)
    closure = loss_closure(model, batch)
    assert isinstance(closure, BatchedLoss)
    with torch.no_grad():
        got = closure()
    # prompt tuning prepends virtual tokens: the last one predicts the first real token too
    labels = batch["labels"] if adapter == "prompt" else batch["labels"][:, 1:]
    labelled = int((labels != -100).sum())
    assert max(rows) == 3 and sum(rows) == labelled  # fp32 logits of the whole batch never exist at once
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_batched_head_chunks_keep_replicas_apart(monkeypatch):
    """Chunks of the LM head run across all replicas at once; the losses do not depend on the chunk size."""
    from zopeft.batched import loss as loss_room

    model = peft_model("llama", "lora")
    batch = fixed_batch("llama")
    opt = zopeft.FZOO(model, n_perturbations=N, eps=EPS)
    whole = loss_closure(model, batch).losses(opt, opt.evaluations())
    monkeypatch.setattr(loss_room, "HEAD_CHUNK_BYTES", (N + 1) * 5 * VOCAB * 10)  # 5 rows per replica and chunk
    chunked = loss_closure(model, batch).losses(opt, opt.evaluations())
    torch.testing.assert_close(torch.tensor(chunked), torch.tensor(whole), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "case,reason",
    [
        ("dora", "LoRA variant"),
        ("full", "not a LoRA"),
        ("num_items", "num_items_in_batch"),
    ],
)
def test_unsupported_cases_fall_back_to_sequential_with_a_log_line(case, reason, caplog):
    batch = fixed_batch("llama")
    if case == "full":
        model = tiny_model("llama")
        opt = zopeft.FZOO(model, lr=LR, eps=EPS, n_perturbations=N)
    else:
        model = peft_model("llama", "dora" if case == "dora" else "lora")
        opt = zopeft.FZOO(model, lr=LR, eps=EPS, n_perturbations=N)
        if case == "num_items":
            batch = {**batch, "num_items_in_batch": torch.tensor(48)}
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with caplog.at_level(logging.INFO, logger="zopeft"):
            opt.step(loss_closure(model, batch))
    finally:
        hook.remove()
    warnings = [r.message for r in caplog.records if r.name == "zopeft" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "sequential evaluation" in warnings[0] and reason in warnings[0], warnings
    assert len(calls) == N + 1 and opt.forward_passes == N + 1
    assert batched_support(model, opt, batch) is not None


@pytest.mark.parametrize("form", ["tensors", "groups"])
def test_optimizer_from_tensors_evaluates_the_closures_model_in_eval_mode(form, caplog):
    """Param groups get what a module gets: eval mode during the step (so the batched path), train mode after."""
    model = peft_model("llama", "lora")
    model.train()
    tensors = [p for p in model.parameters() if p.requires_grad]
    params = tensors if form == "tensors" else [{"params": tensors[:4]}, {"params": tensors[4:], "lr": LR / 2}]
    opt = zopeft.FZOO(params, lr=LR, eps=EPS, n_perturbations=N)
    with caplog.at_level(logging.INFO, logger="zopeft"):
        opt.step(loss_closure(model, fixed_batch("llama")))
    lines = [r.message for r in caplog.records if r.name == "zopeft"]
    assert any("batched evaluation" in m for m in lines) and not any("sequential" in m for m in lines), lines
    assert model.training and all(m.training for m in model.modules())


def test_plain_closure_warns_once_about_the_slower_sequential_path(caplog):
    model = peft_model("llama", "lora")
    batch = fixed_batch("llama")
    opt = zopeft.FZOO(model, lr=LR, eps=EPS, n_perturbations=2)
    with caplog.at_level(logging.DEBUG, logger="zopeft"):
        for _ in range(3):
            opt.step(lambda: model(**batch).loss)
    shown = [r for r in caplog.records if r.name == "zopeft" and r.levelno >= logging.INFO]
    assert len(shown) == 1 and shown[0].levelno == logging.WARNING and "loss_closure" in shown[0].message


class _FakeBatched:
    """A closure whose batched losses turn non-finite at the third point."""

    def __init__(self, w):
        self.w, self.asked = w, []

    def __call__(self):
        raise AssertionError("the sequential path must not run")

    def losses(self, optimizer, evaluations):
        self.asked.append(len(evaluations))
        return [1.0, 2.0, math.inf]  # stops early, like a chunked evaluation after a non-finite chunk


def test_non_finite_batched_loss_skips_the_step_and_counts_like_sequential():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = zopeft.FZOO([w], lr=0.1, eps=1e-2, n_perturbations=4)
    closure = _FakeBatched(w)
    opt.step(closure)
    assert closure.asked == [5]
    losses = opt.step_log[-1]["losses"]
    assert losses[:3] == [1.0, 2.0, math.inf] and all(math.isnan(x) for x in losses[3:])
    assert opt.step_log[-1]["skipped"] == "non-finite loss" and opt.skipped_steps == 1
    assert opt.forward_passes == 3 and torch.equal(w.detach(), torch.zeros(3))


class _SequentialOnly:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return float(self.calls)

    def losses(self, optimizer, evaluations):
        raise AssertionError("batched=False must not use the batched entry")


def test_batched_false_ignores_the_batched_entry():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = zopeft.FZOO([w], lr=0.1, eps=1e-2, n_perturbations=2, batched=False)
    closure = _SequentialOnly()
    opt.step(closure)
    assert closure.calls == 3 and opt.forward_passes == 3


def test_perturbation_batch_size_is_validated():
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="perturbation_batch_size"):
        zopeft.FZOO([w], perturbation_batch_size=0)
    with pytest.raises(ValueError, match="perturbation_batch_size"):
        loss_closure(torch.nn.Linear(2, 2), {"labels": torch.zeros(1)}, perturbation_batch_size=0)
