"""Stochastic sampling of a rectified-flow model with a log-probability per step (Flow-GRPO, Liu et al. 2025).

The ODE sampler x_{t - d} = x_t - d v is deterministic, so its steps have no likelihood and no policy
gradient. The SDE with the ODE's marginals (forward process x_t = (1 - t) x0 + t n, velocity v = n - x0,
score s = -(x_t + (1 - t) v) / t) runs backwards in t as

    x_{t - d} = x_t - d (v - sigma_t^2 / 2 * s) + sigma_t sqrt(d) eps,      sigma_t = a sqrt(t / (1 - t))

so every step is a Gaussian with mean mu(x_t) and std sigma_t sqrt(d): its log-density at the step that was
taken is the step's log-probability, differentiable through v. `a` is the noise level (0.7 in Flow-GRPO);
at t = 1, where 1 - t is 0, the std's denominator takes the next time instead (Flow-GRPO's choice).
Log-probabilities are averaged over the latent's elements (per dimension), as Flow-GRPO averages them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B, C, h, w), t (B,) in [0, 1]) -> v


def sde_times(steps: int, shift: float) -> torch.Tensor:
    """(steps + 1,) times from 1 down to 0: the shifted schedule of diffusers' flow-matching Euler sampler."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.float().cpu()


def step_std(t: float, t_next: float, noise_level: float, t_cap: float) -> float:
    """The std sigma_t sqrt(d) of one step from t to t_next < t; at t = 1 the denominator 1 - t is 1 - `t_cap`."""
    if noise_level <= 0:
        raise ValueError(f"noise_level={noise_level}: the SDE needs noise (> 0) for its steps to have a likelihood")
    sigma = noise_level * math.sqrt(t / (1 - (t_cap if t >= 1 else t)))
    return sigma * math.sqrt(t - t_next)


def step_mean(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float, std: float) -> torch.Tensor:
    """The mean of x_{t_next} given x_t = x and velocity v (see the module docstring); `std` = sigma_t sqrt(d)."""
    d = t - t_next
    sigma_sq = std**2 / d
    score_term = (x + (1 - t) * v) * (sigma_sq / (2 * t))  # -sigma^2 / 2 * score
    return x - d * (v + score_term)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """log N(x; mean, std^2) averaged over all but the first dimension -> (B,)."""
    log_density = -((x.float() - mean.float()) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.flatten(1).mean(dim=1)


@dataclass
class Trajectory:
    """One batch of SDE samples: the latents at every time, and each step's log-probability and std."""

    latents: torch.Tensor  # (K + 1, B, C, h, w): x at times[0] = 1 (the noise) ... times[K] = 0 (the sample)
    log_probs: torch.Tensor  # (K, B) log-probability of step k (from times[k] to times[k + 1])
    times: torch.Tensor  # (K + 1,)
    stds: tuple[float, ...]  # (K,)

    @property
    def samples(self) -> torch.Tensor:
        return self.latents[-1]

    def dt(self, k: int) -> float:
        """Step k's length in time, t_k - t_{k+1} > 0."""
        return float(self.times[k]) - float(self.times[k + 1])  # as `step_std` takes it

    def sigma(self, k: int) -> float:
        """Step k's noise level sigma_t (its std is sigma_t sqrt(dt)): Flow-GRPO's `std_dev_t`."""
        return self.stds[k] / math.sqrt(self.dt(k))


def step_log_prob(
    velocity: Velocity, trajectory: Trajectory, k: int, with_mean: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Step k's log-probability under `velocity` (e.g. the policy being trained, with gradient): (B,)
    (and the step's mean, e.g. for a KL between two velocities)."""
    t, t_next = float(trajectory.times[k]), float(trajectory.times[k + 1])
    x = trajectory.latents[k]
    v = velocity(x, torch.full((x.shape[0],), t, device=x.device))
    mean = step_mean(x.float(), v.float(), t, t_next, trajectory.stds[k])
    log_prob = gaussian_log_prob(trajectory.latents[k + 1], mean, trajectory.stds[k])
    return (log_prob, mean) if with_mean else log_prob


@torch.no_grad()
def sample_sde(
    velocity: Velocity,
    noise: torch.Tensor,
    times: torch.Tensor,
    noise_level: float = 0.7,
    generator: torch.Generator | None = None,
) -> Trajectory:
    """Run the SDE from `noise` (B, C, h, w) at t = 1 through `times`; the step noise is drawn on the host
    from `generator` (so a run is reproducible and resumable whatever the device)."""
    x = noise.float()
    latents, log_probs, stds = [x], [], []
    t_cap = float(times[1])
    for k in range(len(times) - 1):
        t, t_next = float(times[k]), float(times[k + 1])
        std = step_std(t, t_next, noise_level, t_cap)
        v = velocity(x, torch.full((x.shape[0],), t, device=x.device))
        mean = step_mean(x, v.float(), t, t_next, std)
        eps = torch.randn(x.shape, generator=generator).to(x.device)
        x = mean + std * eps
        latents.append(x)
        log_probs.append(gaussian_log_prob(x, mean, std))
        stds.append(std)
    return Trajectory(torch.stack(latents), torch.stack(log_probs), times, tuple(stds))
