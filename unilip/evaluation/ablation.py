"""The paper's tokenizer ablation at toy size: stage 1 vs stage 2, with and without self-distillation.

    python -m unilip.evaluation.ablation [--out docs/ablation.md] [--runs-dir runs/ablation]

Arms (all from `experiment=ablation_small`, the same seed and data):
  stage 1              stage 1 only
  stage 1, longer      stage 1 for as many steps as stage 1 + stage 2 (separates "more steps" from "stage 2")
  stage 2, distill     stage 2 from the stage-1 run, distillation weight 1 (the recipe)
  stage 2, no distill  stage 2 from the stage-1 run, distillation weight 0
  stage 2, distill, GAN from half-way   the recipe's GAN (hinge, 0.1, LeCam) for the second half
Each is evaluated on the held-out photos (never seen in training) and the table written as Markdown.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from unilip.evaluation.run import evaluate
from unilip.logs import cli_logging
from unilip.models.presets import compose_config
from unilip.training.run import train

log = logging.getLogger("unilip.ablation")


def run_arms(runs_dir: Path, data_dir: Path, extra: list[str]) -> list[dict]:
    base = ["experiment=ablation_small", f"paths.data_dir={data_dir}", f"paths.runs_dir={runs_dir}", *extra]
    stage1 = runs_dir / "stage1"
    probe = compose_config("train", base)
    longer = probe.stages.stage1.max_steps + probe.stages.stage2.max_steps
    stage1_steps = probe.stages.stage1.max_steps
    steps2 = f"{stage1_steps} + {probe.stages.stage2.max_steps}"
    arms = [
        ("stage 1", stage1, str(stage1_steps), ["stage=1"]),
        ("stage 1, longer", runs_dir / "stage1_longer", str(longer), ["stage=1", f"stages.stage1.max_steps={longer}"]),
        ("stage 2, distill", runs_dir / "stage2_distill", steps2, ["stage=2", f"init_from={stage1}"]),
        (
            "stage 2, no distill",
            runs_dir / "stage2_no_distill",
            steps2,
            ["stage=2", f"init_from={stage1}", "stages.stage2.distill_weight=0.0"],
        ),
        (
            "stage 2, distill, GAN from half-way",
            runs_dir / "stage2_distill_gan",
            steps2,
            ["stage=2", f"init_from={stage1}", f"stages.stage2.gan_start_step={probe.stages.stage2.max_steps // 2}"],
        ),
    ]
    rows = []
    for label, run_dir, steps, overrides in arms:
        if not (run_dir / "tokenizer").exists():  # finished arms are reused; unfinished ones resume
            train(compose_config("train", [*base, *overrides, f"run_dir={run_dir}", "resume=auto"]))
        image_size = probe.stages.stage1.image_size
        results = evaluate(
            compose_config(
                "eval",
                [
                    f"ckpt={run_dir}",
                    f"paths.data_dir={data_dir}",
                    f"out_dir={run_dir / 'eval'}",
                    "trainer=cpu",
                    f"protocol={image_size}",
                    f"teacher={stage1}",
                    "data.val_num_workers=0",
                ],
            )
        )
        rows.append({"arm": label, "run": str(run_dir), "steps": steps, **results["aggregate"]})
        log.info("%s: %s", label, results["aggregate"])
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| arm | PSNR (dB) | SSIM | feature cosine to the original encoder | feature MSE | training steps |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['arm']} | {row['psnr']['mean']:.2f} | {row['ssim']['mean']:.4f} | "
            f"{row['feature_cosine']['mean']:.4f} | {row['feature_mse']['mean']:.5f} | {row['steps']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/ablation_table.md"), help="Markdown table to write")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every training run")
    args = parser.parse_args(argv)
    cli_logging()
    rows = run_arms(args.runs_dir.resolve(), args.data_dir.resolve(), args.overrides)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table(rows) + "\n")
    log.info("wrote %s:\n%s", args.out, table(rows))


if __name__ == "__main__":
    main()
