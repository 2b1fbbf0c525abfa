"""The main job (experiments.py): every stage at a toy size, and tables that agree with results.json."""
import json
import math
import statistics
import types
from pathlib import Path

import pytest

import experiments
from dataset.labels import CLASS_NAMES, SHORT_NAMES
from model import build_bisenet, build_discriminator
import trainUnsupervised
from reporting.pipeline import (BASELINE, DEFAULT_METHODS, METHODS, SELF_TRAINING_METHODS, STAGE_ARGS, STAGE_BY_KEY,
                                STAGE_KEYS, Settings, Stage, run_stage, selected_stage_keys, start_iteration,
                                total_iterations)
from reporting.report import paired_deltas_markdown, table1_markdown
from reporting.scoring import best_report_row, paired_references, paired_summary

REPO = Path(__file__).resolve().parents[1]
COMMITTED_RESULTS = (REPO / "results" / "synthetic",)


def _table_rows(path):
    """{first cell: {column: cell}} of a markdown table."""
    lines = [line for line in Path(path).read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def _assert_cell(cell, values, what):
    """A cell shows the mean (± the sample std with several seeds) of ``values`` in percent, to 0.1."""
    values = [100 * value for value in values if value is not None]
    if not values:
        assert cell == "n/a", what
        return
    numbers = [float(part) for part in cell.replace("±", " ").split()]
    expected = [statistics.fmean(values)] + ([statistics.stdev(values)] if len(values) > 1 else [])
    if len(numbers) == 2 and len(expected) == 1:
        expected.append(0.0)  # a class seen in one seed only, in a multi-seed table
    assert numbers == pytest.approx(expected, abs=0.051), f"{what}: {cell!r}, expected {expected}"


def assert_tables_agree_with_results(folder):
    """table1.md and table2.md against results.json: every number of the table from the per-seed
    scores, no NaN, every score a fraction in [0, 1], each mIoU the mean of its class IoUs."""
    results = json.loads((folder / "results.json").read_text())
    methods, seeds = results["methods"], results["seeds"]
    rows = _table_rows(folder / "table1.md")
    stages = {label: stage for label, stage, _ in METHODS}
    assert list(rows) == list(methods) and set(methods) <= set(stages)
    settings = Settings(**results["settings"])
    baseline = [seed["miou"] for seed in methods[BASELINE]["per_seed"]]
    for label, stage in ((label, stages[label]) for label in methods):
        per_seed, row = methods[label]["per_seed"], rows[label]
        assert len(per_seed) == len(seeds), label
        for scores in per_seed:
            assert list(scores["iou"]) == list(CLASS_NAMES), label
            present = [value for value in scores["iou"].values() if value is not None]
            assert all(0.0 <= value <= 1.0 for value in present), label
            assert 0.0 <= scores["pixel_accuracy"] <= 1.0 and math.isfinite(scores["miou"]), label
            assert scores["miou"] == pytest.approx(statistics.fmean(present), abs=1e-9), label  # mIoU's definition
        mious = [scores["miou"] for scores in per_seed]
        assert methods[label]["miou_mean"] == pytest.approx(statistics.fmean(mious))
        assert methods[label]["miou_std"] == pytest.approx(statistics.stdev(mious) if len(mious) > 1 else 0.0)
        for index, short in enumerate(SHORT_NAMES):
            _assert_cell(row[short], [scores["iou"][CLASS_NAMES[index]] for scores in per_seed], f"{label} {short}")
        _assert_cell(row["mIoU"], mious, f"{label} mIoU")
        _assert_cell(row["acc"], [scores["pixel_accuracy"] for scores in per_seed], f"{label} acc")
        delta = row[f"ΔmIoU vs {BASELINE}"]
        if label == BASELINE:
            assert delta == "—"
        else:  # paired by seed
            _assert_cell(delta.lstrip("+"), [a - b for a, b in zip(mious, baseline)], f"{label} delta")
        assert row["iterations"] == str(total_iterations(settings, stage)), label
    assert results["domain_gap"]["source_only_target_val_miou"] == baseline
    if (folder / "deltas.md").is_file():
        _assert_deltas_agree(_table_rows(folder / "deltas.md"), methods)
    assert all(0.0 < value <= 1.0 for value in results["domain_gap"]["source_only_source_val_miou"])

    # Table II: the parameter counts of the networks built here (thop's count of the same modules).
    complexity = _table_rows(folder / "table2.md")
    networks = {"bisenet-r18": build_bisenet("resnet18", 19), "bisenet-r101": build_bisenet("resnet101", 19),
                "fcd": build_discriminator("fcd", 19), "dsc": build_discriminator("dsc", 19)}
    assert set(complexity) == set(networks)
    for name, network in networks.items():
        assert int(complexity[name]["parameters"].replace(",", "")) == sum(p.numel() for p in network.parameters())
        assert 0.0 < float(complexity[name]["GFLOPs"]) < 1000.0, name


def _assert_deltas_agree(table, methods):
    """deltas.md against the per-seed mIoUs: each cell is (row − reference) of the same seed."""
    assert list(table) == list(methods)
    references = {title: title.removeprefix("Δ vs ") for title in next(iter(table.values())) if title != "method"}
    best = [title for title in references if title.startswith("Δ vs best report row (")]
    for title in best:
        references[title] = title.removeprefix("Δ vs best report row (")[:-1]
        report_rows = [label for label in methods if label in ("FCD", "DSC", "DSC + PL") or label.startswith("DSC + MPL")]
        assert references[title] == max(report_rows, key=lambda label: methods[label]["miou_mean"])
    for label, row in table.items():
        mious = [scores["miou"] for scores in methods[label]["per_seed"]]
        for title, reference in references.items():
            if reference == label:
                assert row[title] == "—"
                continue
            deltas = [100 * (a - b) for a, b in zip(mious, [s["miou"] for s in methods[reference]["per_seed"]])]
            shown = [float(word) for word in row[title].replace("±", " ").replace("(", " ").replace(",", " ")
                     .split(";")[0].split()]
            expected = [statistics.fmean(deltas)] + ([statistics.stdev(deltas), *deltas] if len(deltas) > 1 else [])
            assert shown == pytest.approx(expected, abs=0.051), f"{label} vs {reference}: {row[title]!r}"
            if len(deltas) > 1:
                assert row[title].endswith(f"; {sum(d > 0 for d in deltas)}/{len(deltas)} above)")


@pytest.mark.parametrize("folder", COMMITTED_RESULTS, ids=lambda folder: folder.name)
def test_committed_results_tables_agree_with_their_results_json(folder):
    assert_tables_agree_with_results(folder)


@pytest.mark.slow
def test_pipeline_produces_every_table_row_and_file(tiny_data_root, tmp_path, one_thread):
    out = tmp_path / "results"
    args = experiments.get_args([
        "--output-dir", str(out), "--data-root", str(tiny_data_root), "--source-size", "64x36",
        "--target-size", "64x32", "--batch-size", "2", "--supervised-iterations", "3", "--iterations", "2",
        "--adapt-iterations", "2", "--pseudo-iterations", "2",
        "--mpl-iterations", "2", "--val-every", "2", "--workers", "0", "--device", "cpu", "--no-progress",
        "--jobs", "1"])  # in this process: the side-by-side path is tests/test_scheduler.py's
    summary = experiments.main(args)
    for name in ("miou_curves.png", "qualitative.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG"), name
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(summary)) and results["seeds"] == [0] and "git_commit" in results
    selected = {label for label, stage, _ in METHODS if stage in selected_stage_keys(DEFAULT_METHODS)}
    assert "DACS + DSC" in selected and "FDA + DSC" not in selected  # the default: report rows + the best new one
    assert set(results["methods"]) == selected
    assert_tables_agree_with_results(out)
    # Each row is the run's own last validation of the weights it scores.
    for label, stage, network in METHODS:
        if label not in selected:
            continue
        record = json.loads((out / "runs" / "seed0" / stage / "metrics.json").read_text())["history"][-1]
        assert record["iteration"] == Settings(**results["settings"]).stage_iterations(stage), label
        scores = record["scores"].get(network, next(iter(record["scores"].values())))
        assert results["methods"][label]["per_seed"] == [scores], label
    assert (out / "runs" / "seed0" / "pseudo" / "thresholds.json").is_file()


def test_adaptation_stages_fine_tune_their_parent_and_count_its_iterations(tmp_path):
    settings = Settings(supervised_iterations=12, iterations=10, adapt_iterations=3, pseudo_iterations=4,
                        mpl_iterations=2)
    seed_dir = tmp_path / "seed1"

    def argv(key):
        return STAGE_BY_KEY[key].argv(settings, seed_dir / key, seed_dir)

    def init_from(key):
        words = argv(key)
        return words[words.index("--init-from") + 1] if "--init-from" in words else None

    assert init_from("supervised") is None and init_from("source_only") is None
    for key in ("source_only_ft", "fcd", "dsc"):
        assert init_from(key) == str(seed_dir / "source_only" / "last.pth"), key
    assert init_from("dsc_pl") == init_from("mpl") == init_from("mpl_course") == str(seed_dir / "dsc" / "last.pth")
    for key, rule in (("mpl", "pham"), ("mpl_course", "course")):  # one MPL stage per feedback rule
        assert argv(key)[argv(key).index("--feedback") + 1] == rule
        assert argv(key)[argv(key).index("--teacher-checkpoint") + 1] == f"{seed_dir}/dsc/last.pth"
    assert argv("dsc_pl")[argv("dsc_pl").index("--use-pseudolabels") + 1] == f"{seed_dir}/pseudo"
    assert "--lambda-adv" in argv("fcd") and "--lambda-adv" not in argv("source_only_ft")
    assert argv("fcd")[argv("fcd").index("--seed") + 1] == "1"
    assert {key: total_iterations(settings, key) for key in ("supervised", "source_only_ft", "fcd", "dsc_pl", "mpl",
                                                       "mpl_course")} == {
        "supervised": 12, "source_only_ft": 13, "fcd": 13, "dsc_pl": 17, "mpl": 15, "mpl_course": 15}
    assert start_iteration(settings, "dsc_pl") == 13 and start_iteration(settings, "source_only") == 0


def test_self_training_rows_fine_tune_source_only_with_their_flags(tmp_path):
    settings = Settings(iterations=10, adapt_iterations=3, fda_beta=0.02, entropy_weight=0.5, rcs_temperature=0.1)
    seed_dir = tmp_path / "seed0"
    parsed = {key: trainUnsupervised.get_args(STAGE_BY_KEY[key].argv(settings, seed_dir / key, seed_dir))
              for key in SELF_TRAINING_METHODS}
    for key, args in parsed.items():
        assert args.init_from == str(seed_dir / "source_only" / "last.pth") and args.max_iters == 3, key
        assert total_iterations(settings, key) == 13
    assert (parsed["dacs"].self_training, parsed["dacs"].discriminator) == ("dacs", "none")
    assert (parsed["dacs_dsc"].self_training, parsed["dacs_dsc"].discriminator) == ("dacs", "dsc")
    assert parsed["fda_dsc"].fda_beta == 0.02 and parsed["fda_dsc"].self_training == "none"
    assert parsed["entropy_dsc"].entropy_weight == 0.5 and parsed["entropy_dsc"].discriminator == "dsc"
    assert parsed["dacs_dsc_rcs"].rare_class_sampling == 0.1 and parsed["dacs_dsc_rcs"].self_training == "dacs"


def test_methods_select_their_stages():
    report = selected_stage_keys(["report"])
    assert "mpl" in report and not set(report) & set(SELF_TRAINING_METHODS)
    assert selected_stage_keys(["fda_dsc"]) == ("source_only", "fda_dsc")  # the row and the model it fine-tunes
    assert selected_stage_keys(["all"]) == STAGE_KEYS
    assert selected_stage_keys(DEFAULT_METHODS) == report + ("dacs_dsc",)


def _scores(miou):
    return {"miou": miou, "pixel_accuracy": 0.5, "iou": [miou] * len(SHORT_NAMES)}


def test_table1_deltas_are_paired_by_seed():
    rows = [("Source only", [_scores(0.10), _scores(0.20)]), ("DSC", [_scores(0.13), _scores(0.21)])]
    lines = table1_markdown(rows, baseline="Source only", iterations={"Source only": 600, "DSC": 750}).splitlines()
    assert lines[0].endswith("| ΔmIoU vs Source only | iterations |")
    source, dsc = (line.split(" | ") for line in lines[2:])
    assert source[-2:] == ["—", "600 |"]
    # per seed +3.0 and +1.0 points: mean 2.0, standard deviation sqrt(2) = 1.41
    assert dsc[-2:] == ["+2.0 ± 1.4", "750 |"]
    assert dsc[-4] == "17.0 ± 5.7"  # the row's own mIoU: mean of 13 and 21, unpaired std 5.66


def test_paired_deltas_table_pairs_each_seed_with_the_same_seed_of_the_reference():
    rows = [("DSC", [_scores(0.20), _scores(0.18), _scores(0.22)]),
            ("DACS", [_scores(0.23), _scores(0.17), _scores(0.26)]),
            ("One seed", [_scores(0.30)])]
    lines = paired_deltas_markdown(rows, [("DSC", "DSC"), ("best report row (DACS)", "DACS")]).splitlines()
    assert lines[0] == "| method | Δ vs DSC | Δ vs best report row (DACS) |"
    cells = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ")[1:] for line in lines[2:]}
    # DACS − DSC per seed: +3, −1, +4 points; mean 2.0, std sqrt(((1)^2 + (3)^2 + (2)^2) / 2) = 2.65
    assert cells["DACS"] == ["+2.0 ± 2.6 (+3.0, -1.0, +4.0; 2/3 above)", "—"]
    assert cells["DSC"] == ["—", "-2.0 ± 2.6 (-3.0, +1.0, -4.0; 1/3 above)"]
    assert cells["One seed"] == ["—", "—"]  # another number of seeds cannot be paired


def test_the_best_report_row_is_the_report_row_with_the_highest_mean():
    scores = {"Source only": [_scores(0.10)], "DSC": [_scores(0.20), _scores(0.20)],
              "DSC + MPL course (teacher)": [_scores(0.25), _scores(0.19)],  # mean 0.22
              "DACS + DSC": [_scores(0.40), _scores(0.40)]}                   # not a report row
    assert best_report_row(scores) == "DSC + MPL course (teacher)"
    assert paired_references(scores) == [("Source only", "Source only"), ("DSC", "DSC"),
                                         ("best report row (DSC + MPL course (teacher))", "DSC + MPL course (teacher)")]
    deltas = paired_summary(scores, paired_references(scores))
    assert deltas["DACS + DSC"]["DSC + MPL course (teacher)"] == pytest.approx([0.15, 0.21])
    assert deltas["DSC"]["Source only"] is None  # one seed against two


def test_a_rerun_stage_replaces_its_folder_and_only_its_folder(tmp_path, monkeypatch):
    seen = {}
    fake = types.ModuleType("fake_stage_script")
    fake.get_args = lambda argv: argv
    fake.main = lambda argv: seen.setdefault("files", sorted(p.name for p in (tmp_path / "seed0").rglob("*")))
    monkeypatch.setitem(STAGE_ARGS, "fake", lambda settings, run_dir, seed_dir: ["--output-dir", str(run_dir)])
    stale = tmp_path / "seed0" / "fake" / "last.pth"
    stale.parent.mkdir(parents=True)
    stale.write_text("previous run")
    neighbour = tmp_path / "seed0" / "source_only" / "last.pth"
    neighbour.parent.mkdir()
    neighbour.write_text("another stage")
    run_stage(Stage("fake", "Fake", "fake_stage_script"), Settings(), tmp_path / "seed0", fake)
    assert seen["files"] == ["last.pth", "source_only"]  # the script started without the stale folder
    assert not stale.parent.exists() and neighbour.read_text() == "another stage"


def test_committed_self_training_tuning_table_agrees_with_its_results_json():
    folder = REPO / "results" / "dacs_tuning"
    runs = json.loads((folder / "results.json").read_text())["runs"]
    rows = _table_rows(folder / "table.md")
    assert list(rows) == [run["title"] for run in runs]
    for run in runs:
        row = rows[run["title"]]
        assert row["iterations"] == str(run["max_iters"]) and row["from"] == run["init_from"]
        assert run["miou"] == pytest.approx(statistics.fmean(v for v in run["iou"].values() if v is not None))
        for column, value in [("mIoU", run["miou"])] + [(name, run["iou"][name]) for name in
                                                        ("road", "building", "terrain", "sky", "car")]:
            assert float(row[column]) == pytest.approx(100 * value, abs=0.051), (run["title"], column)
