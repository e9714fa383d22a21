"""Evaluate a UniLIP tokenizer: reconstruction quality and semantic fidelity, protocol stated.

    python eval.py ckpt=runs/quickstart/tokenizer/stage2                      # bundled held-out photos
    python eval.py ckpt=1b_unilip.pth preset=unilip_1b data=imagenet_val protocol=256 \\
        teacher=OpenGVLab/InternVL3-1B-hf inception_weights=weights-inception-2015-12-05-6726825d.pth

Writes results.json (per image and aggregate, with the resolved config), summary.md and
reconstructions.png into the run directory. Configuration: conf/eval.yaml; see README.md.
"""

import hydra
from omegaconf import DictConfig

from unilip.entry import hydra_job, main_with_one_line_errors


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with hydra_job(cfg):  # a failed evaluation leaves no directory behind
        from unilip.evaluation.config import check_eval_config

        check_eval_config(cfg)  # before the heavy imports: a config mistake is reported at once
        from unilip.evaluation.run import evaluate

        evaluate(cfg)


if __name__ == "__main__":
    main_with_one_line_errors(main)
