"""Pretrained weights in and out: the formats weights come from and go back to.

InternVL's transformers (-hf) and original remote-code checkpoints, the authors' released UniLIP `.pth`
files, the SigLIP / SigLIP 2 / DINOv2 checkpoints (each encoder's home), and the DC-AE decoder's
diffusers checkpoint. May import `unilip.models` (the networks these weights fill) and the foundation
(`unilip.errors`, `unilip.logs`); the networks never import this package.
"""
