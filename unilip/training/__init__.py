"""Training: LightningModules and what they need (stages, EMA, schedules)."""
