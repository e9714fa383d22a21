"""The tokenizer task (`task=tokenizer`, stages 1 and 2 of the paper): decoder alignment, then
self-distillation. `module.py` is the LightningModule, `setup.py` builds it from the config, `stages.py`
says what each stage trains, `sharding.py` is its FSDP2 plan."""
