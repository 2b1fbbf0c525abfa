"""The main job (experiments.py) at a toy size: every stage runs and every file and row appears."""
import json
import sys
import types

import experiments
from dataset.labels import SHORT_NAMES
import trainUnsupervised
from utils.experiments import (DEFAULT_METHODS, METHODS, SELF_TRAINING_METHODS, STAGE_ARGS, STAGE_BY_KEY, STAGE_KEYS,
                               Settings, Stage, run_stage, selected_stage_keys, start_iteration, total_iterations)
from utils.report import table1_markdown


def test_pipeline_produces_every_table_row_and_file(tiny_data_root, tmp_path):
    out = tmp_path / "results"
    args = experiments.get_args([
        "--output-dir", str(out), "--data-root", str(tiny_data_root), "--source-size", "64x36",
        "--target-size", "64x32", "--batch-size", "2", "--supervised-iterations", "3", "--iterations", "2",
        "--adapt-iterations", "2", "--pseudo-iterations", "2",
        "--mpl-iterations", "2", "--val-every", "2", "--workers", "0", "--device", "cpu", "--no-progress"])
    summary = experiments.main(args)
    for name in ("table1.md", "table2.md", "miou_curves.png", "qualitative.png", "results.json"):
        assert (out / name).stat().st_size > 0, name
    table1 = (out / "table1.md").read_text()
    selected = {label for label, stage, _ in METHODS if stage in selected_stage_keys(DEFAULT_METHODS)}
    assert "DACS + DSC" in selected and "FDA + DSC" not in selected  # the default: report rows + the best new one
    for label, _, _ in METHODS:
        assert (f"| {label} |" in table1) == (label in selected), label
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == selected
    assert results["seeds"] == [0] and "git_commit" in results
    assert summary["domain_gap"]["source_only_source_val_miou"]
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
    assert init_from("dsc_pl") == init_from("mpl") == str(seed_dir / "dsc" / "last.pth")
    assert argv("dsc_pl")[argv("dsc_pl").index("--use-pseudolabels") + 1] == f"{seed_dir}/pseudo"
    assert "--lambda-adv" in argv("fcd") and "--lambda-adv" not in argv("source_only_ft")
    assert argv("fcd")[argv("fcd").index("--seed") + 1] == "1"
    assert {key: total_iterations(settings, key) for key in ("supervised", "source_only_ft", "fcd", "dsc_pl", "mpl")} == {
        "supervised": 12, "source_only_ft": 13, "fcd": 13, "dsc_pl": 17, "mpl": 15}
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


def test_a_rerun_stage_replaces_its_folder_and_only_its_folder(tmp_path, monkeypatch):
    seen = {}
    fake = types.ModuleType("fake_stage_script")
    fake.get_args = lambda argv: argv
    fake.main = lambda argv: seen.setdefault("files", sorted(p.name for p in (tmp_path / "seed0").rglob("*")))
    monkeypatch.setitem(sys.modules, "fake_stage_script", fake)
    monkeypatch.setitem(STAGE_ARGS, "fake", lambda settings, run_dir, seed_dir: ["--output-dir", str(run_dir)])
    stale = tmp_path / "seed0" / "fake" / "last.pth"
    stale.parent.mkdir(parents=True)
    stale.write_text("previous run")
    neighbour = tmp_path / "seed0" / "source_only" / "last.pth"
    neighbour.parent.mkdir()
    neighbour.write_text("another stage")
    run_stage(Stage("fake", "Fake", "fake_stage_script"), Settings(), tmp_path / "seed0")
    assert seen["files"] == ["last.pth", "source_only"]  # the script started without the stale folder
    assert not stale.parent.exists() and neighbour.read_text() == "another stage"
