"""python -m unilip.benchmarks: each benchmark's output read the way its official scorer reads it, scoring
through a stand-in scorer checkout, the scores against hand-computed values, and one-line refusals.

The `read_*` functions follow the official scorers' own file discovery (cited per function), written here
independently of unilip's writers."""

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import sampling_helpers as data
from tests.generation_helpers import one_thread  # noqa: F401  (autouse fixture)
from tests.sampling_helpers import fake_scorer
from unilip.benchmarks.__main__ import main

SIZE = 56
FAST = [f"sampler.size={SIZE}", "sampler.steps=2", "batch_size=4"]


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory, tiny_config):
    return data.save_tiny_generator(tmp_path_factory.mktemp("tiny"), tiny_config)


def run(name, generator_dir, out, *overrides):
    return main([name, f"generator={generator_dir}", f"out={out}", *FAST, *overrides])


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return image.size


# ------------------------------------------------------------------ the scorers' views of the output
def read_geneval(image_dir: Path) -> list[tuple[dict, Path]]:
    """djghosh13/geneval evaluation/evaluate_images.py main(): digit folders, metadata.jsonl, r"\\d+\\.png"."""
    found = []
    for subfolder in os.listdir(image_dir):
        folder = image_dir / subfolder
        if not folder.is_dir() or not subfolder.isdigit():
            continue
        with open(folder / "metadata.jsonl") as fp:
            metadata = json.load(fp)
        for name in os.listdir(folder / "samples"):
            if (folder / "samples" / name).is_file() and re.match(r"\d+\.png", name):
                found.append((metadata, folder / "samples" / name))
    return found


def test_geneval_layout_is_what_its_scorer_reads(generator_dir, tmp_path):
    prompts = data.geneval_prompts(tmp_path)
    results = run("geneval", generator_dir, tmp_path / "out", f"prompts={prompts}")
    found = read_geneval(tmp_path / "out" / "images")
    lines = [json.loads(line) for line in prompts.read_text().splitlines()]
    assert len(found) == 4 * len(lines)  # 4 samples per prompt
    for index, line in enumerate(lines):  # each folder holds the N-th line of evaluation_metadata.jsonl
        mine = [path for metadata, path in found if metadata == line]
        assert len(mine) == 4 and {p.parent.parent.name for p in mine} == {f"{index:05d}"}
        assert sorted(p.name for p in mine) == ["0000.png", "0001.png", "0002.png", "0003.png"]
    assert all(png_size(path) == (SIZE, SIZE) for _, path in found)
    assert results["scores"] is None and "evaluation/evaluate_images.py" in results["score_commands"][0]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "Not scored yet" in summary and "Mask2Former" in summary


def test_dpg_layout_is_what_its_scorer_reads_and_crop_k_is_sample_k(generator_dir, tmp_path):
    from unilip.pipelines import UniLIPPipeline

    prompts = data.dpg_prompts(tmp_path)
    run("dpg", generator_dir, tmp_path / "out", f"prompts={prompts}", "sampler.seed=3")
    root = tmp_path / "out" / "images"
    # TencentQQGYLab/ELLA dpg_bench/compute_dpg_bench.py: every file in the root is an image whose name
    # before the first '.' is a prompt's item id; 4 crops of --resolution px, row-major
    keys = sorted(p.stem for p in prompts.glob("*.txt"))
    assert sorted(name.split(".")[0] for name in os.listdir(root)) == keys
    pipe = UniLIPPipeline.from_pretrained(generator_dir)
    for index, key in enumerate(keys):  # prompts in sorted order: seed + index
        image = Image.open(root / f"{key}.png")
        assert image.size == (2 * SIZE, 2 * SIZE)
        crops = [
            (0, 0, SIZE, SIZE),
            (SIZE, 0, 2 * SIZE, SIZE),
            (0, SIZE, SIZE, 2 * SIZE),
            (SIZE, SIZE, 2 * SIZE, 2 * SIZE),
        ]
        prompt = (prompts / f"{key}.txt").read_text().strip()
        samples = pipe([prompt] * 4, seed=3 + index, size=SIZE, num_inference_steps=2)
        for k, box in enumerate(crops):
            crop = np.asarray(image.crop(box)).astype(np.int16)
            expected = (samples[k].permute(1, 2, 0).numpy() * 255).round().astype(np.int16)
            assert np.abs(crop - expected).max() <= 1, (key, k)


def test_wise_layout_is_what_its_scorer_reads(generator_dir, tmp_path):
    folder = data.wise_prompts(tmp_path)
    run("wise", generator_dir, tmp_path / "out", f"prompts={folder}")
    image_dir = tmp_path / "out" / "images"
    expected = set()
    for name in ("cultural_common_sense", "spatio-temporal_reasoning", "natural_science"):
        # PKU-YuanGroup/WISE gpt_eval.py main(): image_dir / f"{prompt_id}.png" for every prompt of the file
        for item in json.loads((folder / f"{name}.json").read_text()):
            path = image_dir / f"{item['prompt_id']}.png"
            assert path.is_file() and png_size(path) == (SIZE, SIZE)
            expected.add(path.name)
    assert set(os.listdir(image_dir)) == expected


def test_imgedit_layout_is_what_its_scorer_reads(generator_dir, tmp_path):
    edits, originals = data.imgedit_prompts(tmp_path)
    run("imgedit", generator_dir, tmp_path / "out", f"prompts={edits}", f"benchmark.images={originals}")
    # PKU-YuanGroup/ImgEdit Benchmark/Basic/basic_bench.py process_single_item(): f"{key}.png" in the result
    # folder, the original at origin_img_root / item["id"]
    for key, item in json.loads(edits.read_text()).items():
        assert png_size(tmp_path / "out" / "images" / f"{key}.png") == (SIZE, SIZE)
        assert (originals / item["id"]).is_file()
    assert len(os.listdir(tmp_path / "out" / "images")) == len(data.IMGEDIT_EDITS)


def test_gedit_layout_is_what_its_scorer_reads(generator_dir, tmp_path):
    import datasets

    dataset_dir = data.gedit_dataset(tmp_path)
    run("gedit", generator_dir, tmp_path / "out", f"prompts={dataset_dir}")
    images = tmp_path / "out" / "images"
    table = datasets.Dataset.from_parquet(sorted(str(p) for p in dataset_dir.rglob("*.parquet")))
    for item in table:
        # stepfun-ai/Step1X-Edit GEdit-Bench/test_gedit_score.py: the first file named `key.*` in
        # edited_images_dir/model_name/fullset/task_type/instruction_language
        folder = images / "unilip" / "fullset" / item["task_type"] / item["instruction_language"]
        matches = sorted(folder.glob(f"{item['key']}.*"))
        assert [m.name for m in matches] == [f"{item['key']}.png"] and png_size(matches[0]) == (SIZE, SIZE)
    assert len(list(images.rglob("*.png"))) == len(data.GEDIT_ROWS)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["inputs"]["language"] == "all"


# ------------------------------------------------------------------ scoring
# writes results.jsonl as evaluate_images.py does: one record per image; here sample 0000 and 0002 correct
GENEVAL_STANDIN = """
import argparse, json, os, re
parser = argparse.ArgumentParser()
parser.add_argument("imagedir"); parser.add_argument("--outfile"); parser.add_argument("--model-path")
args = parser.parse_args()
assert os.path.isfile("evaluation/evaluate_images.py"), "run from the checkout"
assert args.model_path == "/detectors"
rows = []
for sub in sorted(os.listdir(args.imagedir)):
    meta = json.load(open(os.path.join(args.imagedir, sub, "metadata.jsonl")))
    for name in sorted(os.listdir(os.path.join(args.imagedir, sub, "samples"))):
        rows.append({"filename": name, "tag": meta["tag"], "prompt": meta["prompt"],
                     "correct": name in ("0000.png", "0002.png") or meta["tag"] == "single_object",
                     "reason": "", "metadata": json.dumps(meta), "details": "{}"})
with open(args.outfile, "w") as fp:
    fp.writelines(json.dumps(r) + "\\n" for r in rows)
"""


def test_geneval_scored_by_the_given_scorer(generator_dir, tmp_path):
    prompts = data.geneval_prompts(tmp_path)
    files = {
        "evaluation/evaluate_images.py": GENEVAL_STANDIN,
        "evaluation/summary_scores.py": "",
        "evaluation/object_names.txt": "",
    }
    commit = fake_scorer(tmp_path / "geneval", files)
    out = tmp_path / "out"
    scorer = [f"scorer={tmp_path / 'geneval'}", f"scorer_python={sys.executable}", "benchmark.detector=/detectors"]
    results = run("geneval", generator_dir, out, f"prompts={prompts}", *scorer)
    # tags: single_object 4/4, two_object 2/4, counting 2/4 -> mean over tags (2/3 + ...) by hand
    assert results["scores"]["tags"] == {"single_object": 1.0, "two_object": 0.5, "counting": 0.5}
    assert results["scores"]["overall"] == pytest.approx((1.0 + 0.5 + 0.5) / 3)
    assert results["judge"]["scorer_commit"] == commit and "Mask2Former" in results["judge"]["name"]
    assert results["scores"]["images"] == 12  # 3 prompts x 4 samples, each one record
    assert results["scores"]["rule"].startswith("overall = mean over tags") and "summary_scores.py" in results[
        "scores"]["rule"]  # fmt: skip
    written = json.loads((out / "results.json").read_text())
    assert written["scores"] == results["scores"] and written["sampler"]["steps"] == 2
    assert "| overall | 0.6667 |" in (out / "summary.md").read_text()
    # a second run samples nothing and does not run the scorer again (its output exists)
    os.utime(out / "scores" / "geneval_results.jsonl", ns=(0, 0))
    again = run("geneval", generator_dir, out, f"prompts={prompts}", *scorer)
    assert again["scores"] == results["scores"] and (out / "scores" / "geneval_results.jsonl").stat().st_mtime_ns == 0
    assert json.loads((out / "manifest.json").read_text())["runs"][1]["ranks"][0]["generated"] == []


# WISE's WISE_legacy/gpt_eval.py writes {prompt_id, Subcategory, consistency, realism, aesthetic_quality} per image
WISE_STANDIN = """
import argparse, json, os
parser = argparse.ArgumentParser()
parser.add_argument("--json_path"); parser.add_argument("--image_dir"); parser.add_argument("--output_dir")
parser.add_argument("--api_key"); parser.add_argument("--model"); parser.add_argument("--result_full")
parser.add_argument("--result_scores"); parser.add_argument("--max_workers")
args = parser.parse_args()
assert os.path.isfile("gpt_eval.py") and os.path.basename(os.getcwd()) == "WISE_legacy"
assert args.api_key == "sk-test" and args.model == "gpt-4o-2024-05-13"
judged = {1: (2, 2, 2), 401: (1, 1, 1), 568: (2, 0, 0), 701: (0, 2, 0), 801: (0, 0, 2), 901: (1, 0, 0)}
rows = []
for item in json.load(open(args.json_path)):
    assert os.path.isfile(os.path.join(args.image_dir, f"{item['prompt_id']}.png"))
    c, r, a = judged[item["prompt_id"]]
    rows.append({"prompt_id": item["prompt_id"], "Subcategory": item["Subcategory"], "consistency": c,
                 "realism": r, "aesthetic_quality": a})
os.makedirs(os.path.dirname(args.result_scores), exist_ok=True)
with open(args.result_scores, "w") as fp:
    fp.writelines(json.dumps(r) + "\\n" for r in rows)
"""


def test_wise_scoring_needs_the_key_only_for_the_judge_and_weighs_categories(generator_dir, tmp_path, monkeypatch):
    folder = data.wise_prompts(tmp_path)
    fake_scorer(tmp_path / "wise", {"WISE_legacy/gpt_eval.py": WISE_STANDIN, "WISE_legacy/Calculate.py": ""})
    out = tmp_path / "out"
    scorer = [f"scorer={tmp_path / 'wise'}", f"scorer_python={sys.executable}"]
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    results = run("wise", generator_dir, out, f"prompts={folder}", *scorer)  # images made, judge not run
    assert results["scores"] is None and len(list((out / "images").glob("*.png"))) == 6
    assert any("set OPENAI_API_KEY" in note for note in results["notes"])
    assert '--api_key "${OPENAI_API_KEY}"' in results["score_commands"][0]  # the key itself is never written
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    results = run("wise", generator_dir, out, f"prompts={folder}", *scorer)
    # WiScore = (0.7 c + 0.2 r + 0.1 a) / 2, by hand: Cultural 1.0, Time 0.5, Space 0.7, Biology 0.2,
    # Physics 0.1, Chemistry 0.35; overall 0.4 * 1.0 + 0.167 * 0.5 + 0.133 * 0.7 + 0.1 * (0.2 + 0.1 + 0.35)
    expected = {"Cultural": 1.0, "Time": 0.5, "Space": 0.7, "Biology": 0.2, "Physics": 0.1, "Chemistry": 0.35}
    assert results["scores"]["categories"] == pytest.approx(expected)
    assert results["scores"]["overall"] == pytest.approx(0.4 + 0.0835 + 0.0931 + 0.065)
    assert "sk-test" not in (out / "results.json").read_text()


def test_collectors_read_the_scorers_outputs(tmp_path):
    from unilip.benchmarks.dpg import DPGBench
    from unilip.benchmarks.gedit import GROUPS, GEditBench
    from unilip.benchmarks.imgedit import ImgEdit

    scores = tmp_path / "scores"
    scores.mkdir()
    # compute_dpg_bench.py's res file: per-image lines, then the summary block it appends last
    (scores / "dpg_results.txt").write_text(
        "/x/a.png, 0.5, 1.0, 1.0, 0.5, 0.75\nModel: images\nL1 category scores:\n\tentity: 80.0\n"
        "\tattribute: 70.5\nL2 category scores:\n\tentity - whole: 80.0\nImage path: /x\n"
        "Save results to: /x/r.txt\nDPG-Bench score: 75.0\n"
    )
    dpg = DPGBench("unused").collect(tmp_path)
    assert dpg["overall"] == 75.0 and dpg["categories"] == {"entity": 80.0, "attribute": 70.5}
    # ImgEdit step1 (per-image means) and step2 (per type) outputs
    (scores / "imgedit_average_score.json").write_text(json.dumps({"1": 4.0, "2": 3.0, "3": 2.0}))
    (scores / "imgedit_typescore.json").write_text(json.dumps({"add": 3.5, "style": 2.0}))
    imgedit = ImgEdit("unused").collect(tmp_path)
    assert imgedit["overall"] == 3.0 and imgedit["mean_of_types"] == 2.75 and imgedit["types"]["add"] == 3.5
    # GEdit: one VIEScore CSV per group; overall per image sqrt(semantics * quality), groups averaged
    folder = scores / "gedit" / "unilip" / "gpt4o"
    folder.mkdir(parents=True)
    header = "key,edited_image,instruction,sementics_score,quality_score,intersection_exist,instruction_language\n"
    for index, group in enumerate(GROUPS):
        rows = f"k{index},x.png,do it,4,9,True,en\nk{index},y.png,do it,{index % 2},1,False,cn\n" if index else ""
        (folder / f"unilip_{group}_all_vie_score.csv").write_text(header + (rows or "k0,x.png,do it,9,4,True,en\n"))
    gedit = GEditBench("unused").collect(tmp_path)
    english = gedit["languages"]["en"]
    assert english["G_SC"] == pytest.approx((9 + 4 * 10) / 11) and english["G_PQ"] == pytest.approx((4 + 9 * 10) / 11)
    assert english["G_O"] == pytest.approx(6.0) and gedit["overall"] == pytest.approx(6.0)  # sqrt(36) everywhere
    assert english["intersection"]["G_O"] == pytest.approx(6.0)  # every English row has Intersection_exist
    # calculate_statistics.py averages over all 11 groups: group 0 has no Chinese row, so its mean is NaN there
    chinese = gedit["languages"]["cn"]
    assert chinese["G_O"] is None and len(chinese["groups"]) == 10 and chinese["intersection"]["G_O"] is None
    assert [chinese["groups"][g]["overall"] for g in GROUPS[1:]] == [float(i % 2) for i in range(1, 11)]


# ------------------------------------------------------------------ refusals
def test_mistakes_are_one_line_and_leave_nothing(generator_dir, tmp_path):
    out = tmp_path / "out"
    cases = [
        (["nosuch", f"generator={generator_dir}", f"out={out}", "prompts=x"], r"no benchmark 'nosuch'"),
        (["geneval", f"generator={generator_dir}", f"out={out}"], r"prompts= is required"),
        (["geneval", f"generator={generator_dir}", f"out={out}", f"prompts={tmp_path / 'no.jsonl'}"], "does not exist"),
        (["geneval", f"generator={tmp_path}", f"out={out}", f"prompts={data.geneval_prompts(tmp_path)}"],
         "not a saved generator"),
        (["wise", f"generator={generator_dir}", f"out={out}", f"prompts={tmp_path}"], "lacks cultural_common_sense"),
        (["geneval", f"generator={generator_dir}", f"out={out}", "prompts=x", "sampler.scheduler=ddim"], "scheduler"),
        (["geneval", "generator=g", f"out={out}", "prompts=x", "sampler.stepz=3"], "stepz"),
    ]  # fmt: skip
    for argv, message in cases:
        with pytest.raises(SystemExit, match=rf"^error: .*{message}"):
            main(argv)
    assert not out.exists()


def test_wise_score_lines_calculate_py_skips_are_skipped_and_reading_goes_on(tmp_path):
    """The judge's JSONL as WISE's Calculate.py reads it: blank lines, lines that are not JSON and records without
    an integer prompt_id are skipped, each followed here by a line that still counts; a record whose values are
    not all numbers is present without a score."""
    from unilip.benchmarks.wise import _read_scores

    def record(prompt_id, *values, **extra):
        names = ("consistency", "realism", "aesthetic_quality")[: len(values)]
        return json.dumps({"prompt_id": prompt_id, **dict(zip(names, values, strict=True)), **extra})

    path = tmp_path / "scores.jsonl"
    lines = ["", record(1, 2, 1.5, 2), "  ", "not json {", record(2, 1, 1, "n/a"), record("3", 2, 2, 2),
             record(4, 0, 0, 1, explanation="café, naïve"), record(5, 1, 2)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert _read_scores(path) == {1: (2.0, 1.5, 2.0), 2: None, 4: (0.0, 0.0, 1.0), 5: None}
    assert _read_scores(tmp_path / "absent.jsonl") == {}


def test_geneval_prompt_file_mistakes_name_the_file_the_line_and_what_to_give(tmp_path):
    """Each is the whole error line, before the generator is even read (generator=g does not exist)."""
    out = tmp_path / "out"
    base = ["geneval", "generator=g", f"out={out}"]
    good = json.dumps({"tag": "single_object", "prompt": "a photo of a cat"})
    not_json, no_prompt = tmp_path / "not_json.jsonl", tmp_path / "no_prompt.jsonl"
    not_json.write_text(f"{good}\n{good}\n{{oops\n")
    no_prompt.write_text(f"{good}\n" + json.dumps(["a photo of a cat"]) + "\n")
    absent = tmp_path / "absent.jsonl"
    cases = [
        (f"prompts={absent}", f"prompts={absent} does not exist; give GenEval's prompts/evaluation_metadata.jsonl"),
        (f"prompts={not_json}", f"{not_json}:3: not a JSON line (Expecting property name enclosed in double quotes)"),
        (f"prompts={no_prompt}", f'{no_prompt}:2: no "prompt"; is this evaluation_metadata.jsonl?'),
    ]
    for argument, message in cases:
        with pytest.raises(SystemExit) as refused:
            main([*base, argument])
        assert refused.value.code == f"error: {message}"
    no_prompt.write_text(json.dumps({"tag": "single_object", "text": "a photo of a cat"}) + "\n")
    with pytest.raises(SystemExit) as refused:
        main([*base, f"prompts={no_prompt}"])
    assert refused.value.code == f'error: {no_prompt}:1: no "prompt"; is this evaluation_metadata.jsonl?'
    assert not out.exists()


def test_wise_categories_are_calculate_pys_id_ranges():
    """WISE_legacy/Calculate.py: ids 1-400 Cultural, 401-567 Time, 568-700 Space, 701-800 Biology, 801-900
    Physics, 901-1000 Chemistry; an id outside them has no category."""
    from unilip.benchmarks.wise import _category

    ranges = {"Cultural": (1, 400), "Time": (401, 567), "Space": (568, 700), "Biology": (701, 800),
              "Physics": (801, 900), "Chemistry": (901, 1000)}  # fmt: skip
    for category, (first, last) in ranges.items():
        assert _category(first) == _category(last) == category
    assert _category(0) is None and _category(-3) is None and _category(1001) is None


def test_wise_scores_count_only_numeric_rows_of_known_ids_and_overall_needs_every_category(tmp_path):
    """Calculate.py: an id whose values are not all numbers is present (not missing) but unscored, an id outside
    the six ranges is ignored; with a category left without a score there is no overall."""
    from unilip.benchmarks.wise import FILES, WISE, scores_file

    def line(prompt_id, consistency, realism=2, aesthetic=2):
        return json.dumps({"prompt_id": prompt_id, "consistency": consistency, "realism": realism,
                           "aesthetic_quality": aesthetic}) + "\n"  # fmt: skip

    out = tmp_path / "out"
    rows = {
        "cultural_common_sense": line(1, 2) + line(1001, 2),  # 1001: no category
        "spatio-temporal_reasoning": line(401, 1) + line(568, "n/a"),  # Space: present, unscored
        "natural_science": line(701, 0) + line(801, 2) + line(901, 2, 0, 0),
    }
    for name in FILES:
        scores_file(out, name).parent.mkdir(parents=True, exist_ok=True)
        scores_file(out, name).write_text(rows[name])
    scores = WISE(str(data.wise_prompts(tmp_path))).collect(out)
    # WiScore (0.7 c + 0.2 r + 0.1 a) / 2 by hand
    assert scores["categories"] == pytest.approx(
        {"Cultural": 1.0, "Time": 0.65, "Space": None, "Biology": 0.3, "Physics": 1.0, "Chemistry": 0.7}
    )
    assert {key: value for key, value in scores.items() if key != "categories"} == {
        "overall": None,
        "images": 5,
        "missing_prompt_ids": 0,
        "rule": "WiScore = (0.7 consistency + 0.2 realism + 0.1 aesthetic) / 2; overall = 0.4 Cultural + 0.167 Time "
        "+ 0.133 Space + 0.1 (Biology + Physics + Chemistry), only when every prompt id has a score "
        "(WISE_legacy/Calculate.py --category all)",
    }


def test_wise_jobs_are_one_per_prompt_id_with_consecutive_seeds_and_bad_items_are_refused_whole(tmp_path):
    from unilip.benchmarks.dpg import DPGBench
    from unilip.benchmarks.wise import WISE
    from unilip.pipelines.manifest import SamplingError

    folder = data.wise_prompts(tmp_path)
    jobs = WISE(str(folder)).jobs(tmp_path / "out", seed=10)
    assert [job.key for job in jobs] == ["1", "401", "568", "701", "801", "901"]  # the reference's file order
    assert [job.seed for job in jobs] == list(range(10, 16))
    assert [job.outputs for job in jobs] == [(f"images/{key}.png",) for key in ("1", "401", "568", "701", "801", "901")]
    assert jobs[0].prompt == "Traditional food of the Mid-Autumn Festival"
    file = folder / "natural_science.json"
    items = json.loads(file.read_text())
    for bad in ({"prompt_id": 999}, {"Prompt": "a cat"}, ["prompt_id", "Prompt"]):
        file.write_text(json.dumps([*items, bad]))
        with pytest.raises(SamplingError) as refused:
            WISE(str(folder)).jobs(tmp_path / "out", seed=0)
        assert str(refused.value) == f'{folder}/natural_science.json: every item needs "prompt_id" and "Prompt"'
    file.write_text(json.dumps([*items, {**items[0], "Prompt": "again"}]))
    with pytest.raises(SamplingError) as refused:
        WISE(str(folder)).jobs(tmp_path / "out", seed=0)
    assert str(refused.value) == f"{folder}/natural_science.json: prompt_id 701 appears twice"
    file.unlink()
    (folder / "cultural_common_sense.json").unlink()
    hint = "WISE's WISE_legacy/data folder (cultural_common_sense.json, ...; there since upstream commit d6bfe42)"
    with pytest.raises(SamplingError) as refused:
        WISE(str(folder)).jobs(tmp_path / "out", seed=0)
    assert str(refused.value) == f"prompts={folder} lacks cultural_common_sense.json, natural_science.json; give {hint}"
    with pytest.raises(FileNotFoundError) as refused:
        DPGBench(str(tmp_path / "absent")).jobs(tmp_path / "out", seed=0)
    hint = "DPG-Bench's dpg_bench/prompts folder of <item_id>.txt files"
    assert str(refused.value) == f"prompts={tmp_path / 'absent'} does not exist; give {hint}"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SamplingError) as refused:
        DPGBench(str(tmp_path / "empty")).jobs(tmp_path / "out", seed=0)
    assert str(refused.value) == (
        f"prompts={tmp_path / 'empty'} holds no .txt prompt files; give ELLA's dpg_bench/prompts folder"
    )


def test_gedit_jobs_of_one_language_keep_every_row_of_it(tmp_path):
    """benchmark.language=en or cn: that language's rows, wherever they lie in the dataset (the Chinese row
    comes after the English ones), with consecutive seeds."""
    from unilip.benchmarks.gedit import GEditBench

    dataset_dir = data.gedit_dataset(tmp_path)
    english = GEditBench(str(dataset_dir), language="en").jobs(tmp_path / "out", seed=5)
    assert [job.key for job in english] == ["background_change/en/a1b2", "color_alter/en/c3d4"]
    assert [job.seed for job in english] == [5, 6]
    chinese = GEditBench(str(dataset_dir), language="cn").jobs(tmp_path / "out", seed=5)
    assert [(job.key, job.prompt, job.seed) for job in chinese] == [("color_alter/cn/c3d4", "把猫变成蓝色", 5)]
    assert chinese[0].outputs == ("images/unilip/fullset/color_alter/cn/c3d4.png",)
    assert (
        chinese[0].source == str(tmp_path / "out" / "sources" / "gedit" / "color_alter/cn/c3d4.png")
        and chinese[0].keep_aspect
    )
    square = GEditBench(str(dataset_dir), language="cn", aspect="square").jobs(tmp_path / "out", seed=5)
    assert not square[0].keep_aspect  # aspect=square: the benchmark's size, not the source's aspect
    everything = GEditBench(str(dataset_dir)).jobs(tmp_path / "out", seed=0)
    assert [job.key for job in everything] == [
        "background_change/en/a1b2", "color_alter/en/c3d4", "color_alter/cn/c3d4"
    ]  # fmt: skip


def test_geneval_and_dpg_jobs_are_keyed_seeded_and_laid_out_per_prompt(tmp_path):
    """GenEval: prompt N is folder N (5 digits), 4 samples, seed + N, its metadata line beside it. DPG-Bench: one
    2 x 2 grid per prompt file named by its stem, seed + its index in sorted order; an empty file is refused."""
    from unilip.benchmarks.dpg import DPGBench
    from unilip.benchmarks.geneval import GenEval
    from unilip.pipelines.manifest import SamplingError

    prompts = data.geneval_prompts(tmp_path)
    lines = prompts.read_text().splitlines()
    jobs = GenEval(str(prompts)).jobs(tmp_path / "out", seed=7)
    assert [(job.key, job.seed, job.samples, job.grid) for job in jobs] == [
        (f"{index:05d}", 7 + index, 4, False) for index in range(len(lines))
    ]
    assert jobs[1].outputs == tuple(f"images/00001/samples/{k:04d}.png" for k in range(4))
    assert jobs[1].extra_files == (("images/00001/metadata.jsonl", lines[1].strip() + "\n"),)
    folder = data.dpg_prompts(tmp_path)
    stems = sorted(p.stem for p in folder.glob("*.txt"))
    jobs = DPGBench(str(folder)).jobs(tmp_path / "out", seed=3)
    assert [(job.key, job.seed, job.outputs, job.samples, job.grid) for job in jobs] == [
        (stem, 3 + index, (f"images/{stem}.png",), 4, True) for index, stem in enumerate(stems)
    ]
    (folder / "zzz.txt").write_text(" \n")
    with pytest.raises(SamplingError) as refused:
        DPGBench(str(folder)).jobs(tmp_path / "out", seed=3)
    assert str(refused.value) == f"{folder / 'zzz.txt'} is empty"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SamplingError) as refused:
        GenEval(str(empty)).jobs(tmp_path / "out", seed=0)
    assert str(refused.value) == f"{empty} holds no prompts"


def test_dpg_scores_count_the_grids_the_scorer_left_out(tmp_path):
    from unilip.benchmarks.dpg import DPGBench

    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b", "c"):
        (images / f"{name}.png").write_bytes(b"")
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "dpg_results.txt").write_text(
        f"{images}/a.png, 1.0\n{images}/b.png, 0.5\nL1 category scores:\n\tentity: 75.0\nDPG-Bench score: 75.0\n"
    )
    assert DPGBench("unused").collect(tmp_path) == {
        "overall": 75.0, "categories": {"entity": 75.0}, "images": 2, "unscored": 1, "unit": "percent"
    }  # fmt: skip


def test_imgedit_jobs_are_one_edit_per_key_of_its_source_and_each_mistake_is_named(tmp_path):
    """Key K edits `<images>/<id>` with seed + its position into images/K.png, at the source's aspect unless
    aspect=square; without `images` the originals lie beside the prompts file (the download's singleturn/)."""
    from unilip.benchmarks.imgedit import ImgEdit
    from unilip.pipelines.manifest import SamplingError

    edits, originals = data.imgedit_prompts(tmp_path)
    root = originals.resolve()
    jobs = ImgEdit(str(edits), images=str(originals)).jobs(tmp_path / "out", seed=5)
    assert [(job.key, job.prompt, job.seed, job.outputs, job.source, job.keep_aspect) for job in jobs] == [
        (key, item["prompt"], 5 + index, (f"images/{key}.png",), str(root / item["id"]), True)
        for index, (key, item) in enumerate(data.IMGEDIT_EDITS.items())
    ]
    square = ImgEdit(str(edits), images=str(originals), aspect="square").jobs(tmp_path / "out", seed=5)
    assert [job.keep_aspect for job in square] == [False] * len(jobs)
    beside = originals / "singleturn.json"
    beside.write_text(edits.read_text())
    assert [job.source for job in ImgEdit(str(beside)).jobs(tmp_path / "out", seed=5)] == [job.source for job in jobs]
    # an entry with exactly "id" and "prompt" is enough (edit_type is only the judge's grouping)
    minimal = tmp_path / "minimal.json"
    minimal.write_text(json.dumps({"7": {"id": "animal/000342021.jpg", "prompt": "Make it red."}}))
    assert [job.key for job in ImgEdit(str(minimal), images=str(originals)).jobs(tmp_path, seed=0)] == ["7"]

    def refusal(prompts, images=str(originals), error=SamplingError):
        with pytest.raises(error) as refused:
            ImgEdit(prompts, images=images).jobs(tmp_path / "out", seed=0)
        return str(refused.value)

    hint = "ImgEdit's basic_edit.json (or singleturn.json)"
    assert refusal(None) == f"prompts is required: {hint}"
    missing = tmp_path / "missing.json"
    assert refusal(str(missing), error=FileNotFoundError) == f"prompts={missing} does not exist; give {hint}"
    nowhere = tmp_path / "nowhere"
    assert refusal(str(edits), str(nowhere), FileNotFoundError) == (
        f"images={nowhere} does not exist; give the folder of ImgEdit's original images"
    )
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    assert refusal(str(bad)) == f"prompts={bad} is not JSON (Expecting value: line 1 column 1 (char 0))"
    for content in ([], {}):
        bad.write_text(json.dumps(content))
        assert refusal(str(bad)) == f"prompts={bad} is not a {{key: {{id, prompt, edit_type}}}} object"
    for entry in ({"id": "animal/000342021.jpg"}, "Make it red."):
        bad.write_text(json.dumps({"1": entry}))
        assert refusal(str(bad)) == f'{bad}: entry 1 needs "id" and "prompt"'
    assert refusal(str(edits), str(tmp_path)) == (
        f"none of the source images is under images={tmp_path}; give the originals' root folder"
    )


def test_imgedit_scores_need_both_step_outputs_and_say_how_they_were_made(tmp_path):
    from unilip.benchmarks.imgedit import ImgEdit

    scores = tmp_path / "scores"
    scores.mkdir()
    (scores / "imgedit_average_score.json").write_text(json.dumps({"1": 4.0, "2": 3.0}))
    assert ImgEdit("unused").collect(tmp_path) is None  # step2 has not run (or failed)
    (scores / "imgedit_typescore.json").write_text(json.dumps({"add": 3.5}))
    assert ImgEdit("unused").collect(tmp_path) == {
        "overall": 3.5,
        "mean_of_types": 3.5,
        "types": {"add": 3.5},
        "images": 2,
        "rule": "per image: mean of the judge's three 1-5 scores (step1_get_avgscore.py); overall: mean over images; "
        "types: step2_typescore.py",
    }
    (scores / "imgedit_average_score.json").unlink()
    assert ImgEdit("unused").collect(tmp_path) is None


def test_gedit_refuses_a_repeated_row_and_a_language_without_rows_and_extracts_into_existing_folders(
    tmp_path, monkeypatch
):
    from unilip.benchmarks.gedit import GROUPS, GEditBench
    from unilip.pipelines.manifest import SamplingError

    english = [row for row in data.GEDIT_ROWS if row[3] == "en"]
    monkeypatch.setattr(data, "GEDIT_ROWS", [*english, english[0]])
    repeated = data.gedit_dataset(tmp_path / "repeated")
    with pytest.raises(SamplingError) as refused:
        GEditBench(str(repeated)).jobs(tmp_path / "out", seed=0)
    assert str(refused.value) == "prompts: background_change/en/a1b2 appears twice in the dataset"
    monkeypatch.setattr(data, "GEDIT_ROWS", english)
    only_english = data.gedit_dataset(tmp_path / "english")
    with pytest.raises(SamplingError) as refused:
        GEditBench(str(only_english), language="cn").jobs(tmp_path / "out", seed=0)
    assert str(refused.value) == f"prompts={only_english} has no rows in language 'cn'"

    # a run killed while extracting leaves folders without their images: the next one fills them
    bench = GEditBench(str(only_english))
    jobs = bench.jobs(tmp_path / "out", seed=0)
    for job in jobs:
        Path(job.source).parent.mkdir(parents=True)
    bench.prepare(tmp_path / "out", jobs)
    assert all(Image.open(job.source).mode == "RGB" for job in jobs)

    scores = tmp_path / "out" / "scores" / "gedit" / "unilip" / "gpt4o"
    scores.mkdir(parents=True)
    for group in GROUPS:
        (scores / f"unilip_{group}_all_vie_score.csv").write_text(
            "key,sementics_score,quality_score,intersection_exist,instruction_language\nk,4,9,True,en\n"
        )
    assert GEditBench("unused").collect(tmp_path / "out")["rule"] == (
        "per image overall = sqrt(semantics x quality); per group means; G_* = mean over the 11 groups, none while "
        "a group has no row (calculate_statistics.py); overall = English G_O"
    )


def test_the_summary_is_the_sampler_the_judge_and_every_score_or_the_commands_still_to_run():
    from unilip.benchmarks.scoring import summary_markdown

    results = {
        "benchmark": "geneval",
        "sampler": {
            "steps": 20,
            "guidance_scale": 4.5,
            "scheduler": "flow-dpm",
            "size": 448,
            "seed": 0,
            "dtype": "bf16",
        },
        "judge": {"name": "Mask2Former", "scorer": None, "scorer_commit": None, "pinned": None},
        "scores": None,
        "score_commands": ["cd geneval", "python evaluate.py"],
        "notes": [],
    }
    head = "# geneval\n\nSampler: 20 steps, CFG 4.5, flow-dpm, 448 px, seed 0 + prompt index, bf16.\n"
    assert summary_markdown(results) == (
        head + "Judge: Mask2Former\n\nNot scored yet. Run:\n\n```bash\ncd geneval\npython evaluate.py\n```\n"
    )
    pinned = {"repository": "djghosh13/geneval", "commit": "abc", "clone": "git clone x"}
    results.update(
        judge={"name": "Mask2Former", "scorer": "/s/geneval", "scorer_commit": "def", "pinned": pinned},
        scores={"overall": 0.5, "rule": "mean of tasks", "tasks": {"counting": 0.25, "colors": None}, "images": 8},
        notes=["2 images unscored", "seeds differ from the paper's"],
    )
    assert summary_markdown(results) == head + (
        "Judge: Mask2Former (scorer /s/geneval at def)\n"
        "Official scorer: djghosh13/geneval at abc (`git clone x`).\n"
        "\n"
        "| score | value |\n|---|---|\n"
        "| overall | 0.5000 |\n| tasks / counting | 0.2500 |\n| tasks / colors | n/a |\n| images | 8 |\n"
        "\n"
        "- 2 images unscored\n- seeds differ from the paper's\n"
    )
