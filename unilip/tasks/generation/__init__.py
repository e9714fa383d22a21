"""The generation task (`task=generate`, the three UniLIP generation stages): a frozen InternVL conditions
a SANA DiT that learns UniLIP latents. `module.py` is the LightningModule, `setup.py` builds it from the
config, `target_cache.py` fingerprints cached targets and `cache_latents.py` writes them
(`python -m unilip.tasks.generation.cache_latents`)."""
