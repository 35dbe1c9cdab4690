"""zo.eps against the forward pass's rounding: ZOOptimizer.check_eps, and its use by train and lr-find."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fixed_batch, tiny_model
from test_cli import invoke, write_recipe

import zopeft
from zopeft.models import AdapterSpec, apply_adapter
from zopeft.optim.eps_check import MAX_NOISE


def _quadratic(rough: float = 0.0, quantum: float = 0.0):
    """θ = 0 in 1000 dims, L = ½‖θ − c‖² (gradient −c), plus ``rough``·sin(10⁶·w·θ) - a deterministic
    function that, like rounding, changes unpredictably between nearby points - or rounded to multiples
    of ``quantum``."""
    g = torch.Generator().manual_seed(3)
    c, w = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    p = torch.nn.Parameter(torch.zeros(1000))

    def closure() -> torch.Tensor:
        loss = 0.5 * ((p - c) ** 2).sum() + rough * torch.sin(1e6 * (w @ p))
        return torch.round(loss / quantum) * quantum if quantum else loss

    return p, c, closure


def test_exact_loss_passes_with_the_hand_computed_differences_and_changes_nothing():
    p, c, closure = _quadratic()
    opt = zopeft.MeZO([p], lr=0.1, eps=1e-3, seed=5)
    check = opt.check_eps(closure)
    assert check.ok and check.suggested == 1e-3 and check.noise[1e-3] < 1e-2
    assert check.forward_passes == 6 * 8 and list(check.noise) == [1e-3]  # ε passed: no larger one tried
    # a quadratic's central difference is exactly 2ε·g·z_k, z_k the noise of step 0, perturbation k
    z = [zopeft.draw_noise((1000,), zopeft.noise_key(5, 0, k, 0), torch.device("cpu"), "rademacher") for k in range(8)]
    # (to the fp32 rounding of a loss near 500: its spacing is 3e-5)
    assert check.differences == pytest.approx([2e-3 * float(-c @ zk) for zk in z], abs=1e-4)
    assert torch.equal(p.detach(), torch.zeros(1000)) and opt.forward_passes == 0 and opt.step_index == 0


def test_rough_loss_fails_and_suggests_the_first_larger_eps_that_passes():
    p, _, closure = _quadratic(rough=1e-2)  # a difference at ε = 1e-4 is ~0.006, the roughness 0.01
    check = zopeft.MeZO([p], lr=0.1, eps=1e-4, seed=0).check_eps(closure)
    assert not check.ok and check.noise[1e-4] > MAX_NOISE
    assert check.suggested is not None and check.suggested > 1e-4
    assert check.noise[check.suggested] <= MAX_NOISE
    assert all(v > MAX_NOISE for e, v in check.noise.items() if e < check.suggested)
    assert f"set zo.eps: {check.suggested:g}" in check.line()
    assert torch.equal(p.detach(), torch.zeros(1000))


def test_a_loss_that_does_not_move_is_flat_at_every_eps():
    p, _, closure = _quadratic(quantum=1.0)  # differences of ~1e-4 round to 0
    check = zopeft.MeZO([p], lr=0.1, eps=1e-6, seed=0).check_eps(closure)
    assert check.suggested is None and list(check.noise) == pytest.approx([1e-6, 3e-6, 1e-5])
    assert "the loss did not change at any ε tried" in check.line()


def _lora(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    spec = AdapterSpec(finetuning_type="lora", lora_rank=4, lora_alpha=8, lora_target=["q_proj", "v_proj"])
    return apply_adapter(tiny_model().to(dtype), spec, "causal_lm")


def test_the_same_eps_passes_in_float32_and_fails_in_bfloat16():
    # eps 1e-6 sits far from MAX_NOISE on either side (measured: fp32 0.19, bf16 13.5 on an AVX2 EPYC), so the
    # verdicts do not depend on the CPU's bf16 kernels (at 1e-4 bf16 gave 0.69 on AVX2, above 0.7 on AVX512)
    eps, results = 1e-6, {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _lora(dtype)
        results[dtype] = zopeft.MeZO(model, lr=1e-3, eps=eps, seed=0).check_eps(zopeft.loss_closure(model, fixed_batch()))
    fp32, bf16 = results[torch.float32], results[torch.bfloat16]
    assert fp32.ok and fp32.noise[eps] < MAX_NOISE / 2 and list(fp32.noise) == [eps]
    assert not bf16.ok and bf16.noise[eps] > 5 * MAX_NOISE
    tried = list(bf16.noise)  # eps, then the larger scales until one passes
    assert tried[0] == eps and all(e > eps for e in tried[1:]) and bf16.noise[tried[-1]] < bf16.noise[eps]
    assert bf16.suggested is None or (bf16.suggested > eps and bf16.noise[bf16.suggested] <= MAX_NOISE)


@pytest.mark.parametrize("optimizer", ["fzoo", "hizoo"])
def test_a_step_after_the_check_is_the_step_without_it(optimizer):
    steps = {}
    for checked in (False, True):
        model = _lora(torch.float32)
        opt = zopeft.get_optimizer(optimizer, model, lr=1e-2, eps=1e-3, seed=0)
        closure = zopeft.loss_closure(model, fixed_batch())
        if checked:
            assert opt.check_eps(closure).ok
        opt.step(closure)
        steps[checked] = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        assert opt.forward_passes == len(opt.evaluations())
    assert all(torch.equal(a, b) for a, b in zip(steps[False], steps[True]))


@pytest.mark.parametrize("dtype,setting,checked", [
    ("bfloat16", "auto", True), ("float32", "auto", False), ("float32", "always", True), ("bfloat16", "never", False),
])
def test_train_checks_eps_in_half_precision_or_when_asked(tmp_path, dtype, setting, checked):
    recipe = write_recipe(tmp_path, compute_dtype=dtype, max_steps=1, zo__eps=1e-3, zo__check_eps=setting)
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    records = [r["eps_check"] for r in log if "eps_check" in r]
    assert ("eps check: zo.eps=0.001" in result.output) is checked and len(records) == int(checked)
    if checked:
        assert records[0]["eps"] == 1e-3 and records[0]["forward_passes"] >= 48
