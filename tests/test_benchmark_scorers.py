"""The official scorers at their pinned commits: a checkout that is not one is refused before anything is
generated; the commands match the pinned scripts (WISE's WISE_legacy/ layout, GEdit's run_gedit_score.py) and
run as printed; a WISE overall needs every prompt judged (Calculate.py --category all); a failing step fails
the command. The stand-ins define the pinned scripts' own argparse options and read files as those scripts do."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests import sampling_helpers as data
from tests.generation_helpers import one_thread  # noqa: F401  (autouse fixture)
from tests.sampling_helpers import fake_scorer
from unilip.benchmarks.__main__ import main

FAST = ["sampler.size=56", "sampler.steps=2", "batch_size=4", f"scorer_python={sys.executable}"]


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory, tiny_config):
    return data.save_tiny_generator(tmp_path_factory.mktemp("tiny"), tiny_config)


def run(name, generator_dir, out, *overrides):
    return main([name, f"generator={generator_dir}", f"out={out}", *FAST, *overrides])


def arguments(*names):
    """A script defining exactly these argparse options (as the pinned script does), then `args`."""
    header = "import argparse, csv, glob, json, os, sys\nparser = argparse.ArgumentParser()\n"
    return header + "".join(f"parser.add_argument({name!r})\n" for name in names) + "args = parser.parse_args()\n"


WISE_ARGS = ("--json_path", "--image_dir", "--output_dir", "--api_key", "--model", "--result_full", "--result_scores")
WISE_ARGS += ("--api_base", "--max_workers")  # WISE_legacy/gpt_eval.py at eb51174
GEDIT_ARGS = ("--model_name", "--edited_images_dir", "--instruction_language", "--task_type", "--save_dir")
GEDIT_ARGS += ("--backbone",)  # GEdit-Bench/run_gedit_score.py at 95feaea
GEDIT_FILES = {"GEdit-Bench/calculate_statistics.py": "", "GEdit-Bench/viescore/__init__.py": ""}
DPG_ARGS = ("--image-root-path", "--resolution", "--csv", "--res-path", "--pic-num", "--vqa-model")


# ------------------------------------------------------------------ refusals before anything is generated
@pytest.mark.parametrize(
    "name, files, message",
    [
        # WISE before d6bfe42: gpt_eval.py and data/ at the top
        ("wise", {"gpt_eval.py": arguments(*WISE_ARGS), "Calculate.py": ""},
         r"it has no WISE_legacy/gpt_eval.py; get the pinned scorer with: git clone https://github.com/PKU-YuanGroup/"
         r"WISE && git -C WISE checkout eb51174483a5de2e34e8614cf9dfb3319ee7fcd0$"),
        # Step1X-Edit 570eba6: test_gedit_score.py --model_name/--save_path/--backbone
        ("gedit", {"GEdit-Bench/test_gedit_score.py": arguments("--model_name", "--save_path", "--backbone"),
                   **GEDIT_FILES},
         r"it has no GEdit-Bench/run_gedit_score.py; .*git -C Step1X-Edit checkout 95feaea4c43b6dc69e9a2766dabd169"),
        ("gedit", {"GEdit-Bench/run_gedit_score.py": arguments("--model_name", "--save_path", "--backbone"),
                   **GEDIT_FILES},
         r"run_gedit_score.py takes no --edited_images_dir, --instruction_language, --save_dir .*checkout 95feaea"),
        ("dpg", {"dpg_bench/compute_dpg_bench.py": arguments("--image-root-path", "--resolution", "--out"),
                 "dpg_bench/dpg_bench.csv": ""},
         r"compute_dpg_bench.py takes no --pic-num, --vqa-model, --res-path .*ELLA checkout 3c228f1dc6c4d3cad0a474"),
    ],
)  # fmt: skip
def test_a_checkout_that_is_not_the_pinned_scorer_is_refused_before_anything_is_made(
    generator_dir, tmp_path, name, files, message
):
    prompts = {"wise": data.wise_prompts, "gedit": data.gedit_dataset, "dpg": data.dpg_prompts}[name](tmp_path)
    fake_scorer(tmp_path / "scorer", files)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=rf"^error: scorer=.* is not .*{message}"):
        run(name, generator_dir, out, f"prompts={prompts}", f"scorer={tmp_path / 'scorer'}")
    assert not out.exists()


def test_a_scorer_that_is_not_there_and_wise_prompts_where_they_were_before_d6bfe42_are_refused(
    generator_dir, tmp_path
):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"^error: scorer=.*nowhere is not a folder; give a checkout of djghosh13"):
        run("geneval", generator_dir, out, f"prompts={data.geneval_prompts(tmp_path)}", f"scorer={tmp_path}/nowhere")
    assert not out.exists()
    with pytest.raises(SystemExit, match=r"^error: prompts=.*/WISE/data does not exist; give WISE's WISE_legacy/data"):
        run("wise", generator_dir, tmp_path / "out", f"prompts={tmp_path}/WISE/data")


# ------------------------------------------------------------------ WISE: every prompt judged, or no overall
# WISE_legacy/gpt_eval.py: a prompt whose answer cannot be parsed is left out of the scores; a rerun judges
# only the prompts without a score. Here the judge fails on prompt 802 until the file `judge_ok` exists.
WISE_STANDIN = (
    arguments(*WISE_ARGS)
    + """
judged = {1: (2, 2, 2), 401: (1, 1, 1), 568: (2, 0, 0), 701: (0, 2, 0), 801: (0, 0, 2), 802: (2, 2, 2), 901: (1, 0, 0)}
path = os.path.join(args.output_dir, args.result_scores)  # as save_results joins them
rows = {r["prompt_id"]: r for r in map(json.loads, open(path))} if os.path.exists(path) else {}
for item in json.load(open(args.json_path)):
    pid = item["prompt_id"]
    if pid in rows or not os.path.exists(os.path.join(args.image_dir, f"{pid}.png")):
        continue
    if pid == 802 and not os.path.exists("judge_ok"):
        print(f"[WARN] {pid}: score parse incomplete")
        continue
    c, r, a = judged[pid]
    rows[pid] = {"prompt_id": pid, "Subcategory": item["Subcategory"], "consistency": c, "realism": r,
                 "aesthetic_quality": a}
os.makedirs(args.output_dir, exist_ok=True)
with open(path, "w") as fp:
    fp.writelines(json.dumps(rows[k]) + "\\n" for k in sorted(rows))
"""
)


def test_wise_reports_no_overall_while_a_prompt_is_unjudged_and_the_command_fails(generator_dir, tmp_path, monkeypatch):
    checkout = tmp_path / "WISE"
    fake_scorer(checkout, {"WISE_legacy/gpt_eval.py": WISE_STANDIN, "WISE_legacy/Calculate.py": ""})
    prompts = data.wise_prompts(checkout / "WISE_legacy")  # WISE_legacy/data, as upstream since d6bfe42
    science = json.loads((prompts / "natural_science.json").read_text())
    science.append({**science[1], "prompt_id": 802, "Prompt": "A prism splitting light"})  # a second Physics prompt
    (prompts / "natural_science.json").write_text(json.dumps(science))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    out, scorer = tmp_path / "out", [f"prompts={prompts}", f"scorer={checkout}"]
    with pytest.raises(SystemExit) as failed:
        run("wise", generator_dir, out, *scorer)
    assert str(failed.value) == (
        "error: scorer step 3 of 3 (gpt_eval.py natural_science) failed: the judge gave no score for 1 of 4 prompts "
        "(ids 802); run the same command again to judge them (gpt_eval.py keeps the scores it has); its log: "
        f"{out}/scores/logs/step2.log"
    )
    assert "802: score parse incomplete" in (out / "scores" / "logs" / "step2.log").read_text()
    results = json.loads((out / "results.json").read_text())
    # Calculate.py --category all refuses an overall with prompt ids missing; the categories stand (801 alone)
    assert results["scores"]["overall"] is None and results["scores"]["missing_prompt_ids"] == 1
    assert results["scores"]["categories"]["Physics"] == pytest.approx(0.1)
    (checkout / "WISE_legacy" / "judge_ok").touch()  # the judge answers again: only natural_science runs again
    before = (out / "scores" / "wise" / "cultural_common_sense_scores_results.jsonl").stat().st_mtime_ns
    results = run("wise", generator_dir, out, *scorer)
    assert (out / "scores" / "wise" / "cultural_common_sense_scores_results.jsonl").stat().st_mtime_ns == before
    # WiScore by hand: Cultural 1.0, Time 0.5, Space 0.7, Biology 0.2, Physics (0.1 + 1.0) / 2, Chemistry 0.35
    expected = 0.4 * 1.0 + 0.167 * 0.5 + 0.133 * 0.7 + 0.1 * (0.2 + 0.55 + 0.35)
    assert results["scores"]["overall"] == pytest.approx(expected) and results["scores"]["missing_prompt_ids"] == 0


# ------------------------------------------------------------------ GEdit: run_gedit_score.py as EVAL.md names it
# GEdit-Bench/run_gedit_score.py: the key from the first line of secret.env (GPT4v exits 1 without one); the
# dataset rows by task_type; the edit is the first file named `key.*` in
# edited_images_dir/model_name/fullset/task_type/language; one CSV per group in save_dir/model_name/backbone.
GEDIT_STANDIN = (
    arguments(*GEDIT_ARGS)
    + """
import datasets
from PIL import Image
if not open("secret.env").readline().strip():
    print("API key not found.")
    sys.exit(1)
GROUPS = ["background_change", "color_alter", "material_alter", "motion_change", "ps_human", "style_change",
          "subject-add", "subject-remove", "subject-replace", "text_change", "tone_transfer"]
table = datasets.Dataset.from_parquet(glob.glob(os.environ["GEDIT_DATASET"] + "/**/*.parquet", recursive=True))
for group in GROUPS:
    rows = []
    for item in table:
        if item["task_type"] != group or args.instruction_language not in ("all", item["instruction_language"]):
            continue
        folder = os.path.join(args.edited_images_dir, args.model_name, "fullset", group, item["instruction_language"])
        found = [os.path.basename(f) for f in glob.glob(os.path.join(folder, f"{item['key']}.*"))]
        edited = Image.open(os.path.join(folder, found[0]))
        source = item["input_image_raw"]
        # the judge's stand-in: semantics 9 for English, 4 for Chinese; quality 4
        language = item["instruction_language"]
        rows.append({"key": item["key"], "edited_image": edited.filename, "instruction": item["instruction"],
                     "sementics_score": 9 if language == "en" else 4, "quality_score": 4,
                     "intersection_exist": item["Intersection_exist"], "instruction_language": language})
    path = os.path.join(args.save_dir, args.model_name, args.backbone,
                        f"{args.model_name}_{group}_{args.instruction_language}_vie_score.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["key", "edited_image", "instruction", "sementics_score",
                                               "quality_score", "intersection_exist", "instruction_language"])
        writer.writeheader()
        writer.writerows(rows)
"""
)


def test_gedit_runs_run_gedit_score_with_its_key_file(generator_dir, tmp_path, monkeypatch):
    dataset = data.gedit_dataset(tmp_path)
    checkout = tmp_path / "Step1X-Edit"
    fake_scorer(
        checkout, {"GEdit-Bench/run_gedit_score.py": GEDIT_STANDIN, "GEdit-Bench/secret.env": "", **GEDIT_FILES}
    )
    monkeypatch.setenv("GEDIT_DATASET", str(dataset))  # the stand-in's load_dataset("stepfun-ai/GEdit-Bench")
    out, scorer = tmp_path / "out", [f"prompts={dataset}", f"scorer={checkout}"]
    results = run("gedit", generator_dir, out, *scorer)  # images made; no key yet: not run, and said so
    assert results["scores"] is None and len(list((out / "images").rglob("*.png"))) == len(data.GEDIT_ROWS)
    assert results["notes"] == [
        f"not run (put your API key on the first line of {checkout}/GEdit-Bench/secret.env): "
        + results["score_commands"][0]
    ]
    assert results["score_commands"][0].startswith(f"cd {checkout}/GEdit-Bench && {sys.executable} run_gedit_score.py")
    (checkout / "GEdit-Bench" / "secret.env").write_text("sk-test\n")
    results = run("gedit", generator_dir, out, *scorer)
    english, chinese = results["scores"]["languages"]["en"], results["scores"]["languages"]["cn"]
    assert english["groups"]["background_change"]["overall"] == pytest.approx(6.0)  # sqrt(9 x 4)
    assert english["groups"]["color_alter"]["overall"] == chinese["groups"]["color_alter"]["overall"] + 2  # 6, 4
    assert results["scores"]["overall"] is None  # 9 of calculate_statistics.py's 11 groups have no row here


# ------------------------------------------------------------------ printed commands work when copied
DPG_STANDIN = (
    arguments(*DPG_ARGS)
    + """
open(args.res_path, "w").close()  # compute_dpg_bench.py empties its result files first
open(args.res_path.replace(".txt", "_detail.txt"), "w").close()
names = os.listdir(args.image_root_path)
with open(args.res_path, "a") as f:
    f.writelines(os.path.join(args.image_root_path, n) + ", 1.0, 0.5, 0.5, 0.0, 0.5\\n" for n in names)
    f.write("Model: images\\nL1 category scores:\\n\\tentity: 50.0\\nDPG-Bench score: 50.0\\n")
"""
)
IMGEDIT_STANDINS = {
    "basic_bench.py": arguments("--result_img_folder", "--edit_json", "--origin_img_root", "--num_processes",
                                "--prompts_json")
    + """
edits = json.load(open(args.edit_json))
answer = "Brief reasoning: fine.\\nPrompt Compliance: 4\\nVisual Seamlessness: 3\\nPhysical & Detail Fidelity: 5"
down = os.environ.get("JUDGE_DOWN")
results = {k: {"error": "Connection error."} if down else answer for k in edits}
json.dump(results, open(os.path.join(args.result_img_folder, "result.json"), "w"))
""",
    "step1_get_avgscore.py": arguments("--result_json", "--average_score_json")
    + """
json.dump({k: 4.0 for k in json.load(open(args.result_json))}, open(args.average_score_json, "w"))
""",
    "step2_typescore.py": arguments("--average_score_json", "--basic_edit", "--typescore_json")
    + """
json.dump({"alter": 4.0}, open(args.typescore_json, "w"))
""",
    "prompts.json": "{}",
}  # fmt: skip


def test_printed_commands_run_as_printed(generator_dir, tmp_path):
    fake_scorer(tmp_path / "ELLA", {"dpg_bench/compute_dpg_bench.py": DPG_STANDIN, "dpg_bench/dpg_bench.csv": ""})
    fake_scorer(tmp_path / "ImgEdit", {f"Benchmark/Basic/{name}": s for name, s in IMGEDIT_STANDINS.items()})
    edits, originals = data.imgedit_prompts(tmp_path)
    for name, prompts, checkout in (
        ("dpg", [f"prompts={data.dpg_prompts(tmp_path)}"], "ELLA"),
        ("imgedit", [f"prompts={edits}", f"benchmark.images={originals}"], "ImgEdit"),
    ):
        results = run(name, generator_dir, tmp_path / name, *prompts)  # no scorer: the commands are printed
        assert results["scores"] is None
        for line in results["score_commands"]:
            line = line.replace(f"<{checkout} checkout>", str(tmp_path / checkout))
            done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, check=False)
            assert done.returncode == 0, (line, done.stderr)
        again = run(name, generator_dir, tmp_path / name, *prompts)  # the harness reads what they wrote
        assert again["scores"]["overall"] == {"dpg": 50.0, "imgedit": 4.0}[name]


# ------------------------------------------------------------------ a failing step fails the command
def test_a_failing_scorer_step_fails_the_command_naming_the_step_and_its_log(generator_dir, tmp_path, monkeypatch):
    failing = arguments(*DPG_ARGS) + "raise SystemExit('mPLUG could not be loaded')\n"
    fake_scorer(tmp_path / "ELLA", {"dpg_bench/compute_dpg_bench.py": failing, "dpg_bench/dpg_bench.csv": ""})
    out = tmp_path / "dpg"
    with pytest.raises(SystemExit) as failed:
        run("dpg", generator_dir, out, f"prompts={data.dpg_prompts(tmp_path)}", f"scorer={tmp_path / 'ELLA'}")
    log = out / "scores" / "logs" / "step0.log"
    assert str(failed.value) == (
        f"error: scorer step 1 of 1 (compute_dpg_bench.py) failed: it exited with status 1; its log: {log}"
    )
    assert log.read_text() == "mPLUG could not be loaded\n"
    assert json.loads((out / "results.json").read_text())["notes"] == [str(failed.value).removeprefix("error: ")]
    # ImgEdit's basic_bench.py exits 0 when every judge call failed ({"error": ...} answers): still a failure
    fake_scorer(tmp_path / "ImgEdit", {f"Benchmark/Basic/{name}": s for name, s in IMGEDIT_STANDINS.items()})
    edits, originals = data.imgedit_prompts(tmp_path)
    monkeypatch.setenv("JUDGE_DOWN", "1")
    imgedit = [f"prompts={edits}", f"benchmark.images={originals}", f"scorer={tmp_path / 'ImgEdit'}"]
    with pytest.raises(
        SystemExit,
        match=r"^error: scorer step 1 of 3 \(basic_bench.py\) failed: the judge failed on "
        r"3 of 3 edits \(first, 1082: Connection error.\); fix the call .* its log: .*step0.log$",
    ):
        run("imgedit", generator_dir, tmp_path / "imgedit", *imgedit)
    monkeypatch.delenv("JUDGE_DOWN")  # the judge is back: the step runs again (its answers were not complete)
    assert run("imgedit", generator_dir, tmp_path / "imgedit", *imgedit)["scores"]["overall"] == 4.0


def test_a_step_whose_outputs_are_cut_short_or_older_than_their_inputs_runs_again(generator_dir, tmp_path):
    fake_scorer(tmp_path / "ImgEdit", {f"Benchmark/Basic/{name}": s for name, s in IMGEDIT_STANDINS.items()})
    edits, originals = data.imgedit_prompts(tmp_path)
    out, args = (
        tmp_path / "out",
        [f"prompts={edits}", f"benchmark.images={originals}", f"scorer={tmp_path / 'ImgEdit'}"],
    )
    run("imgedit", generator_dir, out, *args)
    answers, averages = out / "images" / "result.json", out / "scores" / "imgedit_average_score.json"
    answers.write_text(answers.read_text()[:20])  # a judge run killed while writing
    os.utime(averages, ns=(0, 0))
    assert run("imgedit", generator_dir, out, *args)["scores"]["overall"] == 4.0
    assert json.loads(answers.read_text()).keys() == json.loads(edits.read_text()).keys()
    assert averages.stat().st_mtime_ns > answers.stat().st_mtime_ns > 0  # remade from the new answers


def test_the_manifest_and_results_name_the_pinned_scorer(generator_dir, tmp_path):
    out = tmp_path / "out"
    results = run("dpg", generator_dir, out, f"prompts={data.dpg_prompts(tmp_path)}")
    clone = (
        "git clone https://github.com/TencentQQGYLab/ELLA && git -C ELLA checkout "
        "3c228f1dc6c4d3cad0a47493816151a419f14db3"
    )
    assert json.loads((out / "manifest.json").read_text())["scorer"]["clone"] == clone
    assert results["judge"]["pinned"]["commit"] == "3c228f1dc6c4d3cad0a47493816151a419f14db3"
    assert f"`{clone}`" in (out / "summary.md").read_text()
    assert shlex.split(clone)[2] == "https://github.com/TencentQQGYLab/ELLA"


# ------------------------------------------------------------------ docs/results.md's recipes
# The UniLIP reference's scripts (nnnth/UniLIP 299817d, eval/*/*_1b.sh and *_2b.sh): --scale 4.5 (the default)
# everywhere but imgedit_2b.sh, which passes --scale 4.0; its ImgEdit edits are 448 x 448.
AUTHORS_CFG = {("imgedit", "$GEN_3B"): 4.0}


def test_the_results_page_recipes_compose_and_follow_the_authors_scripts():
    from unilip.benchmarks.dpg import DPGBench
    from unilip.benchmarks.gedit import GEditBench
    from unilip.benchmarks.geneval import GenEval
    from unilip.benchmarks.imgedit import ImgEdit
    from unilip.benchmarks.wise import WISE
    from unilip.models.presets import compose_config

    page = (Path(__file__).parents[1] / "docs" / "results.md").read_text()
    commands = []
    for block in page.split("```bash\n")[1:]:
        for line in block.split("```")[0].replace("\\\n", " ").splitlines():
            if "-m unilip.benchmarks " in line:
                commands.append(shlex.split(line.split("-m unilip.benchmarks ", 1)[1]))
    seen = set()
    for name, *overrides in commands:
        given = dict(o.split("=", 1) for o in overrides)
        cfg = compose_config("benchmark", [f"benchmark={name}", *overrides])  # every key exists
        assert cfg.sampler.guidance_scale == AUTHORS_CFG.get((name, given["generator"]), 4.5), (name, given)
        assert cfg.scorer and cfg.sampler.steps == 20 and cfg.sampler.size == 448
        if name == "geneval":
            assert cfg.benchmark.detector == "$DETECTORS"
        if name == "wise":
            assert given["prompts"] == "$WISE/WISE_legacy/data"
        if name == "imgedit":
            assert cfg.benchmark.aspect == "square"
        seen.add((name, given["generator"]))
    assert seen == {(n, g) for n in ("geneval", "dpg", "wise", "imgedit", "gedit") for g in ("$GEN_1B", "$GEN_3B")}
    for benchmark in (GenEval, DPGBench, WISE, ImgEdit, GEditBench):
        assert f"`{benchmark.pin.clone()}`" in page
