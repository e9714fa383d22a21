"""GRPO's advantages and loss against numbers worked out by hand (DeepSeekMath Sec. 4.1; the KL estimator of
its eq. 4), and the flow SDE's log-probability against an independent Gaussian density."""

import math

import pytest
import torch

from unilip.pipelines.flow_sde import gaussian_log_prob, sample_sde, sde_times, step_log_prob, step_mean, step_std
from unilip.tasks.unified.grpo import group_advantages, grpo_loss, token_kl


def test_advantages_of_a_fixed_group_equal_a_hand_computation():
    # group [1, 2, 3, 6]: mean 3; population std sqrt((4 + 1 + 0 + 9) / 4) = sqrt(3.5) = 1.8708287; + eps 1e-4
    # second group [5, 5]: std 0 -> every advantage 0
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    expected = torch.tensor([-1.0689873, -0.5344937, 0.0, 1.6034810, 0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(group_advantages(rewards, 4), expected, atol=1e-6)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_grpo_loss_equals_a_hand_computation():
    # output 0: A = +1, tokens 0-1 count. ratios e^0.5 = 1.6487 (clipped to 1.2: A > 0), 1 -> mean(1.2, 1.0) = 1.1
    # output 1: A = -2, 3 tokens. ratio e^-0.5 = 0.6065: min(-1.2131, 0.8 x -2 = -1.6) = -1.6; ratio 1: -2;
    #           ratio e^0.2231 = 1.25: min(-2.5, 1.2 x -2 = -2.4) = -2.5 -> mean -6.1 / 3 = -2.0333333
    # objective (1.1 - 2.0333333) / 2 = -0.4666667; loss = 0.4666667; clipped where it bound: 2 of 5 tokens
    log_probs = torch.tensor([[-1.0, -2.0, -5.0], [-1.0, -0.5, -3.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.0, -9.0], [-0.5, -0.5, -3.0 - math.log(1.25)]])
    advantages = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    result = grpo_loss(log_probs, old, advantages, mask, clip_range=0.2)
    assert result.loss.item() == pytest.approx(0.4666667, abs=1e-6)
    assert result.policy.item() == pytest.approx(-0.4666667, abs=1e-6)
    assert result.clip_fraction.item() == pytest.approx(0.4)
    # KL: reference - policy = [ln 2, 0] and [0, -1, 1]: e^x - x - 1 = 0.3068528, 0 | 0, 0.3678794, 0.7182818
    # per output: 0.1534264 and 0.3620537 -> mean 0.2577401; beta 0.1 adds 0.0257740 -> 0.4924407
    reference = log_probs.detach() + torch.tensor([[math.log(2), 0.0, 7.0], [0.0, -1.0, 1.0]])
    kl = token_kl(log_probs, reference)
    with_kl = grpo_loss(log_probs, old, advantages, mask, clip_range=0.2, kl=kl, kl_weight=0.1)
    assert with_kl.kl.item() == pytest.approx(0.2577401, abs=1e-6)
    assert with_kl.loss.item() == pytest.approx(0.4924407, abs=1e-6)
    # a clipped token's surrogate carries no gradient, only its KL term: d(e^(q-p) - (q-p) - 1)/dp = 1 - e^(q-p),
    # over (tokens of its output x outputs): output 0, token 0: 0.1 x (1 - 2) / 2 / 2 = -0.025; output 1, token 0: 0
    with_kl.loss.backward()
    grad = log_probs.grad
    assert grad[0, 0].item() == pytest.approx(-0.025)  # clipped
    assert grad[1, 0] == 0 and grad[0, 2] == 0  # clipped; masked
    # output 1, token 1: -(-2) x 1 / 3 / 2 = 1/3; its KL term 0.1 x d(e^(q-p) - (q-p) - 1)/dp = 0.1 x (1 - e^-1) / 3 / 2
    assert grad[1, 1].item() == pytest.approx(1 / 3 + 0.1 * (1 - math.exp(-1)) / 6, abs=1e-6)


def test_on_policy_the_ratio_is_one_and_the_gradient_is_the_advantage():
    # mu = 1: old = the policy's own log-probs; d loss / d log p(t) = -A_i / (|o_i| N)
    log_probs = torch.tensor([[-0.3, -1.2], [-2.0, -0.1]], requires_grad=True)
    advantages = torch.tensor([0.5, -1.5])
    result = grpo_loss(log_probs, log_probs.detach(), advantages)
    result.loss.backward()
    assert result.ratio.item() == 1.0 and result.clip_fraction.item() == 0.0
    assert torch.allclose(log_probs.grad, torch.tensor([[-0.125, -0.125], [0.375, 0.375]]))


def test_a_one_token_caption_padding_and_the_defaults():
    """A caption of one token counts as one token (not clamped up to two), padding is out of the ratio and the
    clip fraction, the default clip range is DeepSeekMath's 0.2, and a KL given without a weight adds nothing."""
    # output 0: one token, ratio e^0.5 = 1.6487, A = +1 -> clipped to 1.2 (eps 0.2); output 1: ratio e^0 = 1,
    # A = -1 -> -1, and a padded token whose ratio e^3 would dominate any mean it entered
    log_probs = torch.tensor([[-1.0, 0.0], [-2.0, 1.0]])
    old = torch.tensor([[-1.5, 0.0], [-2.0, -2.0]])
    mask = torch.tensor([[True, False], [True, False]])
    result = grpo_loss(log_probs, old, torch.tensor([1.0, -1.0]), mask)
    assert result.policy.item() == pytest.approx((1.2 - 1.0) / 2)
    assert result.clip_fraction.item() == pytest.approx(1 / 2)
    assert result.ratio.item() == pytest.approx((math.exp(0.5) + 1.0) / 2)
    assert result.kl.item() == 0.0  # no reference: logged as 0
    single = grpo_loss(log_probs[:1, :1], old[:1, :1], torch.tensor([1.0]))
    assert single.clip_fraction.item() == 1.0 and single.ratio.item() == pytest.approx(math.exp(0.5))
    assert single.loss.item() == pytest.approx(-1.2)
    unweighted = grpo_loss(log_probs, old, torch.tensor([1.0, -1.0]), mask, kl=torch.ones(2, 2))
    assert unweighted.loss.item() == pytest.approx(result.loss.item()) and unweighted.kl.item() == 1.0


# ------------------------------------------------------------------ the flow SDE
def flow_grpo_mean(x, v, t, t_next, noise_level, t_cap):
    """Flow-GRPO's update written out as its paper's sampler states it (dt = t_next - t < 0), independently of
    the score form the library uses."""
    sigma = noise_level * math.sqrt(t / (1 - (t_cap if t == 1 else t)))
    dt = t_next - t
    mean = x * (1 + sigma**2 / (2 * t) * dt) + v * (1 + sigma**2 * (1 - t) / (2 * t)) * dt
    return mean, sigma * math.sqrt(-dt)


def test_an_sde_step_is_flow_grpos_gaussian():
    torch.manual_seed(0)
    x, v = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    for t, t_next in [(0.8, 0.6), (0.3, 0.0), (1.0, 0.9)]:
        std = step_std(t, t_next, 0.7, t_cap=0.9)
        mean, expected_std = flow_grpo_mean(x, v, t, t_next, 0.7, t_cap=0.9)
        assert std == pytest.approx(expected_std)
        assert torch.allclose(step_mean(x, v, t, t_next, std), mean, atol=1e-6)
        sample = mean + expected_std * torch.randn_like(mean)
        density = torch.distributions.Normal(mean, expected_std).log_prob(sample).flatten(1).mean(1)
        assert torch.allclose(gaussian_log_prob(sample, mean, std), density, atol=1e-5)
    assert torch.allclose(step_mean(x, v, 0.5, 0.4, 0.0), x - 0.1 * v)  # no noise: the Euler (ODE) step
    with pytest.raises(ValueError, match="needs noise"):
        step_std(0.5, 0.4, 0.0, 0.9)


def test_a_sampled_trajectorys_log_probability_matches_a_direct_gaussian_density():
    torch.manual_seed(0)
    weight = torch.randn(4, 4) * 0.3

    def velocity(x, t):  # any differentiable velocity field: a fixed linear map, time-dependent
        return torch.einsum("oc,bchw->bohw", weight, x) * (1 + t.view(-1, 1, 1, 1))

    times = sde_times(6, shift=3.0)
    assert times[0] == 1 and times[-1] == 0 and torch.all(times[1:] < times[:-1])
    noise = torch.randn(64, 4, 4, 4)
    trajectory = sample_sde(velocity, noise, times, 0.7, torch.Generator().manual_seed(3))
    assert torch.equal(trajectory.latents[0], noise) and trajectory.log_probs.shape == (6, 64)
    residuals = []
    for k in range(6):
        t, t_next = float(times[k]), float(times[k + 1])
        x = trajectory.latents[k]
        mean, std = flow_grpo_mean(x, velocity(x, torch.full((64,), t)), t, t_next, 0.7, float(times[1]))
        density = torch.distributions.Normal(mean, std).log_prob(trajectory.latents[k + 1]).flatten(1).mean(1)
        assert torch.allclose(trajectory.log_probs[k], density, atol=1e-5), k
        assert torch.allclose(step_log_prob(velocity, trajectory, k), density, atol=1e-5), k  # the training replay
        residuals.append(((trajectory.latents[k + 1] - mean) / std).flatten())
    residuals = torch.cat(residuals)  # the steps were drawn from exactly those Gaussians
    assert abs(residuals.mean().item()) < 0.02 and abs(residuals.std().item() - 1) < 0.02
    again = sample_sde(velocity, noise, times, 0.7, torch.Generator().manual_seed(3))
    assert torch.equal(again.latents, trajectory.latents)  # the same generator, the same trajectory
