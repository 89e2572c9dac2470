"""Unit tests for pipeline/losses.py (BT and NormBT, arXiv 2512.06343).

Expected values are derived by hand in each docstring; ``log(1 + e^-x) = -log sigmoid(x)``.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.losses import (
    DEFAULT_BETA,
    DEFAULT_EPS,
    DistanceEMA,
    bt_loss,
    bt_per_pair,
    normbt_loss,
    pair_distances,
)

LOG2 = math.log(2.0)
SOFTPLUS_NEG1 = math.log1p(math.exp(-1.0))  # -log sigmoid(1) = 0.31326...

BT_KEYS = {
    "loss",
    "pair_loss",
    "accuracy",
    "margin",
    "reward_chosen_mean",
    "reward_rejected_mean",
    "reward_mean",
    "reward_std",
}
NORMBT_KEYS = BT_KEYS | {
    "distance_mean",
    "distance_min",
    "distance_max",
    "weight_mean",
    "weight_min",
    "weight_max",
    "mu",
}


def t(values: list[float], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------- BT


@pytest.mark.unit
def test_bt_loss_hand_values_and_metrics() -> None:
    """r_c = [1, 0], r_r = [0, 0] -> D = [1, 0].

    Pair 1: -log sigmoid(1) = log(1 + e^-1) = 0.3132617; pair 2: -log sigmoid(0) = log 2.
    loss = (log(1 + e^-1) + log 2) / 2 = 0.5032044.
    accuracy = 1/2 (the tie D = 0 counts as wrong), margin = mean D = 0.5,
    reward_chosen_mean = 0.5, reward_rejected_mean = 0, rewards [1, 0, 0, 0]:
    mean = 0.25, population std = sqrt(0.25 - 0.0625) = sqrt(0.1875) = 0.4330127.
    """
    loss, metrics = bt_loss(t([1.0, 0.0]), t([0.0, 0.0]))
    expected = (SOFTPLUS_NEG1 + LOG2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert set(metrics) == BT_KEYS
    assert all(type(v) is float for v in metrics.values())
    assert metrics["loss"] == pytest.approx(expected, rel=1e-6)
    assert metrics["accuracy"] == 0.5
    assert metrics["margin"] == pytest.approx(0.5)
    assert metrics["reward_chosen_mean"] == pytest.approx(0.5)
    assert metrics["reward_rejected_mean"] == pytest.approx(0.0)
    assert metrics["reward_mean"] == pytest.approx(0.25)
    assert metrics["reward_std"] == pytest.approx(math.sqrt(0.1875), rel=1e-6)


@pytest.mark.unit
def test_bt_label_smoothing_hand_values() -> None:
    """a = 0.1. Since log(1 + e^x) = x + log(1 + e^-x):

    D = 1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e) = log(1 + e^-1) + 0.1 = 0.4132617.
    D = 0: 0.9 * log 2 + 0.1 * log 2 = log 2 (smoothing cannot move the symmetric point).
    """
    per_pair = bt_per_pair(t([1.0, 0.0]), t([0.0, 0.0]), label_smoothing=0.1)
    assert per_pair.tolist() == pytest.approx([SOFTPLUS_NEG1 + 0.1, LOG2], rel=1e-12)
    loss, _ = bt_loss(t([1.0, 0.0]), t([0.0, 0.0]), label_smoothing=0.1)
    assert loss.item() == pytest.approx((SOFTPLUS_NEG1 + 0.1 + LOG2) / 2, rel=1e-12)


@pytest.mark.unit
def test_bt_margin_hand_values() -> None:
    """r_c = [2, 2], r_r = [0, 0], m = [2, 1] -> D - m = [0, 1] -> per pair [log 2, log(1 + e^-1)].

    Accuracy and the `margin` metric describe the raw rewards (D = 2 for both pairs), not D - m.
    """
    margin = t([2.0, 1.0])
    per_pair = bt_per_pair(t([2.0, 2.0]), t([0.0, 0.0]), margin=margin)
    assert per_pair.tolist() == pytest.approx([LOG2, SOFTPLUS_NEG1], rel=1e-12)
    loss, metrics = bt_loss(t([2.0, 2.0]), t([0.0, 0.0]), margin=margin)
    assert loss.item() == pytest.approx((LOG2 + SOFTPLUS_NEG1) / 2, rel=1e-12)
    assert metrics["accuracy"] == 1.0
    assert metrics["margin"] == pytest.approx(2.0)


@pytest.mark.unit
def test_bt_centering_hand_values() -> None:
    """c = 0.01. r_c = [1, 0], r_r = [0, 0]: sums [1, 0], mean square 0.5 -> +0.005.

    r_c = [1], r_r = [1]: D = 0 -> log 2, sum 2 -> +0.01 * 4 = 0.04.
    """
    loss, _ = bt_loss(t([1.0, 0.0]), t([0.0, 0.0]), center_coef=0.01)
    assert loss.item() == pytest.approx((SOFTPLUS_NEG1 + LOG2) / 2 + 0.005, rel=1e-12)
    loss, _ = bt_loss(t([1.0]), t([1.0]), center_coef=0.01)
    assert loss.item() == pytest.approx(LOG2 + 0.04, rel=1e-12)


@pytest.mark.unit
def test_bt_gradient_hand_value() -> None:
    """d/dr_c [-log sigmoid(r_c - r_r)] / B = -(1 - sigmoid(D)) / B; B = 2, D = [1, 0] -> [-(1-s(1))/2, -1/4]."""
    chosen = t([1.0, 0.0]).requires_grad_()
    rejected = t([0.0, 0.0]).requires_grad_()
    loss, _ = bt_loss(chosen, rejected)
    loss.backward()
    expected = [-(1 - sigmoid(1.0)) / 2, -0.25]
    assert chosen.grad.tolist() == pytest.approx(expected, rel=1e-12)
    assert rejected.grad.tolist() == pytest.approx([-g for g in expected], rel=1e-12)


@pytest.mark.unit
def test_bt_large_logits_are_finite() -> None:
    """D = +-1000: -log sigmoid(1000) = 0 and -log sigmoid(-1000) = 1000 (no overflow with logsigmoid)."""
    per_pair = bt_per_pair(t([1000.0, -1000.0], torch.float32), t([0.0, 0.0], torch.float32))
    assert per_pair.tolist() == pytest.approx([0.0, 1000.0])


@pytest.mark.unit
def test_bt_low_precision_inputs_computed_in_float32() -> None:
    """bf16 rewards are upcast, so the loss is float32 and equals the float32 computation."""
    chosen, rejected = t([1.0, 0.0], torch.bfloat16), t([0.0, 0.0], torch.bfloat16)
    loss, _ = bt_loss(chosen, rejected)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((SOFTPLUS_NEG1 + LOG2) / 2, rel=1e-6)


@pytest.mark.unit
@pytest.mark.parametrize(
    "kwargs",
    [
        {"label_smoothing": -0.1},
        {"label_smoothing": 0.6},
        {"center_coef": -1.0},
        {"center_coef": float("nan")},
        {"margin": torch.zeros(3, dtype=torch.float64)},
    ],
)
def test_bt_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        bt_loss(t([1.0, 0.0]), t([0.0, 0.0]), **kwargs)


@pytest.mark.unit
def test_bt_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        bt_loss(t([1.0, 0.0]), t([0.0]))
    with pytest.raises(ValueError):
        bt_loss(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError):
        bt_loss(torch.zeros(0), torch.zeros(0))


# ----------------------------------------------------------------------- NormBT


def _hidden_3_4_5() -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs with differences (3, 4) and (-6, -8): d = [5, 10]."""
    chosen = t([[3.0, 4.0], [1.0, 1.0]])
    rejected = t([[0.0, 0.0], [7.0, 9.0]])
    return chosen, rejected


@pytest.mark.unit
def test_pair_distances_hand_values_and_detached() -> None:
    """(3, 4) -> 5, (-6, -8) -> 10; identical rows -> exactly 0; no autograd graph."""
    chosen, rejected = _hidden_3_4_5()
    chosen.requires_grad_()
    d = pair_distances(chosen, rejected)
    assert d.tolist() == [5.0, 10.0]
    assert not d.requires_grad
    assert pair_distances(torch.ones(1, 4), torch.ones(1, 4)).tolist() == [0.0]


@pytest.mark.unit
def test_normbt_weights_hand_values() -> None:
    """mu = 2, eps = 1e-3, d = [5, 10] -> w = [2/5.001, 2/10.001].

    r_c = [1, 0], r_r = [0, 0] -> per-pair BT [log(1 + e^-1), log 2],
    loss = (2/5.001 * log(1 + e^-1) + 2/10.001 * log 2) / 2.
    """
    chosen_h, rejected_h = _hidden_3_4_5()
    eps, mu = 1e-3, 2.0
    loss, metrics = normbt_loss(t([1.0, 0.0]), t([0.0, 0.0]), chosen_h, rejected_h, mu=mu, eps=eps)
    w = [mu / (5 + eps), mu / (10 + eps)]
    assert loss.item() == pytest.approx((w[0] * SOFTPLUS_NEG1 + w[1] * LOG2) / 2, rel=1e-12)
    assert set(metrics) == NORMBT_KEYS
    assert all(type(v) is float for v in metrics.values())
    assert metrics["weight_max"] == pytest.approx(w[0], rel=1e-6)
    assert metrics["weight_min"] == pytest.approx(w[1], rel=1e-6)
    assert metrics["weight_mean"] == pytest.approx(sum(w) / 2, rel=1e-6)
    assert metrics["distance_min"] == 5.0
    assert metrics["distance_max"] == 10.0
    assert metrics["distance_mean"] == 7.5
    assert metrics["mu"] == 2.0
    assert metrics["accuracy"] == 0.5


@pytest.mark.unit
def test_normbt_accepts_tensor_mu() -> None:
    """mu given as a 0-dim tensor gives the same loss as the float."""
    chosen_h, rejected_h = _hidden_3_4_5()
    args = (t([1.0, 0.0]), t([0.0, 0.0]), chosen_h, rejected_h)
    loss_f, _ = normbt_loss(*args, mu=2.0, eps=DEFAULT_EPS)
    loss_t, metrics = normbt_loss(*args, mu=torch.tensor(2.0), eps=DEFAULT_EPS)
    assert loss_t.item() == pytest.approx(loss_f.item(), rel=1e-12)
    assert metrics["mu"] == 2.0


@pytest.mark.unit
def test_normbt_equals_bt_when_weights_are_one() -> None:
    """Every pair has d = 5 (3-4-5 rotations), mu = 5 + eps -> w = 1 -> NormBT == BT (all options on)."""
    eps = DEFAULT_EPS
    rejected_h = t([[1.0, 2.0], [0.0, 0.0], [-1.0, 1.0], [2.0, 2.0]])
    chosen_h = rejected_h + t([[3.0, 4.0], [4.0, -3.0], [0.0, 5.0], [-5.0, 0.0]])
    chosen, rejected = t([0.5, -1.0, 2.0, 0.0]), t([0.0, 0.3, -1.0, 0.0])
    kwargs = {"margin": t([0.1, 0.0, 0.5, 0.2]), "label_smoothing": 0.05, "center_coef": 0.01}
    bt, bt_metrics = bt_loss(chosen, rejected, **kwargs)
    nbt, nbt_metrics = normbt_loss(chosen, rejected, chosen_h, rejected_h, mu=5.0 + eps, eps=eps, **kwargs)
    assert nbt.item() == pytest.approx(bt.item(), rel=1e-12)
    assert nbt_metrics["weight_min"] == pytest.approx(1.0) and nbt_metrics["weight_max"] == pytest.approx(1.0)
    for key in BT_KEYS:
        assert nbt_metrics[key] == pytest.approx(bt_metrics[key], rel=1e-6)


@pytest.mark.unit
def test_normbt_centering_is_unweighted() -> None:
    """d = [5, 10], mu = 2: loss(c=0.01) - loss(c=0) = 0.01 * mean((r_c + r_r)^2) = 0.01 * 0.5, not scaled by w."""
    chosen_h, rejected_h = _hidden_3_4_5()
    args = (t([1.0, 0.0]), t([0.0, 0.0]), chosen_h, rejected_h)
    base, _ = normbt_loss(*args, mu=2.0, eps=DEFAULT_EPS)
    centered, _ = normbt_loss(*args, mu=2.0, eps=DEFAULT_EPS, center_coef=0.01)
    assert centered.item() - base.item() == pytest.approx(0.005, rel=1e-9)


@pytest.mark.unit
def test_normbt_identical_pair_is_finite_everywhere() -> None:
    """Pair 0 has h_c == h_r (d = 0): its weight is mu / eps = 1000, and with a shared linear head
    r_c = r_r so its BT term is log 2; loss, weights and all gradients must be finite.
    """
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 1, dtype=torch.float64)
    shared = torch.randn(1, 4, dtype=torch.float64)
    chosen_h = torch.cat([shared, torch.randn(2, 4, dtype=torch.float64)]).requires_grad_()
    rejected_h = torch.cat([shared, torch.randn(2, 4, dtype=torch.float64)]).requires_grad_()
    chosen = head(chosen_h).squeeze(-1)
    rejected = head(rejected_h).squeeze(-1)
    chosen.retain_grad()
    rejected.retain_grad()

    loss, metrics = normbt_loss(chosen, rejected, chosen_h, rejected_h, mu=1.0, eps=DEFAULT_EPS)
    loss.backward()

    assert torch.isfinite(loss)
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["distance_min"] == 0.0
    assert metrics["weight_max"] == pytest.approx(1.0 / DEFAULT_EPS, rel=1e-6)
    for grad in (
        chosen.grad,
        rejected.grad,
        chosen_h.grad,
        rejected_h.grad,
        head.weight.grad,
        head.bias.grad,
    ):
        assert grad is not None and torch.isfinite(grad).all()
    # The identical pair's own gradient: w * -(1 - sigmoid(0)) / B = 1000 * -0.5 / 3.
    assert chosen.grad[0].item() == pytest.approx(-0.5 / DEFAULT_EPS / 3, rel=1e-9)


@pytest.mark.unit
def test_normbt_all_pairs_identical_float32() -> None:
    """B = 2, both pairs identical, float32: d = 0, w = mu/eps, loss = (mu/eps) * log 2, finite grads."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 8).requires_grad_()
    head = torch.nn.Linear(8, 1)
    chosen = head(hidden).squeeze(-1)
    rejected = head(hidden.clone()).squeeze(-1)
    loss, _ = normbt_loss(chosen, rejected, hidden, hidden.clone(), mu=0.5, eps=DEFAULT_EPS)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 / DEFAULT_EPS * LOG2, rel=1e-5)
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(head.weight.grad).all()


@pytest.mark.unit
def test_normbt_no_gradient_to_hidden_through_weight() -> None:
    """Rewards are independent leaves: the loss touches hidden only through stop_grad(w), so hidden gets no grad.

    d = [5, 10], mu = 2 -> d loss / d r_c,0 = -w_0 (1 - sigmoid(1)) / 2 with w_0 = 2 / 5.001.
    """
    chosen_h, rejected_h = _hidden_3_4_5()
    chosen_h.requires_grad_()
    rejected_h.requires_grad_()
    chosen = t([1.0, 0.0]).requires_grad_()
    rejected = t([0.0, 0.0]).requires_grad_()
    loss, _ = normbt_loss(chosen, rejected, chosen_h, rejected_h, mu=2.0, eps=1e-3)
    loss.backward()
    assert chosen_h.grad is None or not chosen_h.grad.any()
    assert rejected_h.grad is None or not rejected_h.grad.any()
    assert chosen.grad[0].item() == pytest.approx(-(2 / 5.001) * (1 - sigmoid(1.0)) / 2, rel=1e-12)


def _pair_with(
    d: float, delta: float, v: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """A pair (h_c, h_r) with ||h_c - h_r|| = d and v . (h_c - h_r) = delta (needs |delta| <= d ||v||)."""
    v_hat = v / v.norm()
    noise = torch.randn(v.shape, generator=generator, dtype=v.dtype)
    ortho = noise - (noise @ v_hat) * v_hat
    ortho = ortho / ortho.norm()
    a = delta / (d * v.norm().item())
    diff = d * (a * v_hat + math.sqrt(1 - a * a) * ortho)
    rejected = torch.randn(v.shape, generator=generator, dtype=v.dtype)
    return (rejected + diff).unsqueeze(0), rejected.unsqueeze(0)


@pytest.mark.unit
def test_per_pair_gradient_norm_bt_scales_with_d_normbt_does_not() -> None:
    """Linear head r = v . h + b on fixed features, one pair at a time (B = 1, so the mean is the pair itself).

    BT: dL/dv = -(1 - sigmoid(D)) (h_c - h_r)  ->  ||grad|| = |sigmoid(D) - 1| * d.
    NormBT: the same times w = mu / (d + eps)  ->  ||grad|| = mu |sigmoid(D) - 1| d / (d + eps) ~ mu |sigmoid(D) - 1|.
    d spans 1e-2 .. 1e2 (4 orders of magnitude) with D controlled to stay O(1).
    """
    gen = torch.Generator().manual_seed(1234)
    dim, mu = 16, 1.7
    v0 = torch.randn(dim, generator=gen, dtype=torch.float64)
    v0 = 100.0 * v0 / v0.norm()  # ||v|| = 100 so that |D| <= d ||v|| holds for d = 1e-2
    b = torch.tensor(0.3, dtype=torch.float64)
    for d, delta in [(1e-2, 0.7), (0.37, -0.4), (1.0, 1.5), (12.0, -2.0), (100.0, 0.25)]:
        h_c, h_r = _pair_with(d, delta, v0, gen)
        expected_bt = abs(sigmoid(delta) - 1.0) * d
        for eps in (DEFAULT_EPS, 1e-9):
            v = v0.clone().requires_grad_()
            loss, _ = bt_loss(h_c @ v + b, h_r @ v + b)
            (grad,) = torch.autograd.grad(loss, v)
            assert grad.norm().item() == pytest.approx(expected_bt, rel=1e-9)

            v = v0.clone().requires_grad_()
            loss, _ = normbt_loss(h_c @ v + b, h_r @ v + b, h_c, h_r, mu=mu, eps=eps)
            (grad,) = torch.autograd.grad(loss, v)
            exact = mu * abs(sigmoid(delta) - 1.0) * d / (d + eps)
            assert grad.norm().item() == pytest.approx(exact, rel=1e-9)
            if eps == 1e-9:
                assert grad.norm().item() == pytest.approx(mu * abs(sigmoid(delta) - 1.0), rel=1e-6)


@pytest.mark.unit
def test_mean_of_equal_shards_equals_global_loss() -> None:
    """Both losses are means over pairs (and the centering a mean too), so with the same mu the
    average of per-rank losses over equal shards equals the global loss.
    """
    gen = torch.Generator().manual_seed(7)
    batch, dim = 8, 6
    chosen, rejected = torch.randn(batch, generator=gen), torch.randn(batch, generator=gen)
    chosen_h, rejected_h = torch.randn(batch, dim, generator=gen), torch.randn(batch, dim, generator=gen)
    margin = torch.rand(batch, generator=gen)
    kwargs = {"margin": margin, "label_smoothing": 0.1, "center_coef": 0.01}
    mu = pair_distances(chosen_h, rejected_h).mean()  # the global mean, as an all-reduce would give

    def shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        return x.chunk(world)[rank]

    global_bt, _ = bt_loss(chosen, rejected, **kwargs)
    global_nbt, _ = normbt_loss(chosen, rejected, chosen_h, rejected_h, mu=mu, eps=DEFAULT_EPS, **kwargs)
    for world in (2, 4):
        bt_parts, nbt_parts = [], []
        for rank in range(world):
            args = [shard(x, rank, world) for x in (chosen, rejected, chosen_h, rejected_h)]
            kw = {**kwargs, "margin": shard(margin, rank, world)}
            bt_parts.append(bt_loss(args[0], args[1], **kw)[0])
            nbt_parts.append(normbt_loss(*args, mu=mu, eps=DEFAULT_EPS, **kw)[0])
        assert torch.stack(bt_parts).mean().item() == pytest.approx(global_bt.item(), rel=1e-6)
        assert torch.stack(nbt_parts).mean().item() == pytest.approx(global_nbt.item(), rel=1e-6)


@pytest.mark.unit
@pytest.mark.parametrize("eps", [0.0, -1e-3, float("nan"), float("inf")])
def test_normbt_rejects_bad_eps(eps: float) -> None:
    chosen_h, rejected_h = _hidden_3_4_5()
    with pytest.raises(ValueError, match="eps"):
        normbt_loss(t([1.0, 0.0]), t([0.0, 0.0]), chosen_h, rejected_h, mu=1.0, eps=eps)


@pytest.mark.unit
@pytest.mark.parametrize(
    "mu",
    [0.0, -1.0, float("nan"), float("inf"), torch.tensor(0.0), torch.tensor(float("nan")), torch.ones(1)],
)
def test_normbt_rejects_bad_mu(mu: float | torch.Tensor) -> None:
    chosen_h, rejected_h = _hidden_3_4_5()
    with pytest.raises(ValueError, match="mu"):
        normbt_loss(t([1.0, 0.0]), t([0.0, 0.0]), chosen_h, rejected_h, mu=mu, eps=DEFAULT_EPS)


@pytest.mark.unit
def test_normbt_rejects_mismatched_hidden() -> None:
    chosen_h, rejected_h = _hidden_3_4_5()
    with pytest.raises(ValueError):
        normbt_loss(t([1.0, 0.0, 2.0]), t([0.0, 0.0, 0.0]), chosen_h, rejected_h, mu=1.0, eps=DEFAULT_EPS)
    with pytest.raises(ValueError):
        normbt_loss(t([1.0, 0.0]), t([0.0, 0.0]), chosen_h, rejected_h[:, :1], mu=1.0, eps=DEFAULT_EPS)


# ------------------------------------------------------------------ DistanceEMA


@pytest.mark.unit
def test_distance_ema_first_update_then_formula() -> None:
    """beta = 0.9: update(2) -> 2 (first call sets mu); update(4) -> 0.9*2 + 0.1*4 = 2.2."""
    ema = DistanceEMA()
    assert ema.beta == DEFAULT_BETA == 0.9
    assert ema.mu is None and ema.steps == 0
    assert ema.update(2.0) == 2.0
    assert ema.update(torch.tensor(4.0)) == pytest.approx(2.2, rel=1e-12)
    assert ema.mu == pytest.approx(2.2, rel=1e-12)
    assert ema.steps == 2


@pytest.mark.unit
def test_distance_ema_state_dict_round_trip() -> None:
    """Restore after 2 steps (mu = 2.2), then update(1) on both: 0.9*2.2 + 0.1*1 = 2.08."""
    ema = DistanceEMA(beta=0.9)
    ema.update(2.0)
    ema.update(4.0)
    state = ema.state_dict()
    assert state == {"beta": 0.9, "mu": pytest.approx(2.2), "steps": 2}

    restored = DistanceEMA(beta=0.5)
    restored.load_state_dict(state)
    assert restored.beta == 0.9 and restored.steps == 2
    for value in (1.0, 3.0, 0.5):
        assert restored.update(value) == ema.update(value)
    assert restored.state_dict() == ema.state_dict()
    assert restored.steps == 5

    fresh = DistanceEMA()
    fresh.load_state_dict(DistanceEMA(beta=0.8).state_dict())
    assert fresh.mu is None and fresh.beta == 0.8 and fresh.update(3.0) == 3.0


@pytest.mark.unit
@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5, float("nan")])
def test_distance_ema_rejects_bad_beta(beta: float) -> None:
    with pytest.raises(ValueError, match="beta"):
        DistanceEMA(beta=beta)


@pytest.mark.unit
@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), -1.0, torch.tensor(float("nan")), torch.ones(2)]
)
def test_distance_ema_rejects_bad_input(value: float | torch.Tensor) -> None:
    ema = DistanceEMA()
    ema.update(1.0)
    with pytest.raises(ValueError):
        ema.update(value)
    assert ema.mu == 1.0 and ema.steps == 1  # a rejected value leaves the state untouched


@pytest.mark.unit
def test_distance_ema_rejects_inconsistent_state() -> None:
    ema = DistanceEMA()
    with pytest.raises(KeyError):
        ema.load_state_dict({"beta": 0.9, "mu": 1.0})
    with pytest.raises(ValueError):
        ema.load_state_dict({"beta": 0.9, "mu": None, "steps": 3})
    with pytest.raises(ValueError):
        ema.load_state_dict({"beta": 0.9, "mu": float("nan"), "steps": 3})


@pytest.mark.unit
def test_ema_feeds_normbt_end_to_end() -> None:
    """Caller pattern: d = pair_distances, mu = ema.update(d.mean()), then normbt_loss(mu=mu).

    d = [5, 10] -> first mu = 7.5 -> w = [7.5/5.001, 7.5/10.001].
    """
    chosen_h, rejected_h = _hidden_3_4_5()
    ema = DistanceEMA()
    mu = ema.update(pair_distances(chosen_h, rejected_h).mean())
    assert mu == 7.5
    _, metrics = normbt_loss(t([1.0, 0.0]), t([0.0, 0.0]), chosen_h, rejected_h, mu=mu, eps=1e-3)
    assert metrics["weight_max"] == pytest.approx(7.5 / 5.001, rel=1e-6)
    assert metrics["weight_min"] == pytest.approx(7.5 / 10.001, rel=1e-6)


# ---------------------------------------------------------------- baselines and ablations (reviewers, paper)


def test_cosine_distance_is_one_minus_cos_and_zero_for_identical_pairs():
    from pipeline.losses import pair_distances as distances

    hc = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    hr = torch.tensor([[0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [1.0, 0.0]])
    got = distances(hc, hr, kind="cosine")
    assert got.tolist() == pytest.approx([1.0, 0.0, 2.0, 1.0], abs=1e-6)  # orthogonal, same, opposite, zero vector
    assert distances(hc * 10, hr, kind="cosine").tolist() == pytest.approx(got.tolist(), abs=1e-6)  # scale-blind
    with pytest.raises(ValueError, match="distance kind"):
        distances(hc, hr, kind="manhattan")


def test_normbt_with_cosine_distance_weights_pairs_by_mu_over_cosine_distance():
    """Two pairs with cosine distances 1 and 2, mu = 1.5, equal rewards (each BT term log 2):
    weights 1.5/(1+eps) and 1.5/(2+eps), loss = log 2 * mean(weights)."""
    hc = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    hr = torch.tensor([[0.0, 5.0], [-1.0, 0.0]])
    r = torch.zeros(2, requires_grad=True)
    loss, metrics = normbt_loss(r, r.detach().clone(), hc, hr, mu=1.5, eps=1e-3, distance="cosine")
    weights = [1.5 / (1 + 1e-3), 1.5 / (2 + 1e-3)]
    assert loss.item() == pytest.approx(LOG2 * sum(weights) / 2)
    assert metrics["distance_mean"] == pytest.approx(1.5) and metrics["weight_max"] == pytest.approx(weights[0])
    l2_loss, _ = normbt_loss(r, r.detach().clone(), hc, hr, mu=1.5, eps=1e-3)
    assert l2_loss.item() != pytest.approx(loss.item())  # the L2 distances (5.10, 4) weight differently


def test_no_ema_is_each_steps_own_batch_mean():
    """The paper's no-EMA ablation is loss.beta = 0: mu is the step's own (global) batch-mean distance."""
    ema = DistanceEMA(0.0)
    assert [ema.update(m) for m in (2.0, 5.0, 1.0)] == [2.0, 5.0, 1.0]
    hc, hr = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.zeros(2, 2)  # distances 5 and 1: batch mean 3
    r = torch.zeros(2)
    mu = DistanceEMA(0.0).update(pair_distances(hc, hr).mean())
    _, metrics = normbt_loss(r, r, hc, hr, mu=mu, eps=1e-3)
    assert metrics["mu"] == pytest.approx(3.0)


def test_clipped_bt_caps_each_pairs_score_head_gradient_at_c():
    """Rewards r_c - r_r = 0 (sigmoid(-0) = 1/2), distances 1 and 8, c = 1: head-gradient norms 0.5 and 4,
    weights 1 and 1/4; the clipped pair's gradient norm becomes exactly c, the other is untouched."""
    from pipeline.losses import clip_weights, clipped_bt_loss, pair_gradient_norms

    hc = torch.tensor([[1.0, 0.0], [0.0, 8.0]])
    hr = torch.zeros(2, 2)
    rc, rr = torch.zeros(2, requires_grad=True), torch.zeros(2)
    d = pair_distances(hc, hr)
    weights = clip_weights(rc, rr, d, clip=1.0)
    assert weights.tolist() == pytest.approx([1.0, 0.25])
    assert pair_gradient_norms(rc, rr, d, weights=weights).tolist() == pytest.approx([0.5, 1.0])
    loss, metrics = clipped_bt_loss(rc, rr, hc, hr, clip=1.0)
    assert loss.item() == pytest.approx(LOG2 * (1.0 + 0.25) / 2)
    assert metrics["clipped_share"] == pytest.approx(0.5) and metrics["weight_min"] == pytest.approx(0.25)
    loss.backward()  # the weight is a constant: d loss / d r_c,i = -w_i * sigmoid(-0) / B
    assert rc.grad.tolist() == pytest.approx([-0.25, -0.0625])
    # the spec's formula min(1, c / (sigmoid(-m) d)) at another margin: m = 2, d = 8
    m = torch.tensor([2.0])
    w = clip_weights(m, torch.zeros(1), torch.tensor([8.0]), clip=0.5)
    assert w.item() == pytest.approx(min(1.0, 0.5 / (torch.sigmoid(-m).item() * 8.0)))
    with pytest.raises(ValueError, match="clip"):
        clip_weights(rc, rr, d, clip=0.0)


def test_mean_pooled_averages_only_real_tokens():
    from pipeline.losses import mean_pooled

    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert mean_pooled(hidden, mask).tolist() == [[2.0, 3.0], [5.0, 6.0]]
    assert mean_pooled(hidden, torch.zeros(2, 3)).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    with pytest.raises(ValueError, match="attention_mask"):
        mean_pooled(hidden, mask[:, :2])


def test_head_input_layernorm_has_no_affine_and_removes_scale():
    from pipeline.losses import head_input_layernorm

    h = torch.tensor([[1.0, 2.0, 3.0, 6.0]], dtype=torch.bfloat16)
    got = head_input_layernorm(h)
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert got.dtype == torch.float32
    assert got[0].tolist() == pytest.approx(((x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-5)).tolist(),
                                            abs=1e-5)
    assert head_input_layernorm(h.float() * 100)[0].tolist() == pytest.approx(got[0].tolist(), abs=1e-4)
