"""Group Relative Policy Optimisation (GRPO; Shao et al. 2024, DeepSeekMath Sec. 4.1), as both steps of the
unified loop use it: captions are token sequences, a flow model's samples are sequences of denoising steps.

For a group of G outputs of one input with rewards r_1..r_G, output i's advantage is

    A_i = (r_i - mean(r)) / (std(r) + eps)              std over the group (population std, as Flow-GRPO)

and every element t of output i (a caption token, a denoising step) contributes

    rho = exp(log p(t) - log p_old(t))
    -min(rho A_i, clip(rho, 1 - eps_clip, 1 + eps_clip) A_i) + beta KL_t

averaged over the output's elements, then over the outputs (DeepSeekMath's 1/G sum_i 1/|o_i| sum_t).
KL_t is the policy's divergence from the reference policy (frozen, or the model with its adapters off):
for tokens the estimator exp(q - p) - (q - p) - 1 of log-probabilities p (policy) and q (reference)
(DeepSeekMath eq. 4, unbiased and positive); for a flow step `flow_kl` (Flow-GRPO's, by default).
docs/unified.md writes the whole objective out with its source lines in Flow-GRPO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unilip.pipelines.flow_sde import Trajectory, Velocity, step_log_prob


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(N * G,) rewards, each input's G outputs consecutive -> (N * G,) group-normalised advantages."""
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"{tuple(rewards.shape)} rewards do not split into groups of {group_size}")
    groups = rewards.float().view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True, correction=0)
    return ((groups - mean) / (std + eps)).view(-1)


def token_kl(log_probs: torch.Tensor, reference_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-element KL estimate exp(q - p) - (q - p) - 1 (p: the policy's log-probs, q: the reference's)."""
    delta = reference_log_probs - log_probs
    return torch.exp(delta) - delta - 1


FLOW_KL = ("flow_grpo", "step")


def flow_kl(mean: torch.Tensor, reference_mean: torch.Tensor, sigma: float, dt: float, form: str = "flow_grpo"):
    """Divergence of one SDE step from the reference's step: (B, ...) means of two Gaussians of the same std
    sigma_t sqrt(dt) -> (B,), averaged over the elements as the log-probabilities are.

    flow_grpo: |mu - mu_ref|^2 / (2 sigma_t^2), Flow-GRPO's (train_sd3.py, the `kl_loss` line): the step's KL
        times dt, so that its beta (0.04) means here what it means there.
    step: |mu - mu_ref|^2 / (2 sigma_t^2 dt), the exact KL of the two steps (summed over the steps: the KL of
        the two SDE paths); 1 / dt times Flow-GRPO's, so beta needs to be about dt times smaller.
    """
    if form not in FLOW_KL:
        raise ValueError(f"flow_kl={form!r}; use one of {FLOW_KL}")
    variance = sigma**2 * (dt if form == "step" else 1.0)
    return ((mean.float() - reference_mean.float()) ** 2).flatten(1).mean(dim=1) / (2 * variance)


@dataclass
class GRPOLoss:
    """The loss and what it is made of (scalars; `loss` carries the gradient)."""

    loss: torch.Tensor
    policy: torch.Tensor  # the clipped-surrogate part (without the sign flip: what is maximised)
    kl: torch.Tensor  # mean KL to the reference (0 without one)
    clip_fraction: torch.Tensor  # share of elements whose ratio was clipped (where it mattered)
    ratio: torch.Tensor  # mean ratio p / p_old


def grpo_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    clip_range: float = 0.2,
    kl: torch.Tensor | None = None,
    kl_weight: float = 0.0,
) -> GRPOLoss:
    """The GRPO objective of the module docstring.

    Args:
        log_probs: (N, T) log-probabilities of the sampled elements under the policy being trained.
        old_log_probs: (N, T) the same under the policy that sampled them (no gradient).
        advantages: (N,) one per output.
        mask: (N, T) bool, True on the elements that count (caption tokens up to their end); None: all.
        clip_range: eps_clip of the clipped ratio.
        kl: (N, T) per-element divergence from the reference policy, or None.
        kl_weight: beta.
    """
    if mask is None:
        mask = torch.ones_like(log_probs, dtype=torch.bool)
    weights = mask.float()
    lengths = weights.sum(dim=1).clamp(min=1)
    ratio = torch.exp(log_probs - old_log_probs.detach())
    advantage = advantages.detach().float().unsqueeze(1)
    unclipped = ratio * advantage
    clipped = ratio.clamp(1 - clip_range, 1 + clip_range) * advantage
    surrogate = torch.minimum(unclipped, clipped)
    per_element = -surrogate
    kl_mean = torch.zeros((), device=log_probs.device)
    if kl is not None:
        per_element = per_element + kl_weight * kl
        kl_mean = ((kl.detach() * weights).sum(dim=1) / lengths).mean()
    loss = ((per_element * weights).sum(dim=1) / lengths).mean()
    with torch.no_grad():
        policy = ((surrogate * weights).sum(dim=1) / lengths).mean()
        was_clipped = (clipped < unclipped).float()
        clip_fraction = (was_clipped * weights).sum() / weights.sum().clamp(min=1)
        mean_ratio = (ratio * weights).sum() / weights.sum().clamp(min=1)
    return GRPOLoss(loss, policy, kl_mean, clip_fraction, mean_ratio)


def flow_step_loss(
    velocity: Velocity,
    reference: Velocity | None,
    trajectory: Trajectory,
    k: int,
    advantages: torch.Tensor,
    old_log_probs: torch.Tensor | None = None,
    clip_range: float = 0.2,
    kl_weight: float = 0.0,
    kl_form: str = "flow_grpo",
) -> GRPOLoss:
    """GRPO on step k of B SDE trajectories (Flow-GRPO's loss of one timestep): the step's log-probability
    under `velocity` (with gradient), its ratio to `old_log_probs` (B,) (None: its own value detached, on-policy),
    and with `kl_weight` > 0 the `flow_kl` of its mean from `reference`'s (no gradient). `advantages`: (B,)."""
    log_prob, mean = step_log_prob(velocity, trajectory, k, with_mean=True)
    old = log_prob.detach() if old_log_probs is None else old_log_probs
    kl = None
    if kl_weight > 0:
        if reference is None:
            raise ValueError("kl_weight > 0 needs a reference velocity")
        with torch.no_grad():
            _, reference_mean = step_log_prob(reference, trajectory, k, with_mean=True)
        kl = flow_kl(mean, reference_mean, trajectory.sigma(k), trajectory.dt(k), kl_form).unsqueeze(1)
    return grpo_loss(log_prob.unsqueeze(1), old.unsqueeze(1), advantages, None, clip_range, kl, kl_weight)
