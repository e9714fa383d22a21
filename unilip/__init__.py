"""unilip: train, evaluate and extend UniLIP. The rooms, from the top (docs/architecture.md; the layering is
checked by `lint-imports`, contracts in pyproject.toml):

    benchmarks/, export.py    entry points: the field's benchmarks, the export CLI
    tasks/                    tokenizer/, generation/, unified/: each task's LightningModule, builder, own parts
    evaluation/, pipelines/   measuring a tokenizer; sampling from a generator
    training/                 the machinery every task shares (run.py is train.py's body)
    losses/, pretrained/      the tokenizer objective; weights in and out of other formats
    models/, data/            the networks; shards in, batches out
    entry.py, logs.py, errors.py    the foundation
"""
