"""Run as a script under another transformers (PYTHONPATH=<its target dir>): load exported checkpoints the way a
user loads the hub's home checkpoint, `<Class>.from_pretrained(folder)`, and run them on fixed inputs.

    python tests/load_with_transformers.py <jobs.json> <out_dir>

jobs.json: [{"name", "class", "folder", "inputs" (a safetensors file of keyword arguments), "flags" (more
keyword arguments)}]. Writes <out_dir>/<name>.safetensors (the last hidden state) and <out_dir>/report.json
(the transformers version and each load's missing / unexpected / mismatched keys). Imports nothing of unilip
nor of the tests, so that only that transformers is exercised.
"""

import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file


def main(jobs_file: str, out_dir: str) -> None:
    out = Path(out_dir)
    report = {"transformers": transformers.__version__, "file": transformers.__file__, "loads": {}}
    for job in json.loads(Path(jobs_file).read_text()):
        model_class = getattr(transformers, job["class"])
        model, info = model_class.from_pretrained(job["folder"], output_loading_info=True)
        report["loads"][job["name"]] = {
            key: sorted(str(k) for k in info.get(key, ()))
            for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
        }
        model = model.float().eval()
        with torch.no_grad():
            hidden = model(**load_file(job["inputs"]), **job["flags"]).last_hidden_state
        save_file({"last_hidden_state": hidden.contiguous()}, str(out / f"{job['name']}.safetensors"))
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
