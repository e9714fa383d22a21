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
(DeepSeekMath eq. 4, unbiased and positive); for a flow step the closed form of two Gaussians with the
same std, |mu - mu_ref|^2 / (2 std^2) (Flow-GRPO), given by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
