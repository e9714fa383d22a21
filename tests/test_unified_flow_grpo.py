"""Stage 2's objective on the real tiny networks is Flow-GRPO's: the KL of each SDE step is
|mu - mu_ref|^2 / (2 sigma_t^2) (train_sd3.py, the `kl_loss` line), and the policy gradient does not flow
through the null prompt's branch of the guided velocity (its `compute_log_prob` detaches it). The older
choices stay available as options (`module.flow_kl=step`, `module.null_branch_gradient=true`)."""

import math
from contextlib import contextmanager

import pytest
import torch

from tests import sampling_helpers
from tests.conftest import compose_train
from tests.generation_helpers import one_thread  # noqa: F401  (autouse fixture)

GUIDANCE, NOISE_LEVEL, STEPS = 4.5, 0.7, 3


@pytest.fixture(scope="module")
def module(tmp_path_factory, tiny_config, photos_dir):
    from unilip.tasks.unified.setup import build_unified_training

    generator_dir = sampling_helpers.save_tiny_generator(tmp_path_factory.mktemp("tiny"), tiny_config)
    runs = tmp_path_factory.mktemp("runs")
    cfg = compose_train(
        [
            "experiment=unified/quickstart",
            "stage=2",
            f"paths.data_dir={photos_dir}",
            f"paths.runs_dir={runs}",
            f"run_dir={runs / 'flow'}",
            f"generator_from={generator_dir}",
            "captioner_from=base",
            "captioner.max_new_tokens=4",
            "module.group_size=2",
            f"module.sampling.steps={STEPS}",
            f"module.sampling.guidance_scale={GUIDANCE}",
            f"module.sampling.noise_level={NOISE_LEVEL}",
        ]
    )
    module = build_unified_training(cfg)
    module.manual_backward = lambda loss: loss.backward()  # no Trainer here
    # adapters start as the base (B = 0); move them so that the policy differs from its reference
    generator = torch.Generator().manual_seed(1)
    for name, param in module.trained.named().items():
        if "lora_B" in name:
            param.data.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return module


@pytest.fixture(scope="module")
def rollout(module):
    module.rng.manual_seed(0)
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    return module.rollout(images)


@contextmanager
def base_dit(module):
    """The DiT without its adapters, by zeroing their B matrices (what peft's adapters add is B A x)."""
    saved = {name: p.detach().clone() for name, p in module.trained.named().items() if "lora_B" in name}
    params = module.trained.named()
    try:
        for name in saved:
            params[name].data.zero_()
        yield
    finally:
        for name, value in saved.items():
            params[name].data.copy_(value)


def guided_velocity(module, rollout, x, t):
    """Classifier-free guidance written out: v_null + w (v_cond - v_null); the condition holds the N prompt
    rows, then the N null rows."""
    condition, mask = rollout.condition
    times = torch.full((2 * len(x),), t * 1000)
    both = module.networks.generator(torch.cat([x, x]), times, condition, mask).float()
    conditional, null = both.chunk(2)
    return null + GUIDANCE * (conditional - null)


def flow_grpo_step_mean(x, v, t, t_next, t_cap):
    """Flow-GRPO's SDE update (its paper's eq. 12 as sd3_sde_with_logprob.py computes it): the mean of the next
    sample and sigma_t, for dt = t_next - t < 0."""
    sigma = NOISE_LEVEL * math.sqrt(t / (1 - (t_cap if t == 1 else t)))
    dt = t_next - t
    return x * (1 + sigma**2 / (2 * t) * dt) + v * (1 + sigma**2 * (1 - t) / (2 * t)) * dt, sigma


@torch.no_grad()
def hand_kl(module, rollout):
    """Flow-GRPO's KL of every step, mean over elements / (2 sigma_t^2), then over the rows and the steps."""
    trajectory = rollout.trajectory
    times = [float(t) for t in trajectory.times]
    per_step = []
    for k in range(STEPS):
        x = trajectory.latents[k]
        policy = guided_velocity(module, rollout, x, times[k])
        with base_dit(module):
            reference = guided_velocity(module, rollout, x, times[k])
        mean, sigma = flow_grpo_step_mean(x, policy, times[k], times[k + 1], times[1])
        mean_ref, _ = flow_grpo_step_mean(x, reference, times[k], times[k + 1], times[1])
        per_step.append((((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * sigma**2)).mean().item())
    return per_step, [times[k] - times[k + 1] for k in range(STEPS)]


def losses(module, rollout, **options):
    for name, value in options.items():
        setattr(module, name, value)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    for param in module.trained.parameters():
        param.grad = None
    try:
        return module.flow_losses(rollout, advantages)
    finally:
        module.flow_kl, module.null_branch_gradient = "flow_grpo", False


def test_the_kl_is_flow_grpos_by_default_and_the_exact_step_kl_as_an_option(module, rollout):
    per_step, dts = hand_kl(module, rollout)
    assert module.flow_kl == "flow_grpo" and min(per_step) > 0
    # the module's KL is the mean over steps; fp32 forward passes of the same DiT in another batch layout
    result = losses(module, rollout)
    assert result.kl.item() == pytest.approx(sum(per_step) / STEPS, rel=1e-4)
    # module.flow_kl=step: each step's KL divided by its dt (the exact KL of the two Gaussian steps)
    step = losses(module, rollout, flow_kl="step")
    expected = sum(kl / dt for kl, dt in zip(per_step, dts, strict=True)) / STEPS
    assert step.kl.item() == pytest.approx(expected, rel=1e-4)
    assert step.kl.item() > 1.5 * result.kl.item()  # dt = 0.25, 0.74, 0.009: 3 shifted steps
    with pytest.raises(ValueError, match="flow_kl='exact'"):
        type(module)(module.networks, dict(module.trained.named()), 2, torch.optim.AdamW, flow_kl="exact")


def _null_row_gradients(module, rollout, **options):
    """The gradient of the loss with respect to the DiT's outputs on the null rows (N..2N of every guided
    forward), and the adapters' gradients."""
    grads = []

    def keep(_, __, output):
        if torch.is_tensor(output) and output.requires_grad and len(output) == 2 * len(rollout.texts):
            output.register_hook(lambda grad: grads.append(grad[len(grad) // 2 :].clone()))

    handle = module.networks.generator.dit.register_forward_hook(lambda m, a, out: keep(m, a, out[0]))
    try:
        losses(module, rollout, **options)
    finally:
        handle.remove()
    adapters = {name: p.grad.clone() for name, p in module.trained.named().items() if p.grad is not None}
    return grads, adapters


def test_the_null_prompts_branch_takes_no_gradient_by_default(module, rollout):
    grads, adapters = _null_row_gradients(module, rollout)
    assert len(grads) == STEPS and all(torch.count_nonzero(g) == 0 for g in grads)
    assert adapters and any(torch.count_nonzero(g) for g in adapters.values())  # the conditional branch trains
    # module.null_branch_gradient=true: the gradient of the guided velocity through both branches
    grads_both, adapters_both = _null_row_gradients(module, rollout, null_branch_gradient=True)
    assert len(grads_both) == STEPS and all(torch.count_nonzero(g) > 0 for g in grads_both)
    changed = [name for name in adapters if not torch.allclose(adapters[name], adapters_both[name], atol=1e-9)]
    assert changed
