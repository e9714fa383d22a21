"""Generation parity with the authors' code: their model, saved in their format, imported by ours.

    python parity/parity_generation.py --reference /path/to/UniLIP --internvl /path/to/InternVL \\
        --reference-python /path/to/venv-with-their-pins/bin/python --work /tmp/parity [--preset unilip_1b|tiny]

The reference's side (`--side reference`, their Python) builds the inputs of `parity_setup.py`, then the
model exactly as their training scripts do (`UniLIP_InternVLForCausalLM.from_pretrained(<InternVL-hf>)` +
`initialize_vision_modules(...)`, random weights), saves it with `save_pretrained` (their release format)
and runs their `generate_image` on a text-to-image and an edit prompt, recording from inside their code:
the token ids, the condition (`sample_images`' input), the first DiT velocity and the first sampling step
on their fixed noise. Our side imports the saved checkpoint with `unilip.pretrained.released` (strict), builds
the conditioner from the same InternVL and tokenizer files, and computes the same tensors. Everything in
fp32 on CPU. The report (max abs differences) goes to <work>/parity_generation.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from parity_setup import build_inputs, parity_main  # noqa: E402

# The reference's prompts (scripts/inference_{gen,edit}.py): positive and CFG prompt, null first after their swap.
PROMPT = "a red motorcycle parked in a garage full of boxes"
INSTRUCTION = "make the motorcycle blue"
TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<img>"
CASES = {
    "t2i": (f"Generate an image: {PROMPT}", "Generate an image."),
    "edit": (f"Edit the image: {INSTRUCTION}\n<image>", "Edit the image.\n<image>"),
}


class _Stop(Exception):
    pass


def source_image():
    """A fixed 448 x 448 photo in [0, 1] (scikit-image's astronaut), (1, 3, 448, 448)."""
    import numpy as np
    import torch
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.astronaut()).resize((448, 448), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255


def reference_side(args) -> None:
    import torch
    from safetensors.torch import save_file

    paths = build_inputs(args.work, args.preset, args.reference, args.internvl)
    sys.path.insert(0, str(args.reference))
    from types import SimpleNamespace

    from transformers import AutoTokenizer
    from unilip.model import UniLIP_InternVLForCausalLM  # the authors' package (their checkout)

    released = args.work / "released"
    torch.manual_seed(0)
    model = UniLIP_InternVLForCausalLM.from_pretrained(str(paths["internvl_hf"]), torch_dtype=torch.float32)
    model_args = SimpleNamespace(  # scripts/run_unilip_1b_stage2.sh, with paths to the random inputs
        unilip_path=str(paths["unilip.pth"]),
        unilip_factor=10.6,
        fix_dit=False,
        fix_connect=False,
        mllm_path=str(paths["internvl"]),
        mllm_hf_path=str(paths["internvl_hf"]),
        vae_path=str(paths["dcae"]),
        dit_path=str(paths["sana"]),
        n_query=256,
        connect_layer=6,
    )
    model.get_model().initialize_vision_modules(model_args=model_args)
    model = model.float().eval()
    with torch.no_grad():  # trained-looking queries and projection (their init is N(0, 1) and default Linear)
        model.get_model().latent_queries.mul_(0.5)
    if not (released / "config.json").exists():
        model.save_pretrained(str(released))
    tokenizer = AutoTokenizer.from_pretrained(str(paths["internvl_hf"]))

    out = {}
    for case, (positive, negative) in CASES.items():
        texts = [TEMPLATE.format(positive), TEMPLATE.format(negative)]
        pixel_values = None
        if case == "edit":
            context = "<img>" + "<IMG_CONTEXT>" * 256 + "</img>"  # scripts/inference_edit.py's placeholder
            texts = [t.replace("<image>", context) for t in texts]
            mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
            pixel_values = (source_image() - mean) / std  # InternVL's image processor at 448 px
        ids = tokenizer(texts, padding="longest", return_tensors="pt")
        out[f"{case}/input_ids"], out[f"{case}/text_mask"] = ids.input_ids, ids.attention_mask
        record = {}
        dit = model.get_model().dit
        original_dit_forward, original_sample = dit.forward, model.sample_images

        def dit_forward(*a, _record=record, _forward=original_dit_forward, **kw):
            result = _forward(*a, **kw)
            if "velocity_in" not in _record:
                _record["velocity_in"] = a[0].clone()
                _record["timestep"] = kw["timestep"].clone()
                _record["velocity"] = result[0].clone()
            return result

        def sample_images(
            hidden, scheduler, encoder_attention_mask=None, _record=record, _sample=original_sample, **kw
        ):
            _record["condition"], _record["mask"] = hidden.clone(), encoder_attention_mask.clone()
            original_step = scheduler.step

            def step(model_output, timestep, sample, **skw):
                _record["noise"], _record["guided"] = sample.clone(), model_output.clone()
                _record["step"] = original_step(model_output, timestep, sample, **skw).prev_sample.clone()
                _record["step_timestep"] = torch.as_tensor(float(timestep))
                raise _Stop

            scheduler.step = step
            return _sample(hidden, scheduler, encoder_attention_mask=encoder_attention_mask, **kw)

        dit.forward, model.sample_images = dit_forward, sample_images
        generator = torch.Generator().manual_seed(7)
        try:
            with torch.no_grad():
                model.generate_image(
                    texts, tokenizer, pixel_values=pixel_values, generator=generator, guidance_scale=4.5
                )
        except _Stop:
            pass
        dit.forward, model.sample_images = original_dit_forward, original_sample
        out |= {f"{case}/{k}": v.float().contiguous() for k, v in record.items()}
    save_file({k: v.contiguous() for k, v in out.items()}, str(args.work / "reference_generation.safetensors"))


def ours_side(args) -> dict:
    import torch
    from hydra.utils import instantiate
    from safetensors.torch import load_file

    from unilip.models.latents import UniLIPLatents
    from unilip.models.mllm import build_conditioner
    from unilip.models.presets import compose_config
    from unilip.pipelines.generation import UniLIPPipeline, make_scheduler
    from unilip.pretrained.released import load_released_generator
    from unilip.training.lineage import load_any_tokenizer

    ref = load_file(str(args.work / "reference_generation.safetensors"))
    experiment = "generate/unilip_1b" if args.preset == "unilip_1b" else "generate/quickstart"
    overrides = [f"experiment={experiment}", "stage=2", "run_dir=unused"]
    if args.preset == "tiny":
        overrides += ["mllm.internvl.text_config.vocab_size=151674", "mllm.internvl.image_token_id=151667"]
        overrides += ["mllm.source_size=448", "model.config.vision.image_size=448"]
    cfg = compose_config("train", overrides)
    mllm, dit = instantiate(cfg.mllm), instantiate(cfg.dit)
    mllm.weights = mllm.text_tokenizer = str(args.work / "internvl_hf")
    dit.weights, dit.flow_shift = str(args.work / "sana"), None
    tokenizer = load_any_tokenizer(args.work / "unilip.pth", instantiate(cfg.model.config)).tokenizer.eval()
    generator, config = load_released_generator(args.work / "released", mllm, dit)  # strict
    generator = generator.eval()
    conditioner = build_conditioner(mllm, tokenizer)
    flow_shift = dit.sampler_flow_shift()
    pipe = UniLIPPipeline(generator, conditioner, UniLIPLatents(tokenizer, config["unilip_factor"]), "dpm", flow_shift)
    report = {"unilip_factor": config.get("unilip_factor"), "flow_shift": flow_shift}
    for case in CASES:
        edit = case == "edit"
        prompt = INSTRUCTION if edit else PROMPT
        batch = conditioner.prepare([prompt, prompt], [edit, edit], [False, True], generator.config.num_queries)
        features = conditioner.image_features(torch.cat([source_image()] * 2)) if edit else None
        with torch.no_grad():
            condition = generator.condition(conditioner, batch, features)
        # theirs: [negative, positive] rows (their swap), text right-padded, then the queries
        ref_ids, ref_text = ref[f"{case}/input_ids"].long(), ref[f"{case}/text_mask"].bool()
        ref_condition, ref_mask = ref[f"{case}/condition"], ref[f"{case}/mask"].bool()
        ids_equal = True
        diffs = []
        for row in (0, 1):  # 0: the prompt, 1: the null prompt (theirs: input rows alike, condition swapped)
            ours_text = batch.input_ids[row][batch.attention_mask[row] & ~batch.query_mask[row]]
            ids_equal &= torch.equal(ours_text, ref_ids[row][ref_text[row]])
            ours_valid = condition[row][batch.attention_mask[row]]
            theirs_valid = ref_condition[1 - row][ref_mask[1 - row]]
            diffs.append((ours_valid - theirs_valid).abs().max().item())
        # one DiT velocity on their input: null rows first in theirs, conditional first in ours
        order = torch.tensor([1, 0])
        with torch.no_grad():
            theirs_in, timestep = ref[f"{case}/velocity_in"], ref[f"{case}/timestep"]
            velocity = generator(theirs_in, timestep.float(), condition[order], batch.attention_mask[order])
            noise = ref[f"{case}/noise"]  # their fixed initial noise
            sampler = make_scheduler("dpm", flow_shift)  # what UniLIPPipeline samples with
            sampler.set_timesteps(20)
            t = sampler.timesteps[0]
            guided = pipe.guided_velocity(noise, t, condition, batch.attention_mask, 4.5)
            step = sampler.step(guided, t, noise).prev_sample
        # their DiT is loaded in bf16 and cast to fp32 (model/sana.py): its sin-cos position table, a buffer
        # recomputed at load and never in a checkpoint, keeps bf16 precision; ours is fp32. With the table
        # rounded the same way the rest must agree to fp32 precision.
        table = generator.dit.patch_embed.pos_embed
        generator.dit.patch_embed.pos_embed = table.to(torch.bfloat16).float()
        with torch.no_grad():
            velocity_bf16 = generator(theirs_in, timestep.float(), condition[order], batch.attention_mask[order])
            fresh = make_scheduler("dpm", flow_shift)  # a DPM-Solver scheduler keeps state: a new one
            fresh.set_timesteps(20)
            step_bf16 = fresh.step(pipe.guided_velocity(noise, t, condition, batch.attention_mask, 4.5), t, noise)
        generator.dit.patch_embed.pos_embed = table
        report[case] = {
            "token_ids_equal": bool(ids_equal),
            "condition_max_abs_diff": max(diffs),
            "condition_max_abs": ref_condition.abs().max().item(),
            "velocity_max_abs_diff": (velocity - ref[f"{case}/velocity"]).abs().max().item(),
            "velocity_max_abs": ref[f"{case}/velocity"].abs().max().item(),
            "first_timestep": {"ours": float(t), "theirs_dit_input": ref[f"{case}/timestep"][0].item()},
            "guided_velocity_max_abs_diff": (guided - ref[f"{case}/guided"]).abs().max().item(),
            "step_max_abs_diff": (step - ref[f"{case}/step"]).abs().max().item(),
            "step_max_abs": ref[f"{case}/step"].abs().max().item(),
            "with_their_bf16_position_table": {
                "velocity_max_abs_diff": (velocity_bf16 - ref[f"{case}/velocity"]).abs().max().item(),
                "step_max_abs_diff": (step_bf16.prev_sample - ref[f"{case}/step"]).abs().max().item(),
            },
        }
    return report


def main(argv: list[str] | None = None) -> dict | None:
    description = __doc__.split("\n\n")[0]
    return parity_main(argv, Path(__file__), description, reference_side, ours_side, "parity_generation.json")


if __name__ == "__main__":
    main()
