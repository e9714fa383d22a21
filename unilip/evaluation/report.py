"""What eval.py writes: the protocol it followed, aggregates, per-image numbers, a grid, a summary table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from unilip.evaluation.metrics import PSNR_CAP_DB

METRIC_NAMES = {
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "lpips": "LPIPS",
    "feature_cosine": "feature cosine vs original encoder",
    "feature_mse": "feature MSE vs original encoder",
    "external_cosine": "external-encoder cosine (original vs reconstruction)",
}

# how rFID's images became uint8 (`unilip.evaluation.quantize`), in the protocol and beside the value
QUANTIZED = {
    "trunc": "reconstructions to uint8 by truncation, floor(255 x), as the UniLIP evaluator",
    "round": "reconstructions to uint8 by rounding, as saved PNGs",
    "reference": "uint8 images as the UniLIP evaluation script makes them: reconstructions rounded, then truncated "
    "after a float round trip; inputs de-normalised and truncated",
}
RFID_LABEL = {
    "trunc": "rFID (uint8 by truncation)",
    "round": "rFID (uint8 by rounding)",
    "reference": "rFID (uint8 as the UniLIP script)",
}


def describe_protocol(
    image_size: int,
    multiple: int,
    padded: bool,
    lpips: bool = True,
    rfid: bool = True,
    feature_fidelity: bool = True,
    external: bool = False,
    resize: str = "project",
    quantize: str = "trunc",
) -> str:
    """One paragraph stating exactly what was measured (metrics that were not are not named)."""
    padded_size = image_size + (-image_size % multiple)
    resized = " (decoder output resized with align_corners=True, as the UniLIP code)" if resize == "reference" else ""
    geometry = (
        f"reflect-pad to {padded_size}x{padded_size} (multiple of {multiple}), reconstruct{resized}, crop back to "
        f"{image_size}x{image_size}"
        if padded_size != image_size
        else f"reconstruct at {image_size}x{image_size} natively"
    )
    metrics = [
        f"PSNR per image (data range 1, identical images capped at {PSNR_CAP_DB:.0f} dB)",
        "SSIM per image (11x11 Gaussian window, sigma 1.5, averaged over the valid region as in Wang et al.)",
    ]
    if lpips:
        metrics.append("LPIPS (VGG) per image")
    if rfid:
        metrics.append(
            "rFID (Inception-V3 pool features at 299 px over the whole set, against the center-cropped inputs; "
            f"{QUANTIZED[quantize]})"
        )
    if external:
        metrics.append("cosine between original and reconstruction under the external vision model, per image")
    fidelity = (
        "; feature fidelity: cosine and MSE between the evaluated encoder's post-projector features and the "
        "original encoder's, per image (mean over tokens)"
        if feature_fidelity
        else ""
    )
    return (
        f"{image_size} px: resize the shorter edge to {image_size} px, center-crop {image_size}x{image_size}, "
        f"{geometry}. Metrics on RGB images in [0, 1]: {', '.join(metrics)}{fidelity}. "
        "Aggregates are means over images (min and max alongside)."
    )


def aggregate(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    names = [name for name in METRIC_NAMES if records and name in records[0]]
    out = {}
    for name in names:
        values = [record[name] for record in records]
        out[name] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    return out


def write_report(
    out_dir: Path,
    records: list[dict[str, Any]],
    fid: float | None,
    protocol: str,
    notes: list[str],
    config: dict[str, Any],
    grid: list[torch.Tensor],
    skipped: dict[str, int] | None = None,
    rfid_quantize: str | None = None,
) -> dict[str, Any]:
    """Write results.json, summary.md and reconstructions.png into `out_dir`; return the results.

    `skipped`: {"samples", "shards"} that could not be read; any makes the results `complete: false`.
    `rfid_quantize`: how rFID's images became uint8 (`unilip.evaluation.quantize`), recorded beside it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    skipped = skipped or {"samples": 0, "shards": 0}
    results = {
        "protocol": protocol,
        "images": len(records),
        "complete": not any(skipped.values()),
        "skipped": skipped,
        "aggregate": aggregate(records),
        "rfid": fid,
        "rfid_quantize": rfid_quantize,
        "notes": notes,
        "config": config,
        "per_image": records,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False))
    (out_dir / "summary.md").write_text(summary_markdown(results))
    if grid:
        from torchvision.utils import save_image

        pairs = torch.stack(grid)  # (n, 2, 3, H, W): original, reconstruction
        save_image(torch.cat([pairs[:, 0], pairs[:, 1]]), out_dir / "reconstructions.png", nrow=len(grid))
    return results


def incomplete_warning(skipped: dict[str, int], images: int) -> str:
    return (
        f"INCOMPLETE: {skipped['samples']} samples and {skipped['shards']} shards of the evaluation set could not "
        f"be read; the numbers below cover the {images} images that were (the log names the skipped data)"
    )


def summary_markdown(results: dict[str, Any]) -> str:
    lines = []
    if not results.get("complete", True):
        lines += [f"**{incomplete_warning(results['skipped'], results['images'])}**", ""]
    lines += [
        f"Protocol: {results['protocol']}",
        "",
        f"Images: {results['images']}",
        "",
        "| metric | mean | min | max |",
        "|---|---|---|---|",
    ]
    for name, stats in results["aggregate"].items():
        lines.append(f"| {METRIC_NAMES[name]} | {stats['mean']:.4f} | {stats['min']:.4f} | {stats['max']:.4f} |")
    rfid = results["rfid"]
    label = RFID_LABEL.get(results.get("rfid_quantize"), "rFID")
    lines.append(
        f"| {label} | {rfid:.3f} | | |" if rfid is not None and math.isfinite(rfid) else "| rFID | not measured | | |"
    )
    if results["notes"]:
        lines += ["", *[f"- {note}" for note in results["notes"]]]
    return "\n".join(lines) + "\n"
