"""The captioner (`unilip.models.captioner`): InternVL's language model reading an image through the UniLIP
encoder computes what transformers' `InternVLForConditionalGeneration` computes with that encoder in place of
its vision tower, greedy captions are the ones transformers' `generate` writes, sampled captions carry the
log-probabilities a fresh forward pass gives them, and a saved captioner comes back exactly."""

import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file
from transformers import InternVLConfig, InternVLForConditionalGeneration

from tests.conftest import compose_train
from tests.generation_helpers import one_thread  # noqa: F401  (autouse fixture)
from tests.helpers import run_tree
from unilip.models.captioner import CaptionFormat, build_captioner, load_captioner, save_captioner
from unilip.models.hub import StateDictMismatchError
from unilip.models.lora import LoRASpec, add_lora

SIDE = 224  # the tiny ViT's native size: 8 x 8 = 64 image tokens


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    """A tiny InternVL checkpoint in transformers' format whose vision tower and projector are a UniLIP
    tokenizer's, and the MLLM preset that reads its language model."""
    from unilip.models import UniLIPTokenizer
    from unilip.models.presets import tokenizer_preset

    torch.manual_seed(0)
    tokenizer = UniLIPTokenizer(tokenizer_preset("tiny")).eval()
    cfg = compose_train(["task=generate", "experiment=generate/quickstart", "stage=3", "run_dir=/tmp/unused"])
    preset = instantiate(cfg.mllm)
    config = InternVLConfig(
        vision_config=tokenizer.config.vision,
        text_config=preset.internvl["text_config"],
        image_token_id=preset.image_token_id,
        downsample_ratio=tokenizer.config.downsample_ratio,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    model = InternVLForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(tokenizer.vision_tower.state_dict())
    model.model.multi_modal_projector.load_state_dict(tokenizer.multi_modal_projector.state_dict())
    directory = tmp_path_factory.mktemp("internvl")
    model.save_pretrained(directory)
    preset = dataclasses.replace(preset, weights=str(directory), source_size=SIDE)
    return model, preset, tokenizer


def images(count=2):
    return torch.rand(count, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(5))


def banned_ids(captioner):
    text = captioner.text_tokenizer
    ids = [text.convert_tokens_to_ids(t) for t in ("<img>", "<IMG_CONTEXT>", "</img>")]
    return ids + list(range(len(text), captioner.language_model.config.vocab_size))


def test_log_probabilities_are_internvls_with_the_unilip_encoder(internvl):
    model, preset, tokenizer = internvl
    captioner = build_captioner(preset, tokenizer, max_new_tokens=6, temperature=0.7)
    pictures = images()
    features = captioner.image_features(pictures)
    captions = captioner.sample(features, torch.Generator().manual_seed(0))
    ours = captioner.token_log_probs(features, captions)
    assert torch.allclose(ours, captions.log_probs, atol=1e-5)  # what sampling recorded = a fresh forward pass
    # transformers' InternVL: its processor's normalisation, its own image-feature path and LLM
    pixels = (pictures - tokenizer.image_mean) / tokenizer.image_std
    ids = torch.cat([captioner.prompt_ids.expand(2, -1), captions.tokens], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits.float()
    logits[..., banned_ids(captioner)] = float("-inf")
    start = captioner.prompt_ids.numel() - 1
    theirs = torch.log_softmax(logits / 0.7, dim=-1)[:, start:-1].gather(2, captions.tokens.unsqueeze(2)).squeeze(2)
    theirs = torch.where(captions.mask, theirs, 0.0)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_greedy_captions_are_transformers_generate(internvl):
    model, preset, tokenizer = internvl
    captioner = build_captioner(preset, tokenizer, max_new_tokens=8)
    pictures = images()
    greedy = captioner.sample(captioner.image_features(pictures), greedy=True)
    pixels = (pictures - tokenizer.image_mean) / tokenizer.image_std
    prompt = captioner.prompt_ids.expand(2, -1)
    with torch.no_grad():
        out = model.generate(input_ids=prompt, pixel_values=pixels, max_new_tokens=8, do_sample=False,
                             suppress_tokens=banned_ids(captioner), eos_token_id=captioner.stop_id,
                             pad_token_id=captioner.pad_id)  # fmt: skip
    generated = out[:, prompt.shape[1] :]
    for row in range(2):
        mine = greedy.tokens[row][greedy.mask[row]].tolist()
        assert generated[row, : len(mine)].tolist() == mine, row
    # greedy: the same captions every time; sampling: depends on the generator's seed only
    assert torch.equal(captioner.sample(captioner.image_features(pictures), greedy=True).tokens, greedy.tokens)
    features = captioner.image_features(pictures)
    first, second = (captioner.sample(features, torch.Generator().manual_seed(s)) for s in (1, 1))
    assert torch.equal(first.tokens, second.tokens) and isinstance(captioner.decode(first)[0], str)


def test_a_saved_captioner_comes_back_with_its_adapters(internvl, tmp_path):
    _, preset, tokenizer = internvl
    fmt = CaptionFormat(prompt="What is in the picture?")
    captioner = build_captioner(preset, tokenizer, caption_format=fmt, max_new_tokens=5)
    spec = LoRASpec(rank=2, alpha=4, targets=("q_proj", "v_proj"), seed=3)
    adapters = add_lora(captioner.language_model, spec)
    with torch.no_grad():
        for param in adapters.values():
            param.add_(torch.randn_like(param) * 0.1)  # as if trained
    save_captioner(captioner, tmp_path / "captioner", spec, {"mllm": preset.to_dict()})
    loaded, loaded_spec, record = load_captioner(tmp_path / "captioner", tokenizer)
    assert loaded_spec == spec and record["caption_format"]["prompt"] == "What is in the picture?"
    assert torch.equal(loaded.prompt_ids, captioner.prompt_ids)
    features = captioner.image_features(images())
    assert torch.equal(loaded.sample(features, greedy=True).tokens, captioner.sample(features, greedy=True).tokens)
    assert not any(p.requires_grad for p in loaded.language_model.parameters())  # loaded frozen


def test_the_saved_adapters_are_a_peft_folder_for_internvl(internvl, tmp_path):
    """A fresh process loads the folder with peft's own `PeftModel.from_pretrained` onto transformers' InternVL (the
    base the folder names, here holding the tokenizer's encoder): its logits are the captioner's."""
    _, preset, tokenizer = internvl
    captioner = build_captioner(preset, tokenizer, max_new_tokens=4)
    spec = LoRASpec(rank=2, alpha=4, targets=("q_proj", "v_proj", "down_proj"), seed=3)
    adapters = add_lora(captioner.language_model, spec)
    with torch.no_grad():
        for param in adapters.values():
            param.add_(torch.randn_like(param) * 0.1)  # as if trained
    folder = save_captioner(captioner, tmp_path / "captioner", spec, {"mllm": preset.to_dict()})
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == preset.weights and (config["r"], config["lora_alpha"]) == (2, 4)

    pictures = images()
    features = captioner.image_features(pictures)
    captions = captioner.sample(features, torch.Generator().manual_seed(0))
    pixels = (pictures - tokenizer.image_mean) / tokenizer.image_std  # InternVL's processor's normalisation
    ids = torch.cat([captioner.prompt_ids.expand(2, -1), captions.tokens], dim=1)
    save_file({"input_ids": ids, "pixel_values": pixels.contiguous()}, str(tmp_path / "inputs.safetensors"))
    script = Path(__file__).with_name("load_with_peft.py")
    command = [sys.executable, str(script), preset.weights, str(folder), "inputs.safetensors", "out.safetensors"]
    done = run_tree(command, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = load_file(tmp_path / "out.safetensors")

    with torch.no_grad():
        ours = captioner.language_model(inputs_embeds=captioner._embeds(features, captions.tokens)).logits
    difference = (theirs["adapted"] - ours).abs().max().item()
    print(f"PeftModel on InternVL vs the captioner: max |logit difference| {difference:.2e}")
    assert difference < 1e-4
    assert int(theirs["adapted_modules"]) == len(adapters) // 2  # an A and a B per adapted module
    assert (theirs["base"] - ours).abs().max() > 100 * difference  # the adapters are in there


def test_a_captioner_saved_before_peft_folders_still_loads_and_a_wrong_spec_is_refused(internvl, tmp_path):
    _, preset, tokenizer = internvl
    captioner = build_captioner(preset, tokenizer, max_new_tokens=4)
    spec = LoRASpec(rank=2, alpha=4, targets=("q_proj", "v_proj"), seed=3)
    adapters = add_lora(captioner.language_model, spec)
    with torch.no_grad():
        for param in adapters.values():
            param.add_(torch.randn_like(param) * 0.1)
    folder = save_captioner(captioner, tmp_path / "old", spec, {"mllm": preset.to_dict()})
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # the older layout: the LLM's own names
        (folder / name).unlink()
    save_file({name: param.detach() for name, param in adapters.items()}, str(folder / "adapter.safetensors"))
    loaded, _, _ = load_captioner(folder, tokenizer)
    theirs = {n: p for n, p in loaded.language_model.named_parameters() if ".lora_" in n}
    assert theirs.keys() == adapters.keys() and all(torch.equal(theirs[n], adapters[n]) for n in adapters)

    folder = save_captioner(captioner, tmp_path / "new", spec, {"mllm": preset.to_dict()})
    record = json.loads((folder / "captioner.json").read_text())
    (folder / "captioner.json").write_text(json.dumps(record | {"lora": record["lora"] | {"rank": 4}}))
    with pytest.raises(StateDictMismatchError, match=r"^the adapters in .*new: .*size mismatch"):
        load_captioner(folder, tokenizer)


def counted(function, calls: list):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    return wrapper


@pytest.mark.numerics
def test_gradient_checkpointing_gives_the_same_adapter_gradients_and_keeps_sampling_cached(internvl):
    _, preset, tokenizer = internvl
    features = None
    grads = []
    for checkpointing in (False, True):
        captioner = build_captioner(preset, tokenizer, max_new_tokens=4)
        adapters = add_lora(captioner.language_model, LoRASpec(rank=2, alpha=4, targets=("q_proj", "v_proj")))
        with torch.no_grad():
            for param in adapters.values():
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())) * 0.1)
        if checkpointing:
            captioner.enable_gradient_checkpointing()
        features = captioner.image_features(images()) if features is None else features
        captions = captioner.sample(features, torch.Generator().manual_seed(0))
        assert not captioner.language_model.training  # sampling ran in eval mode, with its cache
        calls, mlp = [], captioner.language_model.model.layers[0].mlp
        mlp.forward = counted(mlp.forward, calls)
        captioner.token_log_probs(features, captions).sum().backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward
        grads.append({name: param.grad.clone() for name, param in adapters.items()})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])


def _sample_on_rank(rank: int, preset, store: str, out: str, synced: bool) -> None:
    """One of two gloo ranks: greedy captions of one image, rank 0's ending after its first token (its stop
    token set to that token); the LLM's forward passes counted."""
    from pathlib import Path

    from unilip.models import UniLIPTokenizer
    from unilip.models.presets import tokenizer_preset

    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        captioner = build_captioner(preset, UniLIPTokenizer(tokenizer_preset("tiny")).eval(), max_new_tokens=6)
        features = captioner.image_features(images(1))
        if rank == 0:
            captioner.stop_id = int(captioner.sample(features, greedy=True, max_new_tokens=1).tokens[0, 0])
        captioner.synced = synced
        calls = []
        captioner.language_model.register_forward_hook(lambda *_: calls.append(1))
        captions = captioner.sample(features, greedy=True)
        torch.save({"calls": len(calls), **captions._asdict()}, Path(out) / f"{synced}_{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_synced_sampling_runs_as_many_forward_passes_on_every_rank(internvl, tmp_path):
    """Under FSDP every LLM forward pass gathers the sharded weights on all ranks: a rank whose captions are done
    must keep stepping (without changing them) while another rank's are not, or the ranks hang."""
    import time

    import torch.multiprocessing as mp

    _, preset, _ = internvl
    results = {}
    for synced in (False, True):
        store = tmp_path / f"store_{synced}"
        context = mp.start_processes(
            _sample_on_rank, args=(preset, str(store), str(tmp_path), synced), nprocs=2, join=False,
            start_method="spawn",
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"synced={synced}: the ranks did not finish in 300 s")
        results[synced] = [torch.load(tmp_path / f"{synced}_{r}.pt", weights_only=True) for r in (0, 1)]
    alone, synced = results[False], results[True]
    assert [r["calls"] for r in alone] == [1, 6]  # rank 0 stops after its prompt pass, rank 1 runs 6 tokens
    assert [r["calls"] for r in synced] == [6, 6]
    assert alone[0]["finished"].tolist() == [True] and alone[0]["mask"].tolist() == [[True]]
    for rank in (0, 1):  # the extra passes change no caption
        assert all(torch.equal(alone[rank][k], synced[rank][k]) for k in ("tokens", "mask", "finished", "log_probs"))
