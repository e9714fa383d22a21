"""Train UniLIP.

    python train.py stage=1 experiment=quickstart          # tiny model, bundled photos, CPU
    python train.py stage=2 experiment=quickstart          # starts from the stage-1 run of the same name
    python train.py stage=1 experiment=unilip_1b_224 trainer=ddp trainer.devices=8

Configuration: conf/train.yaml and its groups; see README.md.
"""

import hydra
from omegaconf import DictConfig

from unilip.entry import hydra_job, main_with_one_line_errors


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with hydra_job(cfg, precious=("checkpoints",)):  # a refused run changes nothing on disk
        from unilip.training.config import check_train_config

        check_train_config(cfg)  # before the heavy imports: a config mistake is reported at once
        from unilip.training.run import train

        train(cfg)


if __name__ == "__main__":
    main_with_one_line_errors(main)
