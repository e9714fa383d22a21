"""Tokenizer parity with the authors' code: their released format imported by ours, at 224, 448 and 256 px.

    python parity/parity_tokenizer.py --reference /path/to/UniLIP --internvl /path/to/InternVL \\
        --reference-python /path/to/venv-with-their-pins/bin/python --work /tmp/parity [--preset unilip_1b|tiny]

The reference's side builds the inputs of `parity_setup.py` (the `.pth` is their DC_AE_ViT_Stage2's
state dict, random weights) and loads it into their three evaluation classes, each built by its own
constructor: DC_AE_ViT_Stage2 (224 px), DC_AE_ViT_Stage2_448 (448 px) and DC_AE_ViT_Stage2_Pad (256 px:
reflect-pad to 280, reconstruct, crop back). On two photos it records the post-`mlp1` features, the
latent and the reconstruction. Our side loads the same `.pth` with `unilip.pretrained.internvl` (strict) and
computes the same. fp32, CPU; report in <work>/parity_tokenizer.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from parity_setup import build_inputs, parity_main, reference_tokenizer  # noqa: E402

RESOLUTIONS = {"224": "stage2", "448": "stage2_448", "256": "stage2_pad"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photos(size: int):
    """Two fixed photos (scikit-image's astronaut and coffee) resized to size x size, (2, 3, S, S) in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image
    from skimage import data

    images = [
        Image.fromarray(p).resize((size, size), Image.Resampling.BICUBIC) for p in (data.astronaut(), data.coffee())
    ]
    return torch.stack([torch.from_numpy(np.asarray(i).copy()).permute(2, 0, 1).float() / 255 for i in images])


def reference_side(args) -> None:
    import torch
    from safetensors.torch import save_file

    paths = build_inputs(args.work, args.preset, args.reference, args.internvl)
    state = torch.load(paths["unilip.pth"], map_location="cpu", weights_only=True)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    out = {}
    for size, kind in RESOLUTIONS.items():
        model = reference_tokenizer(kind, args.work, args.reference)
        model.load_state_dict(state, strict=True)
        model = model.float().eval()
        captured = {}
        hook = model.mlp1.register_forward_hook(lambda m, i, o, c=captured: c.setdefault("features", o.clone()))
        with torch.no_grad():
            normalized = (photos(int(size)) - mean) / std  # their loaders' ImageNet normalisation
            latent, _ = model.encode(normalized)
            reconstruction = (model.decode(latent) + 1) / 2  # [-1, 1] -> [0, 1]
        hook.remove()
        out |= {
            f"{size}/features": captured["features"],
            f"{size}/latent": latent,
            f"{size}/reconstruction": reconstruction,
        }
        del model
    save_file({k: v.float().contiguous() for k, v in out.items()}, str(args.work / "reference_tokenizer.safetensors"))


def ours_side(args) -> dict:
    import torch
    from safetensors.torch import load_file

    from unilip.pretrained import load_tokenizer

    ref = load_file(str(args.work / "reference_tokenizer.safetensors"))
    preset = "unilip_1b" if args.preset == "unilip_1b" else str(args.work / "tiny_preset.yaml")
    if args.preset == "tiny":
        from omegaconf import OmegaConf

        node = OmegaConf.load(HERE.parent / "conf" / "model" / "tiny.yaml")
        node.config.vision.image_size = 448
        OmegaConf.save(node, preset)
    tokenizer = load_tokenizer(args.work / "unilip.pth", preset=preset).eval()  # strict import of their format
    report = {}
    for size in RESOLUTIONS:
        images = photos(int(size))
        with torch.no_grad():
            output = tokenizer.reconstruct(images)
        ours = {"features": output.features, "latent": output.latent, "reconstruction": output.images}
        report[f"{size}px"] = {
            name: {
                "max_abs_diff": (value - ref[f"{size}/{name}"]).abs().max().item(),
                "max_abs": ref[f"{size}/{name}"].abs().max().item(),
            }
            for name, value in ours.items()
        }
        if size == "256":  # their Pad class resizes the decoder's 320 px to 280 with align_corners=True
            import torch.nn.functional as F

            with torch.no_grad():
                decoded = tokenizer.decoder(output.latent)
                decoded = F.interpolate(decoded, size=(280, 280), mode="bilinear", align_corners=True)
                theirs_resize = ((decoded + 1) / 2)[..., 12:268, 12:268]
            report["256px"]["reconstruction"]["with_their_align_corners_resize"] = (
                (theirs_resize - ref["256/reconstruction"]).abs().max().item()
            )
    return report


def main(argv: list[str] | None = None) -> dict | None:
    description = __doc__.split("\n\n")[0]
    return parity_main(argv, Path(__file__), description, reference_side, ours_side, "parity_tokenizer.json")


if __name__ == "__main__":
    main()
