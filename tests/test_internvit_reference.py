"""The InternViT tokenizer computes what it computed before the encoder interface existed.

`tests/data/internvit_tiny_reference.safetensors` was written by `python -m tests.test_internvit_reference`
from the code as it stood before the encoders were put behind one interface (the `tiny` preset, seed 0, one
image each at 224, 448 and 256 px). It holds, for every output, its shape and 64 evenly spaced values (and,
as a record only, the SHA-256 of its bytes and the platform it was computed on).

The outputs are compared to float32 rounding, never byte for byte: the same torch version and the same
`get_cpu_capability()` string do not give the same bits on another CPU model (oneDNN and MKL choose their
kernels from the CPU itself, and each kernel sums in its own order). The tolerance comes from each output's
own rounding error, measured here: the same tokenizer is run in float64, and max |float32 - float64| over
the whole output is how far this machine's float32 result is from the exact one. The recorded result is
another float32 computation with errors of the same size, so two correct results differ by at most about
twice that; MARGIN allows twice as much again. Measured (docs/testing.md, "Golden values"): across this
machine's default kernels and `ONEDNN_MAX_CPU_ISA=AVX2`, `ATEN_CPU_CAPABILITY=avx2` and
`MKL_ENABLE_INSTRUCTIONS=AVX2`, the largest difference between two results was 1.5 times the rounding error
(224/reconstruction; the encoder's outputs stay under 0.8 times). A real change is far outside it: a weight
moved by one part in 10^4, or the ImageNet mean of one channel changed in the fourth digit, fails.

Do not regenerate the file to make this test pass: it is the record of the old behaviour.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.numerics

REFERENCE = Path(__file__).parent / "data" / "internvit_tiny_reference.safetensors"
SIZES = (224, 448, 256)
SAMPLES = 64
MARGIN = 4.0  # 2 (two results, each within its rounding error of the exact one) x 2 (kernels that round worse)
# Outputs that repeat another output's computation share its rounding error (no float64 run of their own).
SAME_COMPUTATION = {"encode": "latent", "decode": "reconstruction", "teacher": "features"}


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def _sample(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().flatten()
    index = torch.linspace(0, flat.numel() - 1, SAMPLES).round().long()
    return flat[index].clone()


def _platform() -> str:
    return f"torch {torch.__version__}, cpu {torch.backends.cpu.get_cpu_capability()}"


def _tokenizer(dtype: torch.dtype = torch.float32):
    from unilip.models import UniLIPTokenizer
    from unilip.models.presets import tokenizer_preset

    torch.manual_seed(0)
    return UniLIPTokenizer(tokenizer_preset("tiny")).eval().to(dtype)


def _images():
    generator = torch.Generator().manual_seed(1234)
    return {size: torch.rand(1, 3, size, size, generator=generator) for size in SIZES}


def current_outputs() -> dict[str, torch.Tensor]:
    """The tiny InternViT tokenizer's outputs at 224, 448 and 256 px (seed 0), computed by the code under test."""
    from unilip.models.tokenizer import FrozenEncoder

    tokenizer = _tokenizer()
    state = tokenizer.state_dict()
    outputs = {"weights": torch.cat([state[key].flatten().float() for key in sorted(state)])}
    teacher = FrozenEncoder(tokenizer)
    for size, images in _images().items():
        with torch.no_grad():
            out = tokenizer.reconstruct(images)
            outputs[f"{size}/features"] = out.features
            outputs[f"{size}/latent"] = out.latent
            outputs[f"{size}/reconstruction"] = out.images
            outputs[f"{size}/encode"] = tokenizer.encode(images)
            outputs[f"{size}/decode"] = tokenizer.decode(out.latent)
        outputs[f"{size}/teacher"] = teacher.features(images)
    return outputs


def rounding_errors(outputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """For each output, max |float32 - float64| over all its values: this machine's float32 rounding error."""
    exact = _tokenizer(torch.float64)
    errors = {}
    for size, images in _images().items():
        with torch.no_grad():
            out = exact.reconstruct(images.double())
        for name, value in (("features", out.features), ("latent", out.latent), ("reconstruction", out.images)):
            errors[f"{size}/{name}"] = (outputs[f"{size}/{name}"].double() - value).abs().max().item()
        for name, same in SAME_COMPUTATION.items():
            errors[f"{size}/{name}"] = errors[f"{size}/{same}"]
    # The initial weights are drawn, then scaled or shifted elementwise: a few ulps of the largest value at most.
    errors["weights"] = torch.finfo(torch.float32).eps * outputs["weights"].abs().max().item()
    return errors


def write_reference(path: Path = REFERENCE) -> None:
    outputs = current_outputs()
    tensors = {name: _sample(value) for name, value in outputs.items()}
    metadata = {"platform": _platform()}
    for name, value in outputs.items():
        metadata[f"{name}:sha256"] = _digest(value)
        metadata[f"{name}:shape"] = ",".join(map(str, value.shape))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def _read_reference() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(REFERENCE), framework="pt") as file:
        metadata = file.metadata()
    return load_file(REFERENCE), metadata


@pytest.fixture(scope="module")
def outputs():
    return current_outputs()


@pytest.fixture(scope="module")
def rounding(outputs):
    return rounding_errors(outputs)


@pytest.fixture(scope="module")
def reference():
    return _read_reference()


def test_the_reference_covers_every_output(outputs, reference):
    samples, metadata = reference
    assert set(samples) == set(outputs)
    for name, value in outputs.items():
        assert metadata[f"{name}:shape"] == ",".join(map(str, value.shape)), name


@pytest.mark.parametrize("name", ["weights"] + [f"{s}/{o}" for s in SIZES for o in ("features", "latent")])
def test_initial_weights_features_and_latent_are_unchanged(outputs, rounding, reference, name):
    _compare(outputs, rounding, reference, name)


@pytest.mark.parametrize("name", [f"{s}/{o}" for s in SIZES for o in ("reconstruction", "encode", "decode", "teacher")])
def test_reconstruction_and_every_entry_point_are_unchanged(outputs, rounding, reference, name):
    _compare(outputs, rounding, reference, name)


def _compare(outputs, rounding, reference, name):
    samples, _ = reference
    worst = (_sample(outputs[name]) - samples[name]).abs().max().item()
    bound = MARGIN * rounding[name]
    assert worst <= bound, (
        f"{name}: a sampled value moved by {worst:.2e}, more than {MARGIN:g} x this output's own float32 "
        f"rounding error ({rounding[name]:.2e}, measured against float64)"
    )


if __name__ == "__main__":
    write_reference()
    print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size} bytes) on {_platform()}")
