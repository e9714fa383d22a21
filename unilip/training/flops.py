"""Model FLOPs as the training modules count them: `torch.utils.flop_counter`, with its formula for a
convolution's weight gradient corrected for grouped convolutions.

torch counts the weight gradient of a convolution as a convolution of the input with the output gradient
over all channels, ignoring `groups`: a depthwise convolution of C channels is counted C times over.
SANA's DiT (GLUMBConv blocks) and the DC-AE decoder (EfficientViT blocks) train depthwise convolutions, so
at real size torch's count of a generation stage-2 step is about four times the true one. The weight
gradient performs exactly the multiply-adds of the forward convolution (each weight meets each output
position once per sample), which is what is counted here.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count


def conv_backward_flop(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    _groups,
    output_mask,
    out_shape,
    **kwargs,
) -> int:
    """FLOPs of `aten.convolution_backward`: the input gradient (torch's own term, which is right) and the
    weight gradient as many multiply-adds as the forward (`w_shape` holds the per-group input channels)."""
    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, list(out_shape[0]), not transposed)
    if output_mask[1]:
        flops += conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return flops


def flop_counter() -> FlopCounterMode:
    """A `FlopCounterMode` (no display) that counts grouped convolutions' weight gradients correctly."""
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop})
