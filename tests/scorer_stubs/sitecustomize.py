"""Stand-ins for the models and APIs of the official scorers, for tests/test_official_scorers.py only.

On PYTHONPATH, Python imports this file at start-up; it puts stub modules in `sys.modules` so that each official
scorer script runs unchanged (its own argument parsing, file discovery and aggregation) with its detector, VQA
model or judge replaced by a fixed rule. Each stub appends what it was shown to the JSON-lines file
$UNILIP_STUB_LOG. The rules (the tests compute the expected scores from them independently):

- GenEval (mmdet Mask2Former, open_clip, clip_benchmark): sample files with an even number detect every object the
  prompt's metadata includes (its count, side by side, confidence 0.95); odd ones detect nothing. The colour
  classifier always answers the first colour ("red").
- DPG-Bench (ModelScope mPLUG): "yes" to every question when the crop's mean pixel value is above 127.5, else "no".
- WISE (legacy `openai.ChatCompletion`): consistency, realism, aesthetic quality = n % 3, n // 3 % 3, n // 9 % 3 for
  n = len(prompt); a prompt listed in $UNILIP_STUB_UNPARSEABLE (a JSON list) gets an answer without scores.
- ImgEdit (`openai.OpenAI`): the three scores are 1 + n % 5, 1 + n // 5 % 5, 1 + n // 25 % 5 for n the length of
  the judge's prompt (the edit type's template with the instruction in it).
- GEdit-Bench (VIEScore's GPT-4.1 over `requests.post`; the dataset through `datasets.load_dataset`): semantics
  8, quality 6; `load_dataset("stepfun-ai/GEdit-Bench")` reads the parquet files under $UNILIP_STUB_GEDIT_DATASET.
"""

import base64
import io
import json
import os
import re
import sys
import types


def _log(**record):
    path = os.environ.get("UNILIP_STUB_LOG")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def _module(name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def _image_size(data_url):
    from PIL import Image

    return list(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).size)


# ------------------------------------------------------------------ GenEval
def _init_detector(config, checkpoint, device):
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint} not found")  # as mmcv's load_checkpoint
    names = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), "object_names.txt")
    with open(names) as handle:
        return [line.strip() for line in handle]


def _inference_detector(classnames, filepath):
    import numpy as np

    _log(stub="detector", image=os.path.abspath(filepath))
    with open(os.path.join(os.path.dirname(os.path.dirname(filepath)), "metadata.jsonl")) as handle:
        metadata = json.load(handle)
    boxes = [np.zeros((0, 5), dtype=np.float32) for _ in classnames]
    if int(re.match(r"\d+", os.path.basename(filepath)).group()) % 2 == 0:
        x = 0
        for include in metadata.get("include", []):
            found = [[x + 10 * i, 0, x + 10 * i + 8, 8, 0.95] for i in range(include["count"])]
            boxes[classnames.index(include["class"])] = np.array(found, dtype=np.float32)
            x += 10 * include["count"]
    return boxes


def _run_classification(model, classifier, dataloader, device):
    import torch

    logits = torch.zeros(len(dataloader.dataset), 10)
    logits[:, 0] = 1
    return logits, torch.zeros(len(dataloader.dataset))


_module("mmdet", __file__=os.path.join(os.path.dirname(__file__), "mmdet", "__init__.py"))
_module("mmdet.apis", init_detector=_init_detector, inference_detector=_inference_detector)
_module("open_clip", create_model_and_transforms=lambda *a, **k: (None, None, None), get_tokenizer=lambda a: None)
_module("clip_benchmark")
_module("clip_benchmark.metrics")
_module(
    "clip_benchmark.metrics.zeroshot_classification",
    zero_shot_classifier=lambda *a, **k: None,
    run_classification=_run_classification,
)
if os.environ.get("UNILIP_STUB_CUDA"):  # evaluate_images.py asserts a GPU; the stubs run anywhere
    import torch

    torch.cuda.is_available = lambda: True


# ------------------------------------------------------------------ DPG-Bench
def _mplug(task, model=None, device=None):
    def answer(inputs):
        import numpy as np

        mean = float(np.asarray(inputs["image"].convert("RGB"), dtype=np.float64).mean())
        _log(stub="mplug", size=list(inputs["image"].size), mean=mean)
        return {"text": "yes" if mean > 127.5 else "no"}

    return answer


_module("modelscope")
_module("modelscope.pipelines", pipeline=_mplug)
_module("modelscope.utils")
_module("modelscope.utils.constant", Tasks=types.SimpleNamespace(visual_question_answering="vqa"))


# ------------------------------------------------------------------ WISE and ImgEdit (OpenAI)
def _wise_create(model, messages, temperature=0.0, max_tokens=0):
    text = messages[1]["content"][0]["text"]
    prompt = re.search(r'PROMPT: "(.*)"\nEXPLANATION', text, re.S).group(1)
    unparseable = json.loads(os.environ.get("UNILIP_STUB_UNPARSEABLE", "[]"))
    _log(stub="wise", prompt=prompt, model=model)
    n = len(prompt)
    content = (
        "I cannot judge this."
        if prompt in unparseable
        else (f"Consistency: {n % 3}\nRealism: {n // 3 % 3}\nAesthetic Quality: {n // 9 % 3}")
    )
    return {"choices": [{"message": {"content": content}}]}


class _Completions:
    def create(self, model, messages, stream=False, **kwargs):
        text, original, edited = messages[0]["content"]
        n = len(text["text"])
        sizes = [_image_size(part["image_url"]["url"]) for part in (original, edited)]
        _log(stub="imgedit", model=model, original=sizes[0], edited=sizes[1])
        content = (
            f"Brief reasoning: stub.\nPrompt Compliance: {1 + n % 5}\nVisual Seamlessness: {1 + n // 5 % 5}\n"
            f"Physical & Detail Fidelity: {1 + n // 25 % 5}"
        )
        message = types.SimpleNamespace(content=content)
        return types.SimpleNamespace(choices=[types.SimpleNamespace(message=message)])


class _OpenAI:
    def __init__(self, api_key=None, base_url=None):
        self.chat = types.SimpleNamespace(completions=_Completions())


_module(
    "openai", ChatCompletion=types.SimpleNamespace(create=_wise_create), OpenAI=_OpenAI, api_key=None, api_base=None
)


# ------------------------------------------------------------------ GEdit-Bench
if os.environ.get("UNILIP_STUB_GEDIT_DATASET"):
    import glob

    import datasets
    import requests

    def _load_dataset(name, *args, **kwargs):
        assert name == "stepfun-ai/GEdit-Bench", name
        files = sorted(
            glob.glob(os.path.join(os.environ["UNILIP_STUB_GEDIT_DATASET"], "**", "*.parquet"), recursive=True)
        )
        return datasets.DatasetDict({"train": datasets.Dataset.from_parquet(files)})

    def _post(url, **kwargs):  # requests.post(url, json=payload, headers=headers)
        content, headers = kwargs["json"]["messages"][0]["content"], kwargs["headers"]
        sizes = [_image_size(part["image_url"]["url"]) for part in content if part["type"] == "image_url"]
        _log(stub="gedit", key=headers["Authorization"], images=sizes)
        score = 8 if len(sizes) == 2 else 6  # semantics (source and edit) or quality (the edit alone)
        answer = json.dumps({"score": [score], "reasoning": "stub"})
        body = {"choices": [{"message": {"content": answer}}]}
        return types.SimpleNamespace(json=lambda: body)

    datasets.load_dataset = _load_dataset
    requests.post = _post
