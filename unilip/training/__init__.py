"""The training machinery every task shares: `run.py` (train.py's body: it builds the task's module through the
builder its conf/task names), checkpoints and lineage (how runs chain), DDP / FSDP2 strategies and shared
sharding plans, EMA, RNG state, non-finite steps, SLURM requeue, epochs, validation means, loggers, FLOPs,
frozen networks, schedules and parameter groups, config checks.

May import `unilip.losses`, `unilip.pretrained`, `unilip.models`, `unilip.data` and the foundation; never a task
(`unilip.tasks`), nor `unilip.evaluation` or `unilip.pipelines`, which sit above it.
"""
