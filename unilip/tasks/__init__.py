"""The tasks, one room each with the same shape: `tokenizer/`, `generation/`, `unified/`.

Each holds its LightningModule (`module.py`), its builder from the config (`setup.py`, named by
`conf/task/<task>.yaml`'s `builder`) and what only it uses. May import the shared training machinery
(`unilip.training`), `unilip.pipelines`, `unilip.evaluation`, `unilip.data`, `unilip.losses`,
`unilip.pretrained` and `unilip.models`; a task never imports another task: what two share lives below.
"""
