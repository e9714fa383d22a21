"""Evaluate a UniLIP tokenizer: reconstruction quality and semantic fidelity, protocol stated.

    python eval.py ckpt=runs/quickstart/tokenizer/stage2                      # bundled held-out photos
    python eval.py ckpt=1b_unilip.pth preset=unilip_1b data=imagenet_val protocol=256 \\
        teacher=OpenGVLab/InternVL3-1B-hf inception_weights=weights-inception-2015-12-05-6726825d.pth

Writes results.json (per image and aggregate, with the resolved config), summary.md and
reconstructions.png into the run directory. Configuration: conf/eval.yaml; see README.md.
"""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from unilip.evaluation.run import evaluate
    from unilip.training.config import ConfigError

    try:
        evaluate(cfg)
    except ConfigError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
