"""Pairwise reward-model losses: Bradley-Terry (BT) and NormBT.

Pure tensor functions in the style of torchtune's losses: every loss takes reward
tensors (and, for NormBT, pair representations) and returns ``(loss, metrics)``,
where ``loss`` is a differentiable 0-dim tensor and ``metrics`` a dict of python
floats computed without gradient and with a single device synchronisation.

References:
    * NormBT: "Normalized Bradley-Terry" reward modelling, arXiv 2512.06343. Each
      pair's BT term is reweighted by ``mu / (d + eps)`` where ``d`` is the L2
      distance between the chosen and rejected representations and ``mu`` an
      EMA of the batch-mean distance, so that the per-pair gradient of a linear
      reward head no longer scales with ``d``.
    * Reward centering: Eisenstein et al., "Helping or Herding?", arXiv 2312.09244,
      penalty ``center_coef * mean((r_c + r_r)^2)``.
    * Baselines and ablations of NormBT (the ICLR 2026 reviews of arXiv 2512.06343 and the paper's own
      ablations): LayerNorm on the score head's input (:func:`head_input_layernorm`), per-pair gradient clipping
      at the score head (:func:`clipped_bt_loss`), cosine distance (``pair_distances(..., kind="cosine")``),
      mean-pooled distance (:func:`mean_pooled`), and no EMA (:class:`DistanceEMA` with ``beta = 0``).

Only ``torch`` and the standard library are imported here on purpose: the losses
are unit-tested without Ray / DeepSpeed / transformers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "clip_weights",
    "clipped_bt_loss",
    "head_input_layernorm",
    "mean_pooled",
    "pair_gradient_norms",
    "check_label_smoothing",
    "DEFAULT_BETA",
    "DEFAULT_EPS",
    "DistanceEMA",
    "bt_loss",
    "bt_per_pair",
    "normbt_loss",
    "pair_distances",
]

#: EMA decay for the running mean pair distance ``mu`` (the paper's value).
DEFAULT_BETA: float = 0.9

#: Distances NormBT can measure a pair with: L2 (the paper's) or cosine distance ``1 - cos``.
DISTANCE_KINDS = ("l2", "cosine")

#: LayerNorm's variance floor (torch's and transformers' default).
LAYERNORM_EPS: float = 1e-5

#: Additive floor in the NormBT weight ``mu / (d + eps)``. Final-layer pair
#: distances of the backbones we train on are O(0.1-10), so 1e-3 changes the
#: weight of an ordinary pair by at most ~1% and only matters for (near-)identical
#: pairs, whose weight it caps at ``mu / eps`` instead of letting it reach inf.
DEFAULT_EPS: float = 1e-3


Metrics = dict[str, float]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # bf16/fp16 logsigmoid and norms lose too much precision; never downcast fp64.
    return torch.promote_types(x.dtype, torch.float32)


def _check_rewards(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> None:
    if chosen_rewards.ndim != 1 or chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            "chosen_rewards and rejected_rewards must both have shape [B]; got "
            f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}"
        )
    if chosen_rewards.numel() == 0:
        raise ValueError("empty batch: the loss of zero pairs is undefined")


def check_label_smoothing(label_smoothing: float) -> None:
    """``label_smoothing`` must be in [0, 0.5): at 0.5 both labels are equally likely and nothing is learnt."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")


def _check_coefs(label_smoothing: float, center_coef: float) -> None:
    check_label_smoothing(label_smoothing)
    if not (center_coef >= 0.0 and math.isfinite(center_coef)):
        raise ValueError(f"center_coef must be finite and >= 0, got {center_coef}")


def bt_per_pair(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Unreduced (label-smoothed, margin-shifted) Bradley-Terry negative log-likelihood.

    ``l_i = -(1 - a) * log sigmoid(D_i - m_i) - a * log sigmoid(-(D_i - m_i))`` with
    ``D_i = r_c,i - r_r,i``, ``a = label_smoothing`` and ``m_i = margin[i]`` (0 if
    ``margin`` is None). Uses ``F.logsigmoid`` so large ``|D|`` neither overflows nor
    underflows. Computed in at least float32.

    Args:
        chosen_rewards (torch.Tensor): rewards of the preferred responses, shape ``[B]``.
        rejected_rewards (torch.Tensor): rewards of the dispreferred responses, shape ``[B]``.
        margin (torch.Tensor | None): per-pair margin ``[B]`` the reward gap must exceed.
        label_smoothing (float): probability ``a`` in [0, 0.5) that a label is flipped.

    Returns:
        torch.Tensor: per-pair loss, shape ``[B]``.

    Raises:
        ValueError: on mismatched shapes, an empty batch or ``label_smoothing`` outside [0, 0.5).
    """
    _check_rewards(chosen_rewards, rejected_rewards)
    _check_coefs(label_smoothing, 0.0)
    dtype = _compute_dtype(chosen_rewards)
    logits = chosen_rewards.to(dtype) - rejected_rewards.to(dtype)
    if margin is not None:
        if margin.shape != chosen_rewards.shape:
            raise ValueError(
                f"margin must have shape {tuple(chosen_rewards.shape)}, got {tuple(margin.shape)}"
            )
        logits = logits - margin.to(device=logits.device, dtype=dtype)
    loss = -F.logsigmoid(logits)
    if label_smoothing > 0.0:
        # Skip the flipped term when a == 0 so the common path costs one logsigmoid.
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def _centering(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, center_coef: float
) -> torch.Tensor:
    """Reward-centering penalty ``center_coef * mean((r_c + r_r)^2)`` (arXiv 2312.09244), 0-dim."""
    dtype = _compute_dtype(chosen_rewards)
    total = chosen_rewards.to(dtype) + rejected_rewards.to(dtype)
    return center_coef * total.square().mean()


def _scalar_stats(
    loss: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    extra: dict[str, torch.Tensor] | None = None,
) -> Metrics:
    """Shared metrics; all scalars are stacked so ``.tolist()`` syncs with the device once."""
    with torch.no_grad():
        chosen = chosen_rewards.detach().float()
        rejected = rejected_rewards.detach().float()
        delta = chosen - rejected
        rewards = torch.cat([chosen, rejected])
        stats: dict[str, torch.Tensor] = {
            "loss": loss.detach().float(),
            # The plain BT loss of these pairs (no weights, margin or smoothing): NormBT's weighted loss grows
            # as mu / d grows for the close pairs it cannot yet separate, so only this one is comparable across
            # steps and losses.
            "pair_loss": F.softplus(-delta).mean(),
            # Ties (delta == 0) count as wrong: the model expressed no preference.
            "accuracy": (delta > 0).float().mean(),
            "margin": delta.mean(),
            "reward_chosen_mean": chosen.mean(),
            "reward_rejected_mean": rejected.mean(),
            "reward_mean": rewards.mean(),
            # Population std (correction=0): defined for any B >= 1.
            "reward_std": rewards.std(correction=0),
        }
        for key, value in (extra or {}).items():
            stats[key] = value.detach().float().to(chosen.device)
        values = torch.stack(list(stats.values())).tolist()
    return dict(zip(stats.keys(), values, strict=True))


def bt_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Bradley-Terry pairwise loss, averaged over pairs, plus optional reward centering.

    ``loss = mean_i bt_per_pair_i + center_coef * mean_i (r_c,i + r_r,i)^2``; see
    :func:`bt_per_pair` for the per-pair term (label smoothing, margin).

    Args:
        chosen_rewards (torch.Tensor): shape ``[B]``.
        rejected_rewards (torch.Tensor): shape ``[B]``.
        margin (torch.Tensor | None): per-pair margin, shape ``[B]``; None means 0.
        label_smoothing (float): in [0, 0.5).
        center_coef (float): weight of the centering penalty (arXiv 2312.09244), >= 0.

    Returns:
        tuple[torch.Tensor, dict[str, float]]: the 0-dim loss and metrics ``loss``,
        ``accuracy`` (fraction of pairs with ``r_c > r_r``; ties count as wrong),
        ``margin`` (mean ``r_c - r_r``), ``reward_chosen_mean``, ``reward_rejected_mean``,
        ``reward_mean`` and ``reward_std`` (over all ``2B`` rewards).
    """
    _check_coefs(label_smoothing, center_coef)
    per_pair = bt_per_pair(chosen_rewards, rejected_rewards, margin=margin, label_smoothing=label_smoothing)
    loss = per_pair.mean()
    if center_coef > 0.0:
        loss = loss + _centering(chosen_rewards, rejected_rewards, center_coef)
    return loss, _scalar_stats(loss, chosen_rewards, rejected_rewards)


def pair_distances(chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor, *, kind: str = "l2"
                   ) -> torch.Tensor:
    """Distance between the chosen and rejected representation of each pair, without gradient.

    ``kind="l2"`` (the paper's): ``d_i = ||h_c,i - h_r,i||_2``. The difference is detached *before* the norm:
    NormBT treats ``d`` as a constant (stop-gradient), and the gradient of a norm at a zero vector is NaN, so an
    identical pair must never put ``d`` on the autograd graph. The forward value for an identical pair is
    exactly 0. ``kind="cosine"``: ``d_i = 1 - cos(h_c,i, h_r,i)`` in [0, 2] (the reviewers' "other distance
    measures" ablation; blind to the representations' lengths), 0 for an identical pair, 1 when either vector
    is zero (torch's ``cosine_similarity`` floors the norms at 1e-8). Computed in at least float32, detached.
    Feed ``d.mean()`` (all-reduced across ranks) to :class:`DistanceEMA` before calling :func:`normbt_loss`.

    Args:
        chosen_hidden (torch.Tensor): representations of the chosen responses, shape ``[B, H]``.
        rejected_hidden (torch.Tensor): representations of the rejected responses, shape ``[B, H]``.
        kind (str): ``"l2"`` or ``"cosine"`` (:data:`DISTANCE_KINDS`).

    Returns:
        torch.Tensor: detached distances, shape ``[B]``.
    """
    if chosen_hidden.ndim != 2 or chosen_hidden.shape != rejected_hidden.shape:
        raise ValueError(
            "chosen_hidden and rejected_hidden must both have shape [B, H]; got "
            f"{tuple(chosen_hidden.shape)} and {tuple(rejected_hidden.shape)}"
        )
    if kind not in DISTANCE_KINDS:
        raise ValueError(f"distance kind must be one of {DISTANCE_KINDS}, got {kind!r}")
    dtype = _compute_dtype(chosen_hidden)
    chosen, rejected = chosen_hidden.detach().to(dtype), rejected_hidden.detach().to(dtype)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(chosen, rejected, dim=-1)).clamp_min(0.0)  # rounding can dip below 0
    return torch.linalg.vector_norm(chosen - rejected, ord=2, dim=-1)


def mean_pooled(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the final hidden states over each sequence's real (unmasked) tokens: the representation the
    paper's mean-pooled-distance ablation (arXiv 2512.06343) measures NormBT's distance on, instead of the score
    head's input. Gradient flows (the caller measures distances through :func:`pair_distances`, which detaches).

    Args:
        hidden_states (torch.Tensor): ``[N, T, H]``, the backbone's last layer.
        attention_mask (torch.Tensor): ``[N, T]``, 1 for real tokens.

    Returns:
        torch.Tensor: ``[N, H]`` in at least float32; a sequence without a real token pools to 0.
    """
    if hidden_states.ndim != 3 or attention_mask.shape != hidden_states.shape[:2]:
        raise ValueError(f"hidden_states [N, T, H] and attention_mask [N, T] expected, got "
                         f"{tuple(hidden_states.shape)} and {tuple(attention_mask.shape)}")
    mask = attention_mask.to(_compute_dtype(hidden_states)).unsqueeze(-1)
    total = (hidden_states.to(mask.dtype) * mask).sum(dim=1)
    return total / mask.sum(dim=1).clamp_min(1.0)


def head_input_layernorm(hidden: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters over the last dimension: the reviewers' baseline that normalises the
    features before the score head (Ba et al., "Layer Normalization", arXiv 1607.06450), so every pair's
    representations have zero mean and unit variance per vector and BT's per-pair gradient, proportional to the
    distance between the normalised vectors, can no longer grow with the raw representations' scale.

    Args:
        hidden (torch.Tensor): the score head's input ``[..., H]``.

    Returns:
        torch.Tensor: same shape, at least float32, ``(h - mean(h)) / sqrt(var(h) + LAYERNORM_EPS)``.
    """
    return F.layer_norm(hidden.to(_compute_dtype(hidden)), hidden.shape[-1:], eps=LAYERNORM_EPS)


def _as_positive_float(name: str, value: float | torch.Tensor) -> float:
    if isinstance(value, torch.Tensor):
        if value.ndim != 0:
            raise ValueError(f"{name} must be a float or a 0-dim tensor, got shape {tuple(value.shape)}")
        value = value.detach().item()
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def normbt_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_hidden: torch.Tensor,
    rejected_hidden: torch.Tensor,
    *,
    mu: float | torch.Tensor,
    eps: float,
    margin: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    center_coef: float = 0.0,
    distance: str = "l2",
) -> tuple[torch.Tensor, Metrics]:
    """NormBT: Bradley-Terry with each pair reweighted by its inverse representation distance (arXiv 2512.06343).

    ``d_i = ||h_c,i - h_r,i||_2``, ``w_i = stop_grad(mu / (d_i + eps))`` and
    ``loss = mean_i w_i * bt_per_pair_i + center_coef * mean_i (r_c,i + r_r,i)^2``
    (the centering penalty is not weighted). For a linear reward head the BT gradient
    of pair ``i`` has norm ``|sigmoid(D_i) - 1| * d_i``; the weight turns it into
    ``~ mu * |sigmoid(D_i) - 1|``, independent of the pair's distance.

    Gradient flows only through the rewards: the loss depends on the hidden states
    solely through ``w``, which is computed from detached tensors, so it contributes
    no gradient to ``chosen_hidden``/``rejected_hidden`` (they still receive gradient
    through the rewards if the rewards are computed from them).

    Degenerate pairs: a pair with ``h_c == h_r`` has ``d = 0`` computed safely
    (no norm on the autograd graph, so no NaN gradient) and weight ``mu / eps``, the
    largest any pair can get; ``eps > 0`` is therefore required. Loss, weights and
    gradients stay finite.

    Args:
        chosen_rewards (torch.Tensor): shape ``[B]``.
        rejected_rewards (torch.Tensor): shape ``[B]``.
        chosen_hidden (torch.Tensor): representations the reward head reads, shape ``[B, H]``.
        rejected_hidden (torch.Tensor): shape ``[B, H]``.
        mu (float | torch.Tensor): running mean pair distance (see :class:`DistanceEMA`),
            a float or 0-dim tensor; must be finite and > 0. Use the same value on every
            data-parallel rank so that per-rank losses average to the global loss.
        eps (float): additive floor in the weight denominator, > 0 (see ``DEFAULT_EPS``).
        margin (torch.Tensor | None): per-pair margin, shape ``[B]``; None means 0.
        label_smoothing (float): in [0, 0.5).
        center_coef (float): weight of the (unweighted) centering penalty, >= 0.
        distance (str): how ``d`` is measured, ``"l2"`` (the paper's) or ``"cosine"`` (an ablation;
            :func:`pair_distances`); ``mu`` must then average the same distance.

    Returns:
        tuple[torch.Tensor, dict[str, float]]: the 0-dim loss and the metrics of
        :func:`bt_loss` plus ``distance_mean/min/max``, ``weight_mean/min/max`` and ``mu``.

    Raises:
        ValueError: if ``eps <= 0``, ``mu`` is 0, negative or not finite, or shapes mismatch.
    """
    eps = float(eps)
    if not (math.isfinite(eps) and eps > 0.0):
        raise ValueError(f"eps must be finite and > 0 (it caps the weight at mu / eps), got {eps}")
    # One host sync for mu; needed to raise on a bad value instead of training on inf/NaN.
    mu_value = _as_positive_float("mu (the running mean pair distance)", mu)
    _check_coefs(label_smoothing, center_coef)
    if chosen_hidden.shape[:1] != chosen_rewards.shape:
        raise ValueError(
            f"hidden states {tuple(chosen_hidden.shape)} do not match rewards {tuple(chosen_rewards.shape)}"
        )

    per_pair = bt_per_pair(chosen_rewards, rejected_rewards, margin=margin, label_smoothing=label_smoothing)
    distances = pair_distances(chosen_hidden, rejected_hidden, kind=distance).to(device=per_pair.device)
    weights = (mu_value / (distances + eps)).to(per_pair.dtype)  # already detached via pair_distances
    loss = (weights * per_pair).mean()
    if center_coef > 0.0:
        loss = loss + _centering(chosen_rewards, rejected_rewards, center_coef)

    extra = {
        "distance_mean": distances.mean(),
        "distance_min": distances.min(),
        "distance_max": distances.max(),
        "weight_mean": weights.mean(),
        "weight_min": weights.min(),
        "weight_max": weights.max(),
    }
    metrics = _scalar_stats(loss, chosen_rewards, rejected_rewards, extra)
    metrics["mu"] = mu_value
    return loss, metrics


def clip_weights(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    distances: torch.Tensor,
    *,
    clip: float,
    margin: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair stop-gradient weights that clip each pair's score-head gradient norm at ``clip``.

    ``w_i = min(1, clip / g_i)`` with ``g_i`` the norm of the gradient pair ``i``'s BT term sends into a linear
    head (:func:`pair_gradient_norms`): ``g_i = sigmoid(-m_i) * d_i`` with ``m_i = r_c,i - r_r,i`` (margin- and
    smoothing-aware when those are on). A pair whose gradient is already below ``clip`` keeps weight 1; ``g_i = 0``
    gives 1. Per-example clipping as in DP-SGD (Abadi et al., arXiv 1607.00133), here only at the score head: the
    reviewers' baseline for NormBT, which rescales every pair instead of only the large ones.

    Args:
        chosen_rewards, rejected_rewards (torch.Tensor): shape ``[B]``.
        distances (torch.Tensor): ``||h_c - h_r||`` of the head's input, shape ``[B]``.
        clip (float): the per-pair gradient norm ``c`` > 0.

    Returns:
        torch.Tensor: float32 weights in (0, 1], shape ``[B]``, detached.
    """
    if not (math.isfinite(clip) and clip > 0.0):
        raise ValueError(f"clip must be finite and > 0, got {clip}")
    norms = pair_gradient_norms(chosen_rewards, rejected_rewards, distances, margin=margin,
                                label_smoothing=label_smoothing)
    return torch.clamp(clip / norms, max=1.0)  # clip / 0 = inf -> 1


def clipped_bt_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_hidden: torch.Tensor,
    rejected_hidden: torch.Tensor,
    *,
    clip: float,
    margin: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """BT with per-pair gradient clipping at the score head: ``loss = mean_i w_i * bt_per_pair_i`` (+ centering)
    with ``w_i = stop_grad(min(1, c / (sigmoid(-m_i) * d_i)))`` (:func:`clip_weights`), so no pair sends the head
    a gradient larger than ``c``, while pairs below it train as in BT.

    Args:
        chosen_rewards, rejected_rewards (torch.Tensor): shape ``[B]``.
        chosen_hidden, rejected_hidden (torch.Tensor): the score head's inputs ``[B, H]`` (for ``d``).
        clip (float): ``c`` > 0.
        margin, label_smoothing, center_coef: as in :func:`bt_loss`.

    Returns:
        tuple[torch.Tensor, dict[str, float]]: the 0-dim loss and the metrics of :func:`bt_loss` plus
        ``distance_mean``, ``weight_mean/min`` and ``clipped_share`` (pairs with ``w < 1``).
    """
    _check_coefs(label_smoothing, center_coef)
    per_pair = bt_per_pair(chosen_rewards, rejected_rewards, margin=margin, label_smoothing=label_smoothing)
    distances = pair_distances(chosen_hidden, rejected_hidden).to(device=per_pair.device)
    weights = clip_weights(chosen_rewards, rejected_rewards, distances, clip=clip, margin=margin,
                           label_smoothing=label_smoothing).to(per_pair.dtype)
    loss = (weights * per_pair).mean()
    if center_coef > 0.0:
        loss = loss + _centering(chosen_rewards, rejected_rewards, center_coef)
    extra = {"distance_mean": distances.mean(), "weight_mean": weights.mean(), "weight_min": weights.min(),
             "clipped_share": (weights < 1.0).float().mean()}
    return loss, _scalar_stats(loss, chosen_rewards, rejected_rewards, extra)


def pair_gradient_norms(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    distances: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    margin: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair norm of the gradient each pair's loss term sends into a linear reward head's weights.

    With ``r = v . h + b`` and ``D_i = r_c,i - r_r,i``, pair ``i``'s term ``w_i * l_i(D_i)`` has the head-weight
    gradient ``w_i * l_i'(D_i) * (h_c,i - h_r,i)``, of norm ``|w_i * l_i'(D_i)| * d_i`` (the bias cancels). This is
    the paper's (arXiv 2512.06343) mechanism made measurable: under BT (``w = 1``) the norm grows with ``d``;
    NormBT's ``w = mu / (d + eps)`` flattens it. ``l_i'`` is taken by autograd on detached rewards, so margins and
    label smoothing are covered and the training graph is untouched. Batch-mean scaling and the (unweighted)
    centering penalty are left out: this is the preference term's share, the part the paper's argument is about.

    Args:
        chosen_rewards (torch.Tensor): shape ``[B]``.
        rejected_rewards (torch.Tensor): shape ``[B]``.
        distances (torch.Tensor): ``||h_c - h_r||``, shape ``[B]``.
        weights (torch.Tensor | None): NormBT's per-pair weights ``[B]``; None means 1 (BT).
        margin (torch.Tensor | None): as in :func:`bt_per_pair`.
        label_smoothing (float): as in :func:`bt_per_pair`.

    Returns:
        torch.Tensor: float32 norms, shape ``[B]``, detached.
    """
    with torch.enable_grad():
        delta = (chosen_rewards.detach().float() - rejected_rewards.detach().float()).requires_grad_(True)
        per_pair = bt_per_pair(delta, torch.zeros_like(delta), margin=margin, label_smoothing=label_smoothing)
        (slope,) = torch.autograd.grad(per_pair.sum(), delta)
    scale = slope.abs() if weights is None else (weights.detach().float() * slope).abs()
    return (scale * distances.detach().float()).detach()


class DistanceEMA:
    """Exponential moving average ``mu`` of the batch-mean pair distance used by NormBT.

    The first :meth:`update` sets ``mu`` to its input (no zero initialisation, hence no
    bias correction needed); later ones apply ``mu <- beta * mu + (1 - beta) * mean``.

    The caller must pass the GLOBAL batch-mean distance, i.e. ``pair_distances(...).mean()``
    all-reduced (averaged) across data-parallel ranks, so that ``mu`` (and with it the
    loss) is identical on every rank. Note that :func:`normbt_loss` rejects ``mu == 0``,
    which the EMA yields only if the first batch contains nothing but identical pairs.

    Args:
        beta (float): decay in ``[0, 1)``; 0 means "use the current batch mean".
    """

    def __init__(self, beta: float = DEFAULT_BETA) -> None:
        self.beta = self._check_beta(beta)
        self._mu: float | None = None
        self._steps = 0

    @staticmethod
    def _check_beta(beta: float) -> float:
        beta = float(beta)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        return beta

    @property
    def mu(self) -> float | None:
        """Current running mean distance; None before the first update."""
        return self._mu

    @property
    def steps(self) -> int:
        """Number of updates applied so far."""
        return self._steps

    def peek(self, batch_mean_distance: float | torch.Tensor) -> float:
        """The ``mu`` that :meth:`update` would return for this value, without changing the state.

        A training step computes its loss with the peeked ``mu`` and calls :meth:`update` only once the step
        is taken, so a step skipped for a non-finite loss leaves ``mu`` untouched.

        Args:
            batch_mean_distance (float | torch.Tensor): float or 0-dim tensor, finite and >= 0.

        Returns:
            float: ``mu`` after such an update.

        Raises:
            ValueError: for a non-finite or negative value or a tensor that is not 0-dim.
        """
        if isinstance(batch_mean_distance, torch.Tensor):
            if batch_mean_distance.ndim != 0:
                raise ValueError(f"expected a 0-dim tensor, got shape {tuple(batch_mean_distance.shape)}")
            batch_mean_distance = batch_mean_distance.detach().item()
        value = float(batch_mean_distance)
        if not math.isfinite(value) or value < 0.0:
            raise ValueError(f"batch mean distance must be finite and >= 0, got {value}")
        if self._mu is None:
            return value
        return self.beta * self._mu + (1.0 - self.beta) * value

    def update(self, batch_mean_distance: float | torch.Tensor) -> float:
        """Fold in one step's global batch-mean distance and return the ``mu`` to use for this step.

        Args:
            batch_mean_distance (float | torch.Tensor): float or 0-dim tensor, finite and >= 0.

        Returns:
            float: ``mu`` after the update.

        Raises:
            ValueError: for a non-finite or negative value or a tensor that is not 0-dim.
        """
        self._mu = self.peek(batch_mean_distance)
        self._steps += 1
        return self._mu

    def state_dict(self) -> dict[str, float | int | None]:
        """Checkpointable state: ``{"beta", "mu", "steps"}``."""
        return {"beta": self.beta, "mu": self._mu, "steps": self._steps}

    def load_state_dict(self, state_dict: dict[str, float | int | None]) -> None:
        """Restore the state written by :meth:`state_dict`."""
        missing = {"beta", "mu", "steps"} - state_dict.keys()
        if missing:
            raise KeyError(f"DistanceEMA state_dict is missing {sorted(missing)}")
        beta = self._check_beta(state_dict["beta"])
        mu = state_dict["mu"]
        steps = int(state_dict["steps"])
        if mu is not None and not math.isfinite(float(mu)):
            raise ValueError(f"mu in state_dict must be finite or None, got {mu}")
        if (mu is None) != (steps == 0):
            raise ValueError(f"inconsistent state_dict: mu={mu} after {steps} steps")
        self.beta = beta
        self._mu = None if mu is None else float(mu)
        self._steps = steps
