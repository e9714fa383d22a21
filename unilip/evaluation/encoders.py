"""Encoders compared at toy size: the same two stages, the same steps, the same photos, one table.

    python -m unilip.evaluation.encoders [--out docs/encoders_table.md] [--runs-dir runs/encoders]
                                         [--presets tiny,tiny_siglip2,tiny_dinov2] [override ...]

For every preset (`conf/model/<preset>.yaml`, default: the tiny InternViT, SigLIP and DINOv2 tokenizers),
from `experiment=encoders_small`: stage 1, then stage 2 from it (self-distillation towards the stage-1
encoder, which is the original: stage 1 never trains it). Each run is evaluated on the held-out photos
(never seen in training) with `eval.py`: PSNR, SSIM, and the cosine / MSE of its features to the original
encoder's. Finished runs are reused and unfinished ones resume, so an interrupted comparison continues.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from unilip.evaluation.run import evaluate
from unilip.logs import cli_logging
from unilip.models.presets import compose_config
from unilip.training.run import train

log = logging.getLogger("unilip.encoders")

PRESETS = ("tiny", "tiny_siglip2", "tiny_dinov2")


def run_preset(preset: str, runs_dir: Path, data_dir: Path, extra: list[str]) -> list[dict]:
    """Stage 1 and stage 2 of one preset, each evaluated; one row per stage."""
    base = ["experiment=encoders_small", f"model={preset}", f"paths.data_dir={data_dir}", *extra]
    probe = compose_config("train", base)
    stage1 = runs_dir / preset / "stage1"
    rows = []
    for stage, run_dir in ((1, stage1), (2, runs_dir / preset / "stage2")):
        overrides = [f"stage={stage}", f"run_dir={run_dir}", "resume=auto"]
        overrides += [f"init_from={stage1}"] if stage == 2 else []
        started = time.perf_counter()
        if not (run_dir / "tokenizer").exists():  # finished runs are reused; unfinished ones resume
            train(compose_config("train", [*base, f"paths.runs_dir={runs_dir}", *overrides]))
        seconds = time.perf_counter() - started
        image_size = probe.stages[f"stage{stage}"].image_size
        evaluation = [f"ckpt={run_dir}", f"paths.data_dir={data_dir}", f"out_dir={run_dir / 'eval'}", "trainer=cpu"]
        evaluation += [f"protocol={image_size}", f"teacher={stage1}", "data.val_num_workers=0"]
        results = evaluate(compose_config("eval", evaluation))
        steps = probe.stages[f"stage{stage}"].max_steps
        rows.append({"preset": preset, "stage": stage, "steps": steps, "seconds": seconds, **results["aggregate"]})
        log.info("%s stage %d: %s", preset, stage, results["aggregate"])
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| encoder (preset) | stage | PSNR (dB) | SSIM | feature cosine to the original encoder | feature MSE "
        "| steps | training time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        seconds = f"{row['seconds']:.0f}" if row["seconds"] >= 1 else "(reused)"
        lines.append(
            f"| {row['preset']} | {row['stage']} | {row['psnr']['mean']:.2f} | {row['ssim']['mean']:.4f} | "
            f"{row['feature_cosine']['mean']:.4f} | {row['feature_mse']['mean']:.5f} | {row['steps']} | {seconds} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/encoders_table.md"), help="Markdown table to write")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/encoders"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated tokenizer presets (conf/model/)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every training run")
    args = parser.parse_args(argv)
    cli_logging()
    rows = []
    for preset in args.presets.split(","):
        rows += run_preset(preset, args.runs_dir.resolve(), args.data_dir.resolve(), args.overrides)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table(rows) + "\n")
    log.info("wrote %s:\n%s", args.out, table(rows))


if __name__ == "__main__":
    main()
