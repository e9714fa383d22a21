"""The unified task (`task=unified`): UAE's Unified-GRPO on UniLIP, the captioner and the generator as one
auto-encoder trained on the similarity of an image to its regeneration. `module.py` is the LightningModule,
`setup.py` builds it from the config, `rollouts.py` samples and rewards, `grpo.py` is the objective,
`sharding.py` its FSDP2 plan, `demo.py` the toy demonstration that both steps raise the reward
(`python -m unilip.tasks.unified.demo`)."""
