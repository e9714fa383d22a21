"""Stage 2's GRPO against Flow-GRPO's own code, on a toy velocity model, when a checkout of it is at hand
(skipped otherwise; written against yifan123/flow_grpo at ac4c86e8):

    UNILIP_FLOW_GRPO=/path/to/flow_grpo pytest tests/test_flow_grpo_parity.py

Its functions are called as they are: `sde_step_with_logprob` (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py),
`PerPromptStatTracker` (flow_grpo/stat_tracking.py), and from scripts/train_sd3.py, which cannot be imported
without its training stack, `compute_log_prob` and the statements of one timestep's GRPO loss (the clipped
ratio and the KL), read from the file and executed unchanged. Compared, to 1e-6: the SDE steps and their
log-probabilities, the advantages, each step's replayed log-probability, KL and loss, and the gradient and
the parameters after one policy-gradient step (through guided velocities, whose null branch Flow-GRPO
detaches). docs/unified.md writes the objective out with these source lines.
"""

from __future__ import annotations

import ast
import copy
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

FLOW_GRPO = os.environ.get("UNILIP_FLOW_GRPO")
pytestmark = pytest.mark.skipif(not FLOW_GRPO, reason="set UNILIP_FLOW_GRPO to a checkout of yifan123/flow_grpo")

TOLERANCE = 1e-6  # fp32 on both sides, the same formulas in another order (see `close`)
# A gradient through step k carries (x_next - mean) / std^2: a rounding of the mean (~1e-7 of |x| ~ 7) moves it
# by up to ~1e-7 |x| / std relative, 1e-4 at the last step (std 0.006); summed over steps and elements, measured
# here: 3e-6 of the largest element.
GRADIENT_TOLERANCE = 1e-5
STEPS, SHIFT, NOISE_LEVEL, GUIDANCE, BETA, CLIP = 10, 3.0, 0.7, 4.5, 0.04, 0.2
GROUP, PROMPTS, CHANNELS, SIDE, WIDTH = 4, 2, 4, 4, 6


class ToyTransformer(nn.Module):
    """A velocity model with SD3's transformer call and a switchable adapter (`.module.disable_adapter()`, as
    Flow-GRPO reaches peft's through accelerate's wrapper): v = mix(x) (1 + t / 1000) + text(mean of the
    prompt embedding) + adapter(tanh x) (the adapter only while enabled)."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Conv2d(CHANNELS, CHANNELS, 1)
        self.text = nn.Linear(WIDTH, CHANNELS)
        self.adapter = nn.Conv2d(CHANNELS, CHANNELS, 1, bias=False)
        self.adapter_enabled = True

    @property
    def module(self) -> ToyTransformer:
        return self

    @contextmanager
    def disable_adapter(self):
        self.adapter_enabled = False
        try:
            yield
        finally:
            self.adapter_enabled = True

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections=None, return_dict=False):
        x = hidden_states
        out = self.mix(x) * (1 + timestep.view(-1, 1, 1, 1) / 1000)
        out = out + self.text(encoder_hidden_states.mean(1))[:, :, None, None]
        if self.adapter_enabled:
            out = out + self.adapter(torch.tanh(x))
        return (out,)


def _flow_grpo():
    """Flow-GRPO's functions: sde_step_with_logprob, PerPromptStatTracker, compute_log_prob, and the statements
    of one timestep's loss (compiled from train_sd3.py, so that tracebacks point at its lines)."""
    sys.path.insert(0, FLOW_GRPO)
    try:
        from flow_grpo.diffusers_patch.sd3_sde_with_logprob import sde_step_with_logprob
        from flow_grpo.stat_tracking import PerPromptStatTracker
    finally:
        sys.path.remove(FLOW_GRPO)
    path = Path(FLOW_GRPO) / "scripts" / "train_sd3.py"
    tree = ast.parse(path.read_text())
    compute = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "compute_log_prob")
    namespace = {"torch": torch, "sde_step_with_logprob": sde_step_with_logprob}
    exec(compile(ast.Module(body=[compute], type_ignores=[]), str(path), "exec"), namespace)
    block = None
    for node in ast.walk(tree):  # from `advantages = torch.clamp(...)` to the `if` that adds beta x KL
        body = getattr(node, "body", None)
        for i, statement in enumerate(body if isinstance(body, list) else []):
            if isinstance(statement, ast.Assign) and ast.unparse(statement).startswith("advantages = torch.clamp"):
                end = next(
                    i + n for n, s in enumerate(body[i:]) if isinstance(s, ast.If) and "kl_loss" in ast.unparse(s)
                )
                block = body[i : end + 1]
    assert block is not None, "train_sd3.py's GRPO loss statements were not found"
    loss = compile(ast.Module(body=block, type_ignores=[]), str(path), "exec")
    return sde_step_with_logprob, PerPromptStatTracker, namespace["compute_log_prob"], loss


def close(ours: torch.Tensor, theirs: torch.Tensor, what: str, scale: float = 1.0) -> None:
    """Equal to TOLERANCE of the values' scale (at least 1): fp32 rounds at 6e-8 of a value, and a trajectory
    carries each step's rounding into the next (each step alone differs by one or two roundings)."""
    diff = (ours.double() - theirs.double()).abs().max().item()
    scale = max(scale, theirs.double().abs().max().item())
    assert diff < TOLERANCE * scale, f"{what}: max |ours - Flow-GRPO's| = {diff:.3g} at a scale of {scale:.3g}"


@pytest.fixture(scope="module")
def setting():
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    scheduler.set_timesteps(STEPS)
    rows = GROUP * PROMPTS
    prompts = torch.randn(PROMPTS, 5, WIDTH).repeat_interleave(GROUP, dim=0)
    null = torch.randn(1, 5, WIDTH).expand(rows, -1, -1)
    sampler = ToyTransformer()
    noise = torch.randn(rows, CHANNELS, SIDE, SIDE)
    rewards = torch.rand(rows) + torch.arange(rows) % 3 * 0.1
    return SimpleNamespace(scheduler=scheduler, prompts=prompts, null=null, sampler=sampler, noise=noise,
                           rewards=rewards, rows=rows)  # fmt: skip


def our_velocity(model: ToyTransformer, s, null_gradient: bool = False):
    from unilip.tasks.unified.rollouts import velocity_of

    def forward(x, timestep, condition, mask):
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=condition)[0]

    condition = torch.cat([s.prompts, s.null])  # ours: the prompt rows, then the null rows
    return velocity_of(forward, condition, torch.ones(len(condition), 5), GUIDANCE, null_gradient)


def their_sampling(s, sde_step_with_logprob, generator):
    """Flow-GRPO's rollout (pipeline_with_logprob's loop: guided prediction, then `sde_step_with_logprob`)."""
    embeds = torch.cat([s.null, s.prompts])  # Flow-GRPO: the negative rows, then the prompt rows
    latents, all_latents, all_log_probs = s.noise, [s.noise], []
    with torch.no_grad():
        for t in s.scheduler.timesteps:
            prediction = s.sampler(hidden_states=torch.cat([latents] * 2), timestep=t.expand(2 * s.rows),
                                   encoder_hidden_states=embeds)[0]  # fmt: skip
            uncond, text = prediction.chunk(2)
            guided = uncond + GUIDANCE * (text - uncond)
            latents, log_prob, _, _ = sde_step_with_logprob(
                s.scheduler, guided.float(), t.unsqueeze(0), latents.float(), NOISE_LEVEL, generator=generator
            )
            all_latents.append(latents)
            all_log_probs.append(log_prob)
    return torch.stack(all_latents, dim=1), torch.stack(all_log_probs, dim=1)


def test_sde_steps_log_probs_and_advantages_equal_flow_grpos(setting):
    from unilip.pipelines.flow_sde import sample_sde, sde_times
    from unilip.tasks.unified.grpo import group_advantages

    sde_step_with_logprob, tracker, *_ = _flow_grpo()
    s = setting
    times = sde_times(STEPS, SHIFT)
    assert torch.equal(times, s.scheduler.sigmas)
    latents, log_probs = their_sampling(s, sde_step_with_logprob, torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = sample_sde(our_velocity(s.sampler, s), s.noise, times, NOISE_LEVEL, torch.Generator().manual_seed(5))
    close(ours.latents.transpose(0, 1), latents, "SDE trajectory")
    close(ours.log_probs.T, log_probs, "log-probabilities of the steps")
    # advantages: per prompt, (r - mean) / (population std + 1e-4), as its tracker with global_std=False
    names = [f"prompt {i // GROUP}" for i in range(s.rows)]
    theirs = torch.from_numpy(tracker(global_std=False).update(names, s.rewards.numpy()))
    close(group_advantages(s.rewards, GROUP), theirs, "advantages")


def test_one_policy_gradient_step_equals_flow_grpos(setting):
    from unilip.pipelines.flow_sde import Trajectory, sample_sde, sde_times
    from unilip.tasks.unified.grpo import flow_step_loss, group_advantages

    _, _, compute_log_prob, loss_block = _flow_grpo()
    s = setting
    times = sde_times(STEPS, SHIFT)
    with torch.no_grad():
        rollout = sample_sde(our_velocity(s.sampler, s), s.noise, times, NOISE_LEVEL, torch.Generator().manual_seed(5))
    advantages = group_advantages(s.rewards, GROUP)
    # the policy has moved since it sampled (e.g. the second update on a rollout), so ratios differ from 1
    # and some are clipped; its reference is the model with the adapter off
    policy = copy.deepcopy(s.sampler)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.1 * torch.randn_like(param))
    theirs, mine = copy.deepcopy(policy), copy.deepcopy(policy)
    config = SimpleNamespace(
        train=SimpleNamespace(cfg=True, beta=BETA, clip_range=CLIP, adv_clip_max=5),
        sample=SimpleNamespace(guidance_scale=GUIDANCE, noise_level=NOISE_LEVEL),
    )
    sample = {
        "latents": rollout.latents[:-1].transpose(0, 1),
        "next_latents": rollout.latents[1:].transpose(0, 1),
        "timesteps": s.scheduler.timesteps.expand(s.rows, -1),
        "log_probs": rollout.log_probs.T,
        "advantages": advantages.unsqueeze(1).repeat(1, STEPS),
    }
    pipeline = SimpleNamespace(scheduler=s.scheduler)
    embeds, pooled = torch.cat([s.null, s.prompts]), torch.zeros(2 * s.rows, 1)
    their_steps = []
    for j in range(STEPS):  # train_sd3.py's inner loop; accelerate divides each loss by the STEPS it accumulates
        _, log_prob, prev_sample_mean, std_dev_t = compute_log_prob(theirs, pipeline, sample, j, embeds, pooled, config)
        with torch.no_grad(), theirs.module.disable_adapter():
            _, _, prev_sample_mean_ref, _ = compute_log_prob(theirs, pipeline, sample, j, embeds, pooled, config)
        scope = {"torch": torch, "sample": sample, "j": j, "config": config, "log_prob": log_prob,
                 "prev_sample_mean": prev_sample_mean, "prev_sample_mean_ref": prev_sample_mean_ref,
                 "std_dev_t": std_dev_t}  # fmt: skip
        exec(loss_block, scope)
        (scope["loss"] / STEPS).backward()
        their_steps.append({k: scope[k].detach() for k in ("loss", "policy_loss", "kl_loss", "ratio")} | {
            "log_prob": log_prob.detach()})  # fmt: skip

    def reference_forward(x, timestep, condition, mask):
        with mine.disable_adapter():
            return mine(hidden_states=x, timestep=timestep, encoder_hidden_states=condition)[0]

    from unilip.tasks.unified.rollouts import velocity_of

    condition = torch.cat([s.prompts, s.null])
    reference = velocity_of(reference_forward, condition, torch.ones(len(condition), 5), GUIDANCE)
    replay = Trajectory(rollout.latents, rollout.log_probs, times, rollout.stds)
    clipped = []
    for k in range(STEPS):  # as UnifiedTraining.flow_losses does
        part = flow_step_loss(our_velocity(mine, s), reference, replay, k, advantages, rollout.log_probs[k], CLIP,
                              BETA, "flow_grpo")  # fmt: skip
        (part.loss / STEPS).backward()
        theirs_k = their_steps[k]
        scale = theirs_k["log_prob"].abs().max().item()  # ratios and losses are computed from log-probabilities
        close(part.loss.detach(), theirs_k["loss"], f"step {k} loss", scale)
        close(-part.policy, theirs_k["policy_loss"], f"step {k} clipped surrogate", scale)
        close(part.kl, theirs_k["kl_loss"], f"step {k} KL", scale)
        close(part.ratio, theirs_k["ratio"].mean(), f"step {k} mean ratio", scale)
        clipped.append(part.clip_fraction.item())
    assert 0 < sum(clipped) / STEPS < 1  # the clip acted on some rows, not all
    for (name, ours), theirs_param in zip(mine.named_parameters(), theirs.parameters(), strict=True):
        largest = theirs_param.grad.abs().max().item()
        assert largest > 1e-3, name
        diff = (ours.grad - theirs_param.grad).abs().max().item()
        assert diff < GRADIENT_TOLERANCE * largest, f"gradient of {name}: {diff:.3g} of {largest:.3g}"
    for model in (mine, theirs):
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    for (name, ours), theirs_param in zip(mine.named_parameters(), theirs.parameters(), strict=True):
        close(ours.detach(), theirs_param.detach(), f"{name} after one step")
