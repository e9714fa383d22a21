"""The InternViT tokenizer computes what it computed before the encoder interface existed.

`tests/data/internvit_tiny_reference.safetensors` was written by `python -m tests.test_internvit_reference`
from the code as it stood before the encoders were put behind one interface (the `tiny` preset,
seed 0, one image each at 224, 448 and 256 px, two intra-op threads). It holds, for every output,
its shape, the SHA-256 of its bytes and 64 evenly spaced values. On the platform it was recorded on
(same torch version and CPU capability, and the same thread count, which the test sets: the
decoder's convolutions round differently with one thread) the outputs must be identical byte for
byte; elsewhere the kernels may round differently, so only the sampled values are compared, to
float32 noise.

Do not regenerate the file to make this test pass: it is the record of the old behaviour.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

REFERENCE = Path(__file__).parent / "data" / "internvit_tiny_reference.safetensors"
SIZES = (224, 448, 256)
SAMPLES = 64
THREADS = 2  # intra-op threads at recording; another test may leave the process at another count


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def _sample(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().flatten()
    index = torch.linspace(0, flat.numel() - 1, SAMPLES).round().long()
    return flat[index].clone()


def _platform() -> str:
    return f"torch {torch.__version__}, cpu {torch.backends.cpu.get_cpu_capability()}"


def current_outputs() -> dict[str, torch.Tensor]:
    """The tiny InternViT tokenizer's outputs at 224, 448 and 256 px (seed 0), computed by the code under test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return _outputs()
    finally:
        torch.set_num_threads(threads)


def _outputs() -> dict[str, torch.Tensor]:
    from unilip.models import UniLIPTokenizer
    from unilip.models.presets import tokenizer_preset
    from unilip.models.tokenizer import FrozenEncoder

    torch.manual_seed(0)
    tokenizer = UniLIPTokenizer(tokenizer_preset("tiny")).eval()
    state = tokenizer.state_dict()
    weights = torch.cat([state[key].flatten().float() for key in sorted(state)])
    outputs = {"weights": weights}
    teacher = FrozenEncoder(tokenizer)
    generator = torch.Generator().manual_seed(1234)
    for size in SIZES:
        images = torch.rand(1, 3, size, size, generator=generator)
        with torch.no_grad():
            out = tokenizer.reconstruct(images)
            outputs[f"{size}/features"] = out.features
            outputs[f"{size}/latent"] = out.latent
            outputs[f"{size}/reconstruction"] = out.images
            outputs[f"{size}/encode"] = tokenizer.encode(images)
            outputs[f"{size}/decode"] = tokenizer.decode(out.latent)
        outputs[f"{size}/teacher"] = teacher.features(images)
    return outputs


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
def reference():
    return _read_reference()


def test_the_reference_covers_every_output(outputs, reference):
    samples, metadata = reference
    assert set(samples) == set(outputs)
    for name, value in outputs.items():
        assert metadata[f"{name}:shape"] == ",".join(map(str, value.shape)), name


@pytest.mark.parametrize("name", ["weights"] + [f"{s}/{o}" for s in SIZES for o in ("features", "latent")])
def test_initial_weights_features_and_latent_are_unchanged(outputs, reference, name):
    _compare(outputs, reference, name)


@pytest.mark.parametrize("name", [f"{s}/{o}" for s in SIZES for o in ("reconstruction", "encode", "decode", "teacher")])
def test_reconstruction_and_every_entry_point_are_unchanged(outputs, reference, name):
    _compare(outputs, reference, name)


def _compare(outputs, reference, name):
    samples, metadata = reference
    value = outputs[name]
    if metadata["platform"] == _platform():
        assert torch.equal(_sample(value), samples[name]), f"{name}: sampled values differ"
        assert _digest(value) == metadata[f"{name}:sha256"], f"{name}: not bit-identical to the recorded output"
    else:  # other kernels, other rounding: the same computation to float32 noise
        torch.testing.assert_close(_sample(value), samples[name], rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    write_reference()
    print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size} bytes) on {_platform()}")
