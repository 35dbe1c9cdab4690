"""The update rules, exactness and state of the ZO optimizers, on small quadratics."""

from __future__ import annotations

import math

import pytest
import torch

import zopeft
from zopeft import FZOO, MeZO, draw_noise, noise_key

TARGET = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25])


def quadratic(w: torch.Tensor) -> torch.Tensor:
    return ((w - TARGET) ** 2).sum()


def make(name: str, seed: int = 0, **kw):
    w = torch.nn.Parameter(torch.zeros(6))
    defaults = {"mezo": dict(lr=0.02), "fzoo": dict(lr=0.05), "adamezo": dict(lr=2e-4, window=4),
                "hizoo": dict(lr=0.02, hessian_smooth=0.01)}[name]
    return w, zopeft.get_optimizer(name, [w], seed=seed, **{**defaults, **kw})


@pytest.mark.parametrize("name", ["mezo", "fzoo", "adamezo", "hizoo"])
def test_loss_decreases_on_quadratic(name):
    w, opt = make(name)
    start = quadratic(w).item()
    for _ in range(150):
        opt.step(lambda: quadratic(w))
    assert quadratic(w).item() < 0.2 * start
    assert opt.forward_passes == 150 * len(opt.evaluations())


def test_noise_is_seeded_rademacher_and_independent_of_global_rng():
    key = noise_key(0, 3, 1, 7)
    torch.manual_seed(123)
    a = draw_noise(torch.Size([1000]), key, torch.device("cpu"))
    torch.manual_seed(456)
    b = draw_noise(torch.Size([1000]), key, torch.device("cpu"))
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert abs(a.mean().item()) < 0.15
    assert not torch.equal(a, draw_noise(torch.Size([1000]), noise_key(0, 3, 2, 7), torch.device("cpu")))
    assert len({noise_key(s, t, k, i) for s in range(3) for t in range(3) for k in range(3) for i in range(3)}) == 81
    g = draw_noise(torch.Size([4000]), key, torch.device("cpu"), "gaussian")
    assert abs(g.std().item() - 1) < 0.05


def test_mezo_update_equals_hand_computation():
    w, opt = make("mezo", lr=0.1, eps=1e-3, weight_decay=0.01)
    w0 = w.detach().clone()
    opt.step(lambda: quadratic(w))
    z = draw_noise(w.shape, noise_key(0, 0, 0, 0), w.device)
    g = (quadratic(w0 + 1e-3 * z) - quadratic(w0 - 1e-3 * z)).item() / 2e-3
    assert opt.last_stats["projected_grad"] == pytest.approx(g, rel=1e-4)
    torch.testing.assert_close(w.detach(), w0 - 0.1 * (g * z + 0.01 * w0), rtol=1e-5, atol=1e-6)


def test_fzoo_update_equals_hand_computation():
    n, lr, eps = 5, 0.05, 1e-2
    w, opt = make("fzoo", lr=lr, eps=eps, n_perturbations=n)
    w0 = w.detach().clone()
    opt.step(lambda: quadratic(w))
    u = [draw_noise(w.shape, noise_key(0, 0, i, 0), w.device) for i in range(1, n + 1)]
    l0 = quadratic(w0).item()
    li = [quadratic(w0 + eps * ui).item() for ui in u]
    sigma = math.sqrt(sum((x - sum(li) / n) ** 2 for x in li) / n)
    expected = w0 - lr * sum(((x - l0) / (n * sigma)) * ui for x, ui in zip(li, u))
    assert opt.last_stats["sigma"] == pytest.approx(sigma, rel=1e-5)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_adamezo_rebuilt_moments_equal_stored_moments(noise):
    """Reference: keep every z explicitly and sum the truncated moments; compare every step."""
    K, b1, b2, delta, scale, lr, eps = 3, 0.7, 0.9, 1e-5, 100.0, 1e-4, 1e-3
    w, opt = make("adamezo", lr=lr, eps=eps, window=K, beta1=b1, beta2=b2, noise=noise)
    ref = w.detach().clone().double()
    stored: list[tuple[float, torch.Tensor]] = []
    for t in range(8):
        opt.step(lambda: quadratic(w))
        g = opt.last_stats["projected_grad"]
        z = draw_noise(w.shape, noise_key(0, t, 0, 0), w.device, noise).double()
        stored.append((g, z))
        if t < K:
            ref -= lr * g * z
        else:
            recent = stored[-K:][::-1]
            m = sum(b1**k * gk * zk for k, (gk, zk) in enumerate(recent))
            v = sum(b2**k * gk**2 * zk**2 for k, (gk, zk) in enumerate(recent))
            ref -= lr * scale * m / (v.sqrt() + delta)
        torch.testing.assert_close(w.detach().double(), ref, rtol=1e-4, atol=1e-6)
        ref = w.detach().clone().double()  # follow the optimizer's own trajectory (its g's come from it)


def test_restore_is_bit_exact_after_many_perturbations():
    w = torch.nn.Parameter(torch.randn(1000) * 3)
    opt = FZOO([w], lr=0.0, eps=1e-3, n_perturbations=4)
    before = w.detach().clone()
    for _ in range(20):
        opt.step(lambda: (w**2).sum() + torch.rand(()))  # lr=0: weights must not move at all
    assert torch.equal(w.detach(), before)


def test_in_place_mode_refuses_low_precision_and_runs_fp32():
    with pytest.raises(ValueError, match="master_weights=True"):
        MeZO([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))], master_weights=False)
    w = torch.nn.Parameter(torch.zeros(6))
    opt = MeZO([w], lr=0.02, master_weights=False)
    for _ in range(100):
        opt.step(lambda: quadratic(w))
    assert quadratic(w).item() < 0.5 * quadratic(torch.zeros(6)).item()


def test_bf16_adapters_keep_an_fp32_master_so_small_updates_accumulate():
    w = torch.nn.Parameter(torch.full((6,), 1.0, dtype=torch.bfloat16))
    opt = MeZO([w], lr=1e-4, eps=1e-2)  # ε must exceed bf16's spacing (2⁻⁷ at 1.0) to move the loss
    for _ in range(30):
        opt.step(lambda: quadratic(w.float()))
    master = opt.points.masters()[0]
    assert not torch.equal(master, torch.ones(6))  # bf16 alone would round each 1e-4 step away
    assert torch.equal(w.detach(), master.to(torch.bfloat16))
    assert "masters" in opt.state_dict()


def test_weights_written_outside_the_optimizer_are_the_next_steps_start(caplog):
    """The fp32 masters follow a bf16 tensor written in place outside the optimizer (loaded weights); only the
    written tensors are re-read (the others keep their fp32 bits); ``.data =`` needs sync_masters()."""
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    other = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    opt = MeZO([w, other], lr=1e-4, eps=1e-2)
    loss = lambda: (w.float() - 1).pow(2).sum() + (other.float() - 1).pow(2).sum()  # noqa: E731
    for _ in range(5):
        opt.step(loss)
    kept = opt.points.masters()[0][4:].clone()  # other's fp32 bits, below bf16's spacing
    assert not torch.equal(kept, kept.to(torch.bfloat16).float())
    with torch.no_grad():
        w.copy_(torch.full((4,), 3.0))  # e.g. set_peft_model_state_dict
    with caplog.at_level("WARNING", logger="zopeft"):
        opt.step(loss)
    assert "1 trainable tensor(s) were written outside the optimizer before step 5; it continues from them" in caplog.text
    assert (w.detach() - 3).abs().max() < 0.01  # one small step from the loaded weights, not from the old ones
    assert torch.allclose(opt.points.masters()[0][:4], torch.full((4,), 3.0), atol=0.01)
    snapshot = opt.points.masters()[0][4:]
    assert (snapshot - kept).abs().max() < 1e-3 and not torch.equal(snapshot, snapshot.to(torch.bfloat16).float())
    for sync in (False, True):
        w.data = torch.full((4,), 5.0, dtype=torch.bfloat16)  # swaps the storage: torch counts no write
        if sync:
            opt.sync_masters()
        opt.step(lambda: (w.float() ** 2).sum() * 0)  # all losses equal: a skipped step, the weights restored
        assert (w.detach().float() - (5.0 if sync else 3.0)).abs().max() < 0.02


@pytest.mark.parametrize("name", ["mezo", "fzoo", "adamezo", "hizoo"])
def test_same_seed_gives_bit_identical_weights(name):
    runs = []
    for _ in range(2):
        w, opt = make(name, seed=7)
        for _ in range(12):
            opt.step(lambda: quadratic(w))
        runs.append(w.detach().clone())
    assert torch.equal(*runs)
    w, opt = make(name, seed=8)
    for _ in range(12):
        opt.step(lambda: quadratic(w))
    assert not torch.equal(runs[0], w.detach())


@pytest.mark.parametrize("name", ["mezo", "fzoo", "adamezo", "hizoo"])
def test_state_dict_round_trip_continues_identically(name):
    w, opt = make(name, seed=3)
    for _ in range(6):
        opt.step(lambda: quadratic(w))
    state, weights = opt.state_dict(), w.detach().clone()
    for _ in range(6):
        opt.step(lambda: quadratic(w))
    uninterrupted = w.detach().clone()

    w2, opt2 = make(name, seed=999)  # a different seed: the state must bring the run's own
    with torch.no_grad():
        w2.copy_(weights)
    opt2.load_state_dict(state)
    for _ in range(6):
        opt2.step(lambda: quadratic(w2))
    assert torch.equal(w2.detach(), uninterrupted)
    assert opt2.forward_passes == opt.forward_passes


@pytest.mark.parametrize("name", ["mezo", "fzoo", "adamezo", "hizoo"])
def test_replay_from_step_log_rebuilds_the_run(name):
    w, opt = make(name, seed=5)
    for _ in range(10):
        opt.step(lambda: quadratic(w))
    w2, opt2 = make(name, seed=5)
    start = opt2.points.fingerprint()
    opt2.replay(opt.step_log)
    assert torch.equal(w2.detach(), w.detach())
    first, *rest = opt.step_log  # the first step records the seed and the weights it began from
    assert (first["seed"], first["start"]) == (5, start)
    assert all(set(r) <= {"step", "lr", "losses", "skipped"} for r in rest)


def test_replay_refuses_another_seed_and_weights_the_run_did_not_start_from():
    w, opt = make("fzoo", seed=5)
    for _ in range(3):
        opt.step(lambda: quadratic(w))
    w2, other_seed = make("fzoo", seed=6)
    with pytest.raises(ValueError, match=r"^replay: the log was recorded with seed 5, this optimizer has seed 6: "
                                         r"build it with seed=5$"):
        other_seed.replay(opt.step_log)
    trained = zopeft.FZOO([w], lr=0.05, seed=5)  # a fresh optimizer over weights that already hold the run
    trained_weights = w.detach().clone()
    with pytest.raises(ValueError, match=r"^replay: these are not the weights step 0 of the log began from .* e\.g\. "
                                         "weights that already hold the trained adapter"):
        trained.replay(opt.step_log)
    assert torch.equal(w2.detach(), torch.zeros(6)) and torch.equal(w.detach(), trained_weights)
    assert other_seed.step_index == trained.step_index == 0 and not other_seed.step_log and not trained.step_log


def test_replay_of_a_log_that_went_on_from_weights_written_outside_is_refused_there():
    w, opt = make("mezo", seed=1)
    opt.step(lambda: quadratic(w))
    with torch.no_grad():
        w.add_(1.0)  # e.g. weights loaded from elsewhere: the run goes on from them
    opt.step(lambda: quadratic(w))
    assert "start" in opt.step_log[1]  # the second stretch of the log records where it began
    w2, again = make("mezo", seed=1)
    with pytest.raises(ValueError, match="at step 1 the run went on from weights that the steps before it do not "
                                         "rebuild .* this optimizer now holds the replayed steps 0-0"):
        again.replay(opt.step_log)


def test_non_finite_loss_skips_the_step_and_restores_exactly():
    w = torch.nn.Parameter(torch.randn(6))
    opt = FZOO([w], lr=0.1, n_perturbations=4)
    before = w.detach().clone()
    calls = iter(range(100))

    def closure():
        return torch.tensor(float("nan")) if next(calls) == 2 else quadratic(w)

    opt.step(closure)
    assert torch.equal(w.detach(), before)
    assert opt.skipped_steps == 1 and opt.step_log[-1]["skipped"] == "non-finite loss"
    assert opt.forward_passes == 3  # stopped at the first non-finite loss
    opt.step(lambda: quadratic(w))
    assert not torch.equal(w.detach(), before)


def test_closure_error_restores_weights():
    w = torch.nn.Parameter(torch.randn(6))
    opt = MeZO([w], lr=0.1)
    before = w.detach().clone()
    calls = iter(range(100))

    def closure():
        if next(calls) == 1:
            raise RuntimeError("out of memory")
        return quadratic(w)

    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step(closure)
    assert torch.equal(w.detach(), before)


def test_fzoo_zero_sigma_makes_no_update_and_is_reported():
    w = torch.nn.Parameter(torch.randn(6))
    opt = FZOO([w], lr=0.1, n_perturbations=4)
    before = w.detach().clone()
    opt.step(lambda: torch.tensor(1.0))
    assert torch.equal(w.detach(), before)
    assert opt.last_stats["skipped"] == "sigma=0.0" and opt.skipped_steps == 1


def test_gradient_accumulation_averages_losses_over_micro_batches():
    targets = [TARGET, TARGET * 0.5]
    w, opt = make("mezo", seed=2)
    for t in targets:
        opt.estimate(lambda: ((w - t) ** 2).sum())
    opt.step()
    w2, opt2 = make("mezo", seed=2)
    opt2.step(lambda: sum(((w2 - t) ** 2).sum() for t in targets) / 2)
    torch.testing.assert_close(w.detach(), w2.detach(), rtol=1e-4, atol=1e-5)  # fp32 loss rounding / 2ε
    with pytest.raises(RuntimeError, match="estimate"):
        opt.step()


def test_param_groups_and_torch_lr_scheduler():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    opt = MeZO([{"params": [a]}, {"params": [b], "lr": 0.0}], lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(4):
        opt.step(lambda: ((a - 1) ** 2).sum() + ((b - 1) ** 2).sum())
        sched.step()
    assert [r["lr"][0] for r in opt.step_log] == [0.01, 0.01, 0.005, 0.005]
    assert torch.equal(b.detach(), torch.zeros(3)) and not torch.equal(a.detach(), torch.zeros(3))


def test_construction_errors_are_clear():
    with pytest.raises(ValueError, match="no trainable tensors"):
        MeZO(torch.nn.Linear(2, 2).requires_grad_(False))
    with pytest.raises(ValueError, match="did you mean 'fzoo'"):
        zopeft.get_optimizer("fzo", [torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="n_perturbations"):
        FZOO([torch.nn.Parameter(torch.zeros(1))], n_perturbations=1)
    with pytest.raises(ValueError, match="unknown noise"):
        MeZO([torch.nn.Parameter(torch.zeros(1))], noise="uniform")
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_perturbation'"):  # a misspelled setting
        FZOO([torch.nn.Parameter(torch.zeros(1))], n_perturbation=4)


def test_register_optimizer_adds_to_registry():
    @zopeft.register_optimizer("halfmezo")
    class HalfMeZO(MeZO):
        def coefficients(self, losses):
            return [(0, self.projected_grad(losses) / 2)]

    assert "halfmezo" in zopeft.available_optimizers()
    assert isinstance(zopeft.get_optimizer("HalfMeZO", [torch.nn.Parameter(torch.zeros(1))]), HalfMeZO)


def test_a_registered_optimizer_takes_its_declared_settings_through_kwargs():
    @zopeft.register_optimizer("scaledmezo")
    class ScaledMeZO(MeZO):
        settings = {"scale": zopeft.Setting(1.0, "a factor on the step", gt=0)}

        def __init__(self, params, **kwargs):
            self.scale = kwargs.pop("scale", 1.0)
            super().__init__(params, **kwargs)

    w = [torch.nn.Parameter(torch.zeros(1))]
    assert zopeft.get_optimizer("scaledmezo", w, lr=0.1, scale=3.0).scale == 3.0
    with pytest.raises(TypeError, match="scaledmezo: unknown keyword argument 'scal' \\(did you mean 'scale'\\?\\)"):
        zopeft.get_optimizer("scaledmezo", w, lr=0.1, scal=3.0)


CURVATURE = torch.tensor([0.5, 1.0, 2.0, 4.0])


def separable(w: torch.Tensor) -> torch.Tensor:
    return 0.5 * (CURVATURE * (w - 1) ** 2).sum()


def test_hizoo_update_equals_hand_computation():
    lr, eps, alpha, wd = 0.05, 1e-2, 0.1, 0.01
    w = torch.nn.Parameter(torch.zeros(4))
    opt = zopeft.HiZOO([w], lr=lr, eps=eps, hessian_smooth=alpha, weight_decay=wd)
    assert opt.evaluations() == [None, (0, 1.0), (0, -1.0)]
    w0 = w.detach().clone()
    opt.step(lambda: separable(w))
    z = draw_noise(w.shape, noise_key(0, 0, 0, 0), w.device, "gaussian")
    l0, lp, lm = (separable(w0 + s * eps * z).item() for s in (0, 1, -1))  # Σ = 1 at the start
    sigma = torch.clamp((1 - alpha) + alpha * (lp + lm - 2 * l0) / (2 * eps**2) * (z * z - 1), min=1e-8)
    g = (lp - lm) / (2 * eps)
    torch.testing.assert_close(opt.curvature[0], sigma, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.detach(), w0 - lr * (g * z / sigma.sqrt() + wd * w0), rtol=1e-4, atol=1e-6)
    assert opt.forward_passes == 3 and "curvature" in opt.state_dict()["extra"]


def test_hizoo_curvature_converges_to_the_diagonal_of_a_separable_quadratic():
    """The estimate is unbiased but heavy-tailed (its noise scales with the other coordinates' curvature):
    time-averaged over 6000 steps it is within 20% of each entry (8-17% over seeds 0-5)."""
    w = torch.nn.Parameter(torch.zeros(4))
    opt = zopeft.HiZOO([w], lr=0.0, eps=1e-2, hessian_smooth=0.003, seed=1)
    history = []
    for _ in range(8000):
        opt.step(lambda: separable(w))
        history.append(opt.curvature[0].clone())
    estimate = torch.stack(history[2000:]).mean(0)
    torch.testing.assert_close(estimate, CURVATURE, rtol=0.2, atol=0)
    assert torch.equal(w.detach(), torch.zeros(4))  # lr = 0: the three evaluations restored exactly


def test_hizoo_refuses_rademacher_noise():
    with pytest.raises(ValueError, match="noise='gaussian'"):
        zopeft.HiZOO([torch.nn.Parameter(torch.zeros(2))], noise="rademacher")


def _lora():
    from conftest import tiny_model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))


@pytest.mark.parametrize("misuse,error,message", [
    (lambda m, b: MeZO(m, lr=1e-3).step(lambda: None), TypeError,
     "the closure returned None instead of the loss: return it (e.g. return model(**batch).loss"),
    (lambda m, b: MeZO(m, lr=1e-3).step(lambda: "0.5"), TypeError,
     "the closure returned a str; return the loss as a number or a tensor"),
    (lambda m, b: MeZO(m, lr=1e-3).step(zopeft.loss_closure(m, {"input_ids": b["input_ids"]})), TypeError,
     "the closure returned None instead of the loss: return it (e.g. return model(**batch).loss; a model given no "
     "labels computes no loss)"),
    (lambda m, b: zopeft.loss_closure(m, [b]), TypeError, "loss_closure: batch must be a mapping of the model's keyword"),
    (lambda m, b: zopeft.metric_closure(m, b), TypeError, "metric_closure: batch must be a CandidateBatch"),
    (lambda m, b: MeZO(m, lr=1e-3).step(zopeft.loss_closure(_lora(), b)), ValueError,
     "the closure's model holds none of this optimizer's trainable tensors, so its steps could not change the loss"),
    (lambda m, b: zopeft.get_optimizer("fzoo", m, lr=1e-3, n_perturbation=4), TypeError,
     "fzoo: unknown keyword argument 'n_perturbation' (did you mean 'n_perturbations'?); it takes lr, eps, "),
    (lambda m, b: zopeft.Guard(torch.optim.SGD(m.parameters(), lr=1.0)), TypeError,
     "Guard wraps a zopeft ZO optimizer (MeZO, FZOO, AdaMeZO, HiZOO or a registered one), got SGD"),
    (lambda m, b: MeZO(m, lr=1e-3).load_state_dict({"step": 3}), ValueError,
     "not a zopeft optimizer state (it lacks seed, eps, noise, "),
    (lambda m, b: MeZO(m, lr=1e-3).load_state_dict(FZOO(m, lr=1e-3).state_dict()), ValueError,
     "optimizer state was saved by FZOO, this optimizer is MeZO: continue the run with FZOO"),
    (lambda m, b: MeZO(m, lr=1e-3).replay([{"step": 0, "loss": 1.0}]), ValueError,
     "replay: record 0 is neither a step (step, lr, losses) nor a rollback (rollback_to, lr_scale); it has ['loss', "),
    (lambda m, b: MeZO(m, lr=1e-3).replay([{"step": 0, "lr": [1e-3], "losses": ["1.0", 2.0]}]), ValueError,
     "replay: record 0 (step) has losses ['1.0', 2.0], not a list of numbers; pass the records of opt.step_log"),
    (lambda m, b: MeZO(m, lr=1e-3).replay([{"step": 0, "lr": [1e-3, 1e-3], "losses": [1.0, 2.0]}]), ValueError,
     "replay: record 0 has learning rates for 2 param group(s), this optimizer has 1"),
])
def test_library_misuse_is_one_clear_error_before_anything_changes(misuse, error, message):
    from conftest import fixed_batch

    model, batch = _lora(), fixed_batch("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(error) as raised:
        misuse(model, batch)
    assert str(raised.value).startswith(message), str(raised.value)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # no weight left perturbed


@pytest.mark.parametrize("name,settings", [("mezo", {}), ("adamezo", {}), ("hizoo", {}), ("fzoo", {}),
                                           ("fzoo", {"n_perturbations": 3})])
def test_the_declared_step_cost_is_the_optimizers_loss_evaluations(name, settings):
    """eval_steps: auto prices a step without torch (zopeft.costs); the count must be the optimizer's own."""
    from zopeft.costs import step_points

    opt = zopeft.get_optimizer(name, [torch.nn.Parameter(torch.zeros(3))], lr=1e-3, **settings)
    assert step_points(name, settings) == len(opt.evaluations())
