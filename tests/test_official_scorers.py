"""The official scorers at their pinned commits, run by the harness on its own output (opt-in, slow):

    UNILIP_GENEVAL=<djghosh13/geneval> UNILIP_ELLA=<TencentQQGYLab/ELLA> UNILIP_WISE=<PKU-YuanGroup/WISE> \\
    UNILIP_IMGEDIT=<PKU-YuanGroup/ImgEdit> UNILIP_STEP1X=<stepfun-ai/Step1X-Edit> \\
    UNILIP_SCORER_PYTHON=<python with pandas, accelerate, datasets, megfile, tenacity> \\
    pytest tests/test_official_scorers.py -m slow

Each variable is a checkout at the commit the benchmark pins (`git clone ... && git -C ... checkout <sha>`, see
docs/results.md); a test without its checkout is skipped. The scorers' scripts run unchanged: their argument
parsing, their discovery of the harness's files and their aggregation are theirs. Only the detector, the VQA
model, the judges and the GEdit-Bench download are replaced by fixed rules (tests/scorer_stubs/sitecustomize.py),
from which the expected scores are computed here independently, and the totals are compared with the official
aggregation scripts (summary_scores.py, Calculate.py, calculate_statistics.py).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import sampling_helpers as data
from tests.generation_helpers import one_thread  # noqa: F401  (autouse fixture)
from unilip.benchmarks.__main__ import main

pytestmark = pytest.mark.slow
STUBS = Path(__file__).parent / "scorer_stubs"
PYTHON = os.environ.get("UNILIP_SCORER_PYTHON", sys.executable)
SIZE = 56


def checkout(variable: str) -> Path:
    if not os.environ.get(variable):
        pytest.skip(f"set {variable} to the pinned official checkout")
    return Path(os.environ[variable])


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory, tiny_config):
    return data.save_tiny_generator(tmp_path_factory.mktemp("tiny"), tiny_config)


@pytest.fixture
def stub_log(tmp_path, monkeypatch):
    """The scorers run with the stubs on PYTHONPATH; returns a reader of what the stubs were shown."""
    path = tmp_path / "stubs.jsonl"
    monkeypatch.setenv("PYTHONPATH", str(STUBS))
    monkeypatch.setenv("UNILIP_STUB_LOG", str(path))
    return lambda stub: [r for r in map(json.loads, path.read_text().splitlines()) if r["stub"] == stub]


def bench(name, generator_dir, out, *overrides, size=SIZE):
    argv = [name, f"generator={generator_dir}", f"out={out}", f"sampler.size={size}", "sampler.steps=2"]
    return main([*argv, "batch_size=16", f"scorer_python={PYTHON}", *overrides])


def official(script: str, *args: str, cwd: Path) -> str:
    done = subprocess.run([PYTHON, script, *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_geneval(generator_dir, tmp_path, stub_log, monkeypatch):
    root = checkout("UNILIP_GENEVAL")
    lines, tags = [], {}
    for line in (root / "prompts" / "evaluation_metadata.jsonl").read_text().splitlines():
        tag = json.loads(line)["tag"]
        if tags.get(tag, 0) < (3 if tag == "single_object" else 1):  # tasks of unequal sizes: the mean is per task
            tags[tag] = tags.get(tag, 0) + 1
            lines.append(line)
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    detectors = tmp_path / "detectors"
    detectors.mkdir()
    (detectors / "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth").touch()
    monkeypatch.setenv("UNILIP_STUB_CUDA", "1")
    out = tmp_path / "out"
    results = bench("geneval", generator_dir, out, f"prompts={tmp_path / 'prompts.jsonl'}", f"scorer={root}",
                    f"benchmark.detector={detectors}")  # fmt: skip
    samples = {str(p) for p in (out / "images").glob("*/samples/*.png")}
    assert len(samples) == 4 * len(lines) == 4 * (len(tags) + 2) == 32
    assert sorted(r["image"] for r in stub_log("detector")) == sorted(samples)  # each sample scored once
    summary = official("evaluation/summary_scores.py", str(out / "scores" / "geneval_results.jsonl"), cwd=root)
    assert "Total images: 32" in summary
    overall = float(re.search(r"Overall score \(avg. over tasks\): ([0-9.]+)", summary).group(1))
    assert results["scores"]["overall"] == pytest.approx(overall, abs=5e-6)  # printed with 5 decimals
    # even samples detect what the prompt includes: single_object, two_object and counting right for those
    for tag in ("single_object", "two_object", "counting"):
        assert results["scores"]["tags"][tag] == 0.5


def test_dpg(generator_dir, tmp_path, stub_log):
    root = checkout("UNILIP_ELLA")
    ella = tmp_path / "ELLA" / "dpg_bench"  # a copy: the snapshot may lack dpg_bench.csv (a large file)
    ella.mkdir(parents=True)
    shutil.copy(root / "dpg_bench" / "compute_dpg_bench.py", ella)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    try:
        csv = (root / "dpg_bench" / "dpg_bench.csv").read_text()
        ids = sorted({line.split(",")[0] for line in csv.splitlines()[2:]})[:3]
    except (OSError, UnicodeDecodeError):  # the columns compute_dpg_bench.py reads, two questions per prompt
        # (named ones: a column of numbers alone would be read as integers, unlike the real file's mixed column)
        ids = sorted(p.stem for p in (root / "dpg_bench" / "prompts").glob("*.txt") if not p.stem.isdigit())[:3]
        header = "item_id,text,keywords,proposition_id,dependency,category_broad,category_detailed,tuple,"
        dependency = {1: "0", 2: '"1,0"'}  # question 2 depends on question 1 (a list: the column stays text)
        rows = [
            f'{i},x,x,{q},{dependency[q]},entity,whole,entity - whole (thing),"Is there a thing {q}?"'
            for i in ids
            for q in (1, 2)
        ]
        first = "unused,x,x,1,0,entity,whole,entity - whole (thing),Is there a thing?"  # the row the script skips
        csv = header + "question_natural_language\n" + "\n".join([first, *rows]) + "\n"
    (ella / "dpg_bench.csv").write_text(csv)
    for item in ids:
        shutil.copy(root / "dpg_bench" / "prompts" / f"{item}.txt", prompts)
    results = bench("dpg", generator_dir, tmp_path / "out", f"prompts={prompts}", f"scorer={ella.parent}")
    # the stub answers "yes" to every question on a crop brighter than 127.5: a crop scores 1 or 0; the per-image
    # lines are compute_dpg_bench.py's (it leaves out an image it fails on: its csv's first row is skipped)
    text = (tmp_path / "out" / "scores" / "dpg_results.txt").read_text()
    scored = {
        Path(line.split(", ")[0]).stem: float(line.split(", ")[-1]) for line in text.splitlines() if ".png, " in line
    }
    assert scored and set(scored) <= set(ids) and results["scores"]["images"] == len(scored)
    for item, score in scored.items():
        grid = np.asarray(Image.open(tmp_path / "out" / "images" / f"{item}.png").convert("RGB"), dtype=np.float64)
        crops = [grid[r : r + SIZE, c : c + SIZE] for r in (0, SIZE) for c in (0, SIZE)]
        assert score == np.mean([crop.mean() > 127.5 for crop in crops])
    assert results["scores"]["overall"] == pytest.approx(100 * np.mean(list(scored.values())))
    assert {tuple(r["size"]) for r in stub_log("mplug")} == {(SIZE, SIZE)}


WISE_FILES = ("cultural_common_sense", "spatio-temporal_reasoning", "natural_science")


def test_wise(generator_dir, tmp_path, stub_log, monkeypatch):
    root = checkout("UNILIP_WISE")
    prompts = root / "WISE_legacy" / "data"
    items = [item for name in WISE_FILES for item in json.loads((prompts / f"{name}.json").read_text())]
    science = json.loads((prompts / "natural_science.json").read_text())
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("UNILIP_STUB_UNPARSEABLE", json.dumps([science[0]["Prompt"], science[-1]["Prompt"]]))
    out, args = tmp_path / "out", [f"prompts={prompts}", f"scorer={root}"]
    with pytest.raises(SystemExit, match=r"gpt_eval.py natural_science\) failed: the judge gave no score for 2 of 300"):
        bench("wise", generator_dir, out, *args, size=28)
    scores = [str(out / "scores" / "wise" / f"{name}_scores_results.jsonl") for name in WISE_FILES]
    calculate = official("Calculate.py", *scores, "--category", "all", cwd=root / "WISE_legacy")
    assert "Aborting overall evaluation due to incomplete data." in calculate  # and so does the harness:
    assert json.loads((out / "results.json").read_text())["scores"]["overall"] is None
    monkeypatch.delenv("UNILIP_STUB_UNPARSEABLE")  # the judge answers: the rerun judges the two missing prompts
    results = bench("wise", generator_dir, out, *args, size=28)
    assert len(stub_log("wise")) == 998 + 2 * (3 + 1)  # every prompt once, the two unparseable ones 3 + 1 times
    # by hand from the stub's rule and WISE's weights (README): prompt ids 1-400, 401-567, 568-700, ...
    bounds = {"Cultural": 400, "Time": 567, "Space": 700, "Biology": 800, "Physics": 900, "Chemistry": 1000}
    weights = {"Cultural": 0.4, "Time": 0.167, "Space": 0.133, "Biology": 0.1, "Physics": 0.1, "Chemistry": 0.1}
    by_category = {category: [] for category in bounds}
    for item in items:
        n = len(item["Prompt"])
        category = next(c for c, last in bounds.items() if item["prompt_id"] <= last)
        by_category[category].append((0.7 * (n % 3) + 0.2 * (n // 3 % 3) + 0.1 * (n // 9 % 3)) / 2)
    expected = sum(weights[c] * np.mean(v) for c, v in by_category.items())
    assert results["scores"]["overall"] == pytest.approx(expected, abs=1e-12)
    calculate = official("Calculate.py", *scores, "--category", "all", cwd=root / "WISE_legacy")
    assert float(re.search(r"Overall WiScore: ([0-9.]+)", calculate).group(1)) == pytest.approx(expected, abs=0.005)


def test_imgedit(generator_dir, tmp_path, stub_log):
    root = checkout("UNILIP_IMGEDIT")
    edits, originals = data.imgedit_prompts(tmp_path)  # three sources of 40 x 40, 48 x 40 and 56 x 40
    table = json.loads(edits.read_text())
    for item, edit_type in zip(table.values(), ("adjust", "style", "add"), strict=True):
        item["edit_type"] = edit_type  # types the judge prompts of prompts.json cover
    edits.write_text(json.dumps(table))
    results = bench("imgedit", generator_dir, tmp_path / "out", f"prompts={edits}", f"benchmark.images={originals}",
                    f"scorer={root}", size=84)  # fmt: skip
    templates = json.loads((root / "Benchmark" / "Basic" / "prompts.json").read_text())
    averages, by_type = {}, {}
    for key, item in table.items():
        n = len(templates[item["edit_type"]].replace("<edit_prompt>", item["prompt"]))
        averages[key] = round((3 + n % 5 + n // 5 % 5 + n // 25 % 5) / 3, 2)  # step1 rounds to 2 decimals
        by_type[item["edit_type"]] = averages[key]
    assert results["scores"]["overall"] == pytest.approx(np.mean(list(averages.values())))
    assert results["scores"]["types"] == pytest.approx(by_type)
    # the judge sees each edit at its source's aspect ratio (at most 3 x 3 cells of 28 px here)
    for seen in stub_log("imgedit"):
        (width, height), (out_width, out_height) = seen["original"], seen["edited"]
        assert abs(out_width - out_height * width / height) < 28


def test_gedit(generator_dir, tmp_path, stub_log, monkeypatch):
    root = checkout("UNILIP_STEP1X")
    copy = tmp_path / "Step1X-Edit"  # a copy, to put a key into GEdit-Bench/secret.env
    shutil.copytree(root / "GEdit-Bench", copy / "GEdit-Bench")
    (copy / "GEdit-Bench" / "secret.env").write_text("sk-test\n")
    dataset = data.gedit_dataset(tmp_path)
    monkeypatch.setenv("UNILIP_STUB_GEDIT_DATASET", str(dataset))
    results = bench("gedit", generator_dir, tmp_path / "out", f"prompts={dataset}", f"scorer={copy}")
    calls = stub_log("gedit")
    assert len(calls) == 2 * len(data.GEDIT_ROWS) and {c["key"] for c in calls} == {"Bearer sk-test"}
    # semantics 8 and quality 6 for every edit: sqrt(48) per group; the 9 groups without a row leave G_O open
    languages = results["scores"]["languages"]
    assert (
        languages["en"]["groups"].keys() == {"background_change", "color_alter"}
        and results["scores"]["overall"] is None
    )
    assert languages["cn"]["groups"]["color_alter"] == pytest.approx({"semantics": 8, "quality": 6, "overall": 48**0.5})
    statistics = official("calculate_statistics.py", "--model_name", "unilip", "--save_path",
                          str(tmp_path / "out" / "scores" / "gedit"), "--backbone", "gpt4o", "--language", "all",
                          cwd=copy / "GEdit-Bench")  # fmt: skip
    assert "background_change: 8.000, 6.000, 6.928" in statistics  # as the harness: per group, 3 decimals
