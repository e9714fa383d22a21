"""Evaluation: reconstruction quality and semantic fidelity, with the protocol stated (`run.py` is eval.py's
body), the measures training validates with too (`metrics.py`; `similarity.py`, the unified task's reward),
and the tokenizer experiments run through `train()` (ablation, encoder comparison, latent statistics).

May import `unilip.training`, `unilip.losses`, `unilip.pretrained`, `unilip.models`, `unilip.data` and the
foundation; not the tasks (which import its measures) nor `unilip.pipelines`.
"""
