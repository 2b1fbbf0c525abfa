"""The main job (experiments.py) at a toy size: every stage runs and every file and row appears."""
import json

import experiments
from utils.experiments import METHODS


def test_pipeline_produces_every_table_row_and_file(tiny_data_root, tmp_path):
    out = tmp_path / "results"
    args = experiments.get_args([
        "--output-dir", str(out), "--data-root", str(tiny_data_root), "--source-size", "64x36",
        "--target-size", "64x32", "--batch-size", "2", "--iterations", "2", "--pseudo-iterations", "2",
        "--mpl-iterations", "2", "--val-every", "2", "--workers", "0", "--device", "cpu", "--no-progress"])
    summary = experiments.main(args)
    for name in ("table1.md", "table2.md", "miou_curves.png", "qualitative.png", "results.json"):
        assert (out / name).stat().st_size > 0, name
    table1 = (out / "table1.md").read_text()
    for label, _, _ in METHODS:
        assert f"| {label} |" in table1, label
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {label for label, _, _ in METHODS}
    assert results["seeds"] == [0] and "git_commit" in results
    assert summary["domain_gap"]["source_only_source_val_miou"]
    assert (out / "runs" / "seed0" / "pseudo" / "thresholds.json").is_file()
