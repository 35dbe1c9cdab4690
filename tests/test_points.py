"""The flat owner of the trainable tensors (zopeft.optim.points): updates, noise draws, state format, safety."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fixed_batch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

import zopeft
from zopeft.batched import loss_closure
from zopeft.batched.memory import replicas_per_pass
from zopeft.optim.settings import parse_memory
from zopeft.noise import draw_noise, noise_key
from zopeft.optim import points as points_module


class Scripted:
    """A closure that returns the given losses in turn (the weights do not matter)."""

    def __init__(self, losses):
        self.losses = iter(losses)

    def __call__(self):
        return next(self.losses)


def test_flat_update_equals_the_per_tensor_formula():
    """Two groups, three tensors (one bf16): θ ← θ − lr·(Σ c_k·z_k + wd·θ) tensor by tensor, z cut from the flat draw."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))
    c = torch.nn.Parameter(torch.randn(2, 2).to(torch.bfloat16))
    groups = [{"params": [a, b], "weight_decay": 0.01}, {"params": [c], "lr": 0.2}]
    before = [t.detach().float().clone() for t in (a, b, c)]
    eps, seed, n = 1e-2, 5, 3
    opt = zopeft.FZOO(groups, lr=0.1, eps=eps, n_perturbations=n, seed=seed, batched=False)
    assert [buf.tensors for buf in opt.points.buffers] == [[a, b], [c]]  # per group (and dtype)
    losses = [1.0, 1.3, 0.7, 1.1]
    opt.step(Scripted(losses))

    sigma = zopeft.FZOO.sigma(losses)
    coefs = [(k, (losses[k] - losses[0]) / (n * sigma)) for k in range(1, n + 1)]
    for buffer, tensors, lr, wd in ((0, [(a, 0), (b, 1)], 0.1, 0.01), (1, [(c, 2)], 0.2, 0.0)):
        numel = sum(before[i].numel() for _, i in tensors)
        z = {k: draw_noise((numel,), noise_key(seed, 0, k, buffer), "cpu") for k, _ in coefs}
        offset = 0
        for t, i in tensors:
            theta = before[i]
            part = sum(ck * z[k][offset : offset + theta.numel()].view(theta.shape) for k, ck in coefs)
            expected = theta - lr * (part + wd * theta)
            torch.testing.assert_close(t.detach().float(), expected.to(t.dtype).float(), rtol=1e-6, atol=1e-7)
            offset += theta.numel()


def deep_lora_model(layers: int = 24):
    """24 layers x 7 linear layers x (A, B) = 336 LoRA tensors on a narrow random Llama."""
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(r=4, target_modules="all-linear"))


@pytest.mark.parametrize("batched", [False, True])
def test_noise_draws_per_perturbation_do_not_grow_with_the_number_of_tensors(batched, monkeypatch):
    draws = []
    real = points_module.draw_noise
    monkeypatch.setattr(points_module, "draw_noise", lambda *a, **k: (draws.append(a[0]), real(*a, **k))[1])
    batch = fixed_batch("llama", batch=2, length=8)
    counts = {}
    for layers in (1, 24):
        model = deep_lora_model(layers)
        opt = zopeft.FZOO(model, lr=1e-3, eps=1e-2, n_perturbations=4, batched=batched)
        draws.clear()
        opt.step(loss_closure(model, batch))
        counts[len(opt.points.tensors)] = len(draws)
    assert set(counts) == {14, 336} and len(set(counts.values())) == 1, counts
    assert counts[336] == 4  # one draw per perturbation, reused by the update


def test_state_of_the_old_per_tensor_noise_format_is_refused():
    w = torch.nn.Parameter(torch.zeros(4))
    opt = zopeft.MeZO([w], lr=0.1)
    opt.step(lambda: (w**2).sum() + 1)
    state = opt.state_dict()
    assert state["noise_format"] == 2
    old = {k: v for k, v in state.items() if k not in ("noise_format", "layout", "fingerprint")}
    with pytest.raises(ValueError, match="noise format 1 .*start a new run"):
        zopeft.MeZO([w], lr=0.1).load_state_dict(old)


def test_state_refuses_weights_it_was_not_saved_with():
    w = torch.nn.Parameter(torch.zeros(4))
    opt = zopeft.MeZO([w], lr=0.1)
    for _ in range(3):
        opt.step(lambda: ((w - 1) ** 2).sum())
    state = opt.state_dict()
    fresh = torch.nn.Parameter(torch.zeros(4))  # the adapter weights were not loaded first
    with pytest.raises(ValueError, match="load the adapter weights saved beside the state first"):
        zopeft.MeZO([fresh], lr=0.1).load_state_dict(state)
    with pytest.raises(ValueError, match="laid out as"):
        zopeft.MeZO([torch.nn.Parameter(torch.zeros(5))], lr=0.1).load_state_dict(state)
    with torch.no_grad():
        fresh.copy_(w)
    zopeft.MeZO([fresh], lr=0.1).load_state_dict(state)


def test_replay_needs_the_starting_weights_and_leaves_meaningful_stats():
    w = torch.nn.Parameter(torch.zeros(4))
    opt = zopeft.FZOO([w], lr=0.1, n_perturbations=2)
    for _ in range(5):
        opt.step(lambda: ((w - 1) ** 2).sum())
    with pytest.raises(ValueError, match="fresh optimizer"):
        opt.replay(opt.step_log)  # would apply every update twice
    w2 = torch.nn.Parameter(torch.zeros(4))
    again = zopeft.FZOO([w2], lr=0.1, n_perturbations=2)
    again.replay(opt.step_log)
    assert torch.equal(w2, w)
    stats = again.last_stats
    assert stats["replayed"] and stats["step"] == 4 and stats["loss"] == opt.last_stats["loss"]


def test_an_update_that_makes_a_weight_non_finite_is_refused():
    w = torch.nn.Parameter(torch.ones(4))
    opt = zopeft.MeZO([w], lr=1e6, eps=1e-3)  # finite losses and lr, but lr·g·z overflows fp32
    opt.step(Scripted([1e30, -1e30]))
    assert torch.equal(w.detach(), torch.ones(4))
    assert opt.last_stats["skipped"] == "non-finite update" and opt.skipped_steps == 1


def test_mezo_zero_projected_gradient_counts_as_a_skipped_step():
    w = torch.nn.Parameter(torch.ones(4))
    opt = zopeft.MeZO([w], lr=0.1, weight_decay=0.1)
    opt.step(lambda: 1.0)  # L+ = L-: no information (e.g. a flat accuracy objective)
    assert torch.equal(w.detach(), torch.ones(4))
    assert opt.last_stats["skipped"] == "projected_grad=0" and opt.skipped_steps == 1


def test_last_stats_show_the_learning_rate_of_every_group():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = zopeft.MeZO([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    opt.step(lambda: ((a - 1) ** 2).sum() + ((b - 1) ** 2).sum())
    assert opt.last_stats["lr"] == [0.1, 0.5]


def test_in_place_mode_restores_to_rounding_and_has_no_masters():
    w = torch.nn.Parameter(torch.randn(100))
    opt = zopeft.FZOO([w], lr=0.0, n_perturbations=3, master_weights=False)
    before = w.detach().clone()
    opt.step(lambda: (w**2).sum())
    assert opt.points.masters() == [] and "masters" not in opt.state_dict()
    torch.testing.assert_close(w.detach(), before, rtol=0, atol=1e-6)


def test_max_memory_bounds_the_replicas_per_forward_pass():
    model = deep_lora_model(2)
    config, cpu = model.get_base_model().config, torch.device("cpu")
    roomy = replicas_per_pass(model, config, cpu, rows=2 * 8, length=8)
    assert roomy >= 9  # the margin (256 MiB on a CPU) holds many replicas of a small batch
    from zopeft.batched.memory import _resident_bytes  # noqa: PLC2701 - the module's own measure of use

    tight = replicas_per_pass(model, config, cpu, rows=2 * 8, length=8, max_memory=_resident_bytes() + (1 << 20))
    assert tight == 1
    assert parse_memory("12GB") == 12 * 10**9 and parse_memory("1.5GiB") == 3 << 29 and parse_memory(None) is None
    for bad in ("twelve", "12G", "1.5Gi"):  # units as accelerate's max_memory: B, KB..TB, KiB..TiB
        with pytest.raises(ValueError, match="12GB"):
            parse_memory(bad)
    batch = fixed_batch("llama", batch=2, length=8)
    passes = []
    hook = model.register_forward_pre_hook(lambda *_: passes.append(1))
    opt = zopeft.FZOO(model, lr=1e-3, eps=1e-2, n_perturbations=4, max_memory=_resident_bytes() + (1 << 20))
    try:
        opt.step(loss_closure(model, batch))
    finally:
        hook.remove()
    assert len(passes) == 5 and opt.forward_passes == 5  # one replica per pass
    assert not math.isnan(opt.last_stats["loss"])


def test_replicas_respect_the_cuda_memory_fraction(monkeypatch):
    """On a GPU the budget is the smaller of free memory and set_per_process_memory_fraction's cap (mocked here)."""
    from zopeft.batched import memory

    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (70 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: 6 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: 7 * gib)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    fraction = {"value": 1.0}
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda index: fraction["value"])
    cuda = torch.device("cuda", 0)
    assert memory._free_bytes(cuda, None) == 71 * gib  # free + the allocator's cached blocks
    fraction["value"] = 12 / 80  # a user on a 12 GB card
    assert memory._free_bytes(cuda, None) == 6 * gib
    assert memory._free_bytes(cuda, 8 * gib) == 2 * gib  # max_memory below the cap wins


def test_rademacher_noise_is_the_bits_of_the_generator_bytes_lowest_first():
    """Format 2 pinned: sign j of byte i of ``randint(0, 256)`` is element 8i+j (a faster draw must not change it)."""
    key, n = noise_key(3, 1, 2, 0), 1001
    gen = torch.Generator().manual_seed(key)
    packed = torch.randint(0, 256, ((n + 7) // 8,), generator=gen, dtype=torch.uint8)
    bits = [(int(byte) >> j) & 1 for byte in packed for j in range(8)][:n]
    assert draw_noise((n,), key, "cpu").tolist() == [2.0 * bit - 1.0 for bit in bits]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_large_buffer_is_written_straight_into_the_model_with_the_same_values(dtype, monkeypatch):
    """Above SCRATCH_NUMEL a point goes tensor by tensor into the model: the values of ``point_values``, cast."""
    monkeypatch.setattr(points_module, "SCRATCH_NUMEL", 0)
    torch.manual_seed(0)
    tensors = [torch.nn.Parameter(torch.randn(shape).to(dtype)) for shape in ((7, 5), (11,), (3, 2, 2))]
    points = points_module.Points([tensors], eps=1e-2, seed=1)
    (buffer,) = points.buffers
    assert buffer.scratch is None
    before = [t.detach().clone() for t in tensors]
    points.write(4, (2, -1.0))
    expected = buffer.views(points.point_values(4, (2, -1.0), buffer).to(dtype))
    for t, e, b in zip(tensors, expected, before):
        assert torch.equal(t.detach(), e) and not torch.equal(t.detach(), b)
    points.restore()
    assert all(torch.equal(t.detach(), b) for t, b in zip(tensors, before))
