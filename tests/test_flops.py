"""The FLOP counter of the training modules against convolution FLOPs counted by hand."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from unilip.training.flops import flop_counter


@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("transposed", [False, True])
def test_a_convolution_step_counts_forward_input_gradient_and_weight_gradient(groups, transposed):
    """Forward, input gradient and weight gradient each take the same multiply-adds: N x C_out x C_in / groups x
    k x k per output position (a transposed convolution: per input position). torch's own formula counts the
    weight gradient of a grouped convolution `groups` times over (SANA's and DC-AE's depthwise convolutions)."""
    n, c_in, c_out, k, side = 2, 6, 12, 3, 8
    cls = torch.nn.ConvTranspose2d if transposed else torch.nn.Conv2d
    conv = cls(c_in, c_out, k, padding=1, groups=groups, bias=False)
    x = torch.randn(n, c_in, side, side, requires_grad=True)
    forward = 2 * n * c_out * (c_in // groups) * k * k * side * side  # padding 1, stride 1: side x side positions
    with flop_counter() as counter:
        conv(x).sum().backward()
    assert counter.get_total_flops() == 3 * forward
    with flop_counter() as counter:  # frozen weights: no weight gradient
        conv.requires_grad_(False)
        conv(x).sum().backward()
    assert counter.get_total_flops() == 2 * forward
    conv.requires_grad_(True)
    with FlopCounterMode(display=False) as torch_counter:
        conv(x).sum().backward()
    assert (torch_counter.get_total_flops() == 3 * forward) == (groups == 1)
