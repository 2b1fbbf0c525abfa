"""Bad input through the real scripts: one clear paragraph naming the file or flag, nothing damaged.

Every case runs ``trainUnsupervised.py`` / ``eval.py`` in-process through ``cli.entry.run_main``
(what the scripts' ``__main__`` runs), on a tiny copy of the fixture tree, and checks the exit
code, that stderr is one ``error: ...`` paragraph naming the file or flag and what was expected,
and that a run folder written before is byte-identical afterwards. Also: the code-execution
refusal of checkpoints, plain stored args, and that a run writes nowhere but its folders.
"""
import ast
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_script
import trainUnsupervised
from dataset.cityscapes import CityscapesDataset
from dataset.labels import ID_TO_TRAINID, colorize
from dataset.paths import pseudo_label_path
from model import load_bisenet
from cli import builders
from utils.checkpoint import CheckpointError, load_checkpoint_file
from cli.entry import EXIT_USER_ERROR, run_main
from tests.helpers import REPO, TINY_RUN, folder_digest, truncate

TINY = TINY_RUN
FIRST_GTA5 = "00001.png"
FIRST_VAL = "city/city_000000_000019"


# Two threads per process on two shared cores spin against each other; one is several times faster.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained_run(tiny_data_root, tmp_path_factory):
    """A finished 2-iteration source-only run: last.pth, best.pth, metrics, loss log, run_info."""
    run = tmp_path_factory.mktemp("existing") / "run"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainUnsupervised.main(trainUnsupervised.get_args(
            ["--data-root", str(tiny_data_root), "--output-dir", str(run), *TINY, "--discriminator", "none",
             "--max-iters", "2", "--val-every", "2"]))
    finally:
        torch.set_num_threads(previous)
    return run


@pytest.fixture
def data(tiny_data_root, tmp_path):
    """A private copy of the tiny tree that a test may damage."""
    return Path(shutil.copytree(tiny_data_root, tmp_path / "data"))


def run_script(script, argv, capsys):
    """(exit code, stderr, stdout) of ``script``'s main run as its ``__main__`` does."""
    code, message = 0, ""
    try:
        run_main(script.main, script.get_args, [str(arg) for arg in argv])
    except SystemExit as exit_info:
        code = exit_info.code
        if isinstance(code, str):  # the interpreter prints such a message and exits with 1
            code, message = 1, exit_info.code + "\n"
    captured = capsys.readouterr()
    return code, captured.err + message, captured.out


def assert_one_paragraph_error(err, *expected):
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, f"expected one 'error: ...' line, got:\n{err}"
    assert "Traceback" not in err, err
    for text in expected:
        assert str(text) in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]


def resume_args(data_root, run, *extra, discriminator="none"):
    return ["--data-root", data_root, "--output-dir", run, "--resume", run / "last.pth", *TINY,
            "--discriminator", discriminator, *extra]


# ----------------------------------------------------------------------------------- data roots
def _missing_root(data):
    shutil.rmtree(data)
    return [f"--data-root {data} does not exist", "GTA5/ and Cityscapes/"]


def _cityscapes_in_neither_layout(data):
    shutil.rmtree(data / "Cityscapes")
    (data / "Cityscapes" / "leftImg8bit_trainvaltest").mkdir(parents=True)
    (data / "Cityscapes" / "gtFine_trainvaltest.zip").write_bytes(b"zip")
    return ["Cityscapes root", "neither layout", "looked for", "leftImg8bit", "found in",
            "gtFine_trainvaltest.zip, leftImg8bit_trainvaltest/"]


def _gta5_without_labels(data):
    shutil.rmtree(data / "GTA5" / "labels")
    return ["GTA5 root", "looked for the folders", str(data / "GTA5" / "labels"), "found in", "images/"]


def _empty_gta5(data):
    for image in (data / "GTA5" / "images").iterdir():
        image.unlink()
    return ["GTA5 split 'all' is empty", str(data / "GTA5" / "images")]


def _empty_cityscapes_split(data):
    for image in (data / "Cityscapes" / "leftImg8bit" / "train" / "city").iterdir():
        image.unlink()
    return ["Cityscapes split 'train' is empty", "_leftImg8bit.png"]


def _list_naming_missing_files(data):
    (data / "GTA5" / "train.txt").write_text("00001.png\n00002.png\n00077.png\n")
    return [f"GTA5 list {data / 'GTA5' / 'train.txt'}", "1 missing image", "00077.png", "1 missing label"]


def _missing_val_labels(data):
    shutil.rmtree(data / "Cityscapes" / "gtFine" / "val")
    return ["labeled Cityscapes split 'val' needs the label folder", str(data / "Cityscapes" / "gtFine" / "val")]


@pytest.mark.parametrize("damage", [_missing_root, _cityscapes_in_neither_layout, _gta5_without_labels, _empty_gta5,
                                    _empty_cityscapes_split, _list_naming_missing_files, _missing_val_labels])
def test_dataset_layout_errors_name_what_was_expected_and_touch_nothing(damage, data, trained_run, capsys):
    before = folder_digest(trained_run)
    expected = damage(data)
    code, err, _ = run_script(trainUnsupervised, resume_args(data, trained_run), capsys)
    assert code == EXIT_USER_ERROR
    assert_one_paragraph_error(err, *expected)
    assert folder_digest(trained_run) == before  # failed before start-up: not even run_info.json was rewritten


# ----------------------------------------------------------------------------------- bad files
def _rgb_label(data):
    label = data / "GTA5" / "labels" / FIRST_GTA5
    ids = np.asarray(Image.open(label))
    Image.fromarray(colorize(ID_TO_TRAINID[ids])).save(label)
    return [f"label file {label} has 3 channels", "expected a single-channel id PNG", "not a colour-coded label"]


def _not_an_image(data):
    image = data / "GTA5" / "images" / FIRST_GTA5
    image.write_text("<html>404 Not Found</html>")
    return [f"cannot read image file {image}", "cannot identify image file"]


def _label_of_another_size(data):
    label = data / "Cityscapes" / "gtFine" / "val" / f"{FIRST_VAL}_gtFine_labelIds.png"
    Image.open(label).resize((32, 16), Image.Resampling.NEAREST).save(label)
    return [f"label {label} is 16x32", f"{FIRST_VAL}_leftImg8bit.png is 32x64 (HxW)"]


@pytest.mark.parametrize("damage", [_rgb_label, _not_an_image, _label_of_another_size])
def test_faulty_first_files_stop_the_run_before_any_network_is_built(damage, data, tmp_path, capsys, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a network was built before the data were checked")

    monkeypatch.setattr(builders, "build_bisenet", no_network)
    expected = damage(data)
    run = tmp_path / "run"
    code, err, _ = run_script(trainUnsupervised, ["--data-root", data, "--output-dir", run, *TINY], capsys)
    assert code == EXIT_USER_ERROR
    assert_one_paragraph_error(err, *expected)
    assert not run.exists()


def test_unreadable_sample_mid_run_names_the_file_and_keeps_the_checkpoints(data, trained_run, capsys):
    """A truncated image met at some iteration (in a DataLoader worker): one line, checkpoints intact."""
    broken = data / "GTA5" / "images" / "00006.png"
    truncate(broken)
    before = folder_digest(trained_run, exclude={"run_info.json"})
    code, err, _ = run_script(trainUnsupervised, resume_args(data, trained_run, "--max-iters", "8", "--workers", "1",
                                                             "--val-every", "100", "--checkpoint-every", "100"), capsys)
    assert code == EXIT_USER_ERROR
    line = assert_one_paragraph_error(err, f"cannot read image file {broken}")
    assert "DataLoader worker" not in line
    assert folder_digest(trained_run, exclude={"run_info.json"}) == before


@pytest.mark.slow
def test_skip_bad_skips_counts_in_workers_and_reports_at_the_end(data, tmp_path, capsys):
    truncate(data / "GTA5" / "images" / "00003.png")
    truncate(data / "Cityscapes" / "leftImg8bit" / "train" / "city" / "city_000002_000019_leftImg8bit.png")
    label = data / "GTA5" / "labels" / "00002.png"
    ids = np.array(Image.open(label))
    ids[:2, :5] = 250  # not a Cityscapes id: 10 pixels mapped to 255 and counted
    Image.fromarray(ids).save(label)
    small = data / "GTA5" / "labels" / "00005.png"
    Image.open(small).resize((32, 18), Image.Resampling.NEAREST).save(small)
    run = tmp_path / "run"
    # Loaded in a DataLoader worker: the counts must reach the main process to be reported. The
    # adversarial run reads target batches (source only reads none).
    code, err, out = run_script(trainUnsupervised, ["--data-root", data, "--output-dir", run, *TINY, "--skip-bad",
                                                    "--workers", "1", "--discriminator", "dsc", "--max-iters", "4",
                                                    "--val-every", "4"], capsys)
    assert code == 0, err
    gta5 = next(line for line in out.splitlines() if line.startswith("[data] gta5"))
    assert re.search(r"1 unreadable sample\(s\) skipped \(--skip-bad", gta5), gta5
    assert re.search(r"\d+ label\(s\) of another size than their image resized", gta5), gta5
    assert re.search(r"\b10 pixel\(s\) in 1 label\(s\) held ids outside the label table and were mapped to 255", gta5), gta5
    cityscapes = next(line for line in out.splitlines() if line.startswith("[data] cityscapes"))
    assert re.search(r"[12] unreadable sample\(s\) skipped", cityscapes), cityscapes
    assert load_checkpoint_file(run / "last.pth")["iteration"] == 4


# ----------------------------------------------------------------------------------- checkpoints
def _text_file(tmp_path, run):
    path = tmp_path / "notes.pth"
    path.write_text("epoch 40, miou 31.2\n")
    return path, ["is not a readable PyTorch checkpoint", "it is not a PyTorch file", "starts with b'epoch 40"]


def _truncated(tmp_path, run):
    path = tmp_path / "half.pth"
    path.write_bytes((run / "last.pth").read_bytes()[:5_000_000])
    return path, ["is not a readable PyTorch checkpoint (truncated", "failed finding central directory"]


def _missing(tmp_path, run):
    path = tmp_path / "nowhere.pth"
    return path, ["does not exist"]


def _not_bisenet(tmp_path, run):
    path = tmp_path / "resnet.pth"
    torch.save({"fc.weight": torch.zeros(3, 2), "fc.bias": torch.zeros(3)}, path)
    return path, ["not a recognised BiSeNet checkpoint", "its first keys are ['fc.bias', 'fc.weight']"]


@pytest.mark.parametrize("make", [_text_file, _truncated, _missing, _not_bisenet])
def test_eval_refuses_files_that_are_not_checkpoints(make, trained_run, tiny_data_root, tmp_path, capsys):
    path, expected = make(tmp_path, trained_run)
    code, err, _ = run_script(eval_script, ["--checkpoint", path, "--data-root", tiny_data_root, "--eval-size", "64x32",
                                            "--workers", "0", "--no-progress", "--output-dir", tmp_path / "eval"], capsys)
    assert code == EXIT_USER_ERROR
    assert_one_paragraph_error(err, str(path), *expected)
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("discriminator,flags,expected", [
    ("none", ["--num-classes", "5"], ["holds a 'model' network built with --num-classes 19 (now 5)",
                                      "resume with the flags of the run that wrote it"]),
    ("none", ["--input-convention", "course"], ["built with --input-convention imagenet (now course)"]),
    ("dsc", [], ["lacks discriminator, optimizers/discriminator", "another --discriminator"]),
])
def test_resume_from_a_checkpoint_of_another_kind_of_run(discriminator, flags, expected, tiny_data_root, trained_run,
                                                         capsys):
    before = folder_digest(trained_run, exclude={"run_info.json"})
    args = resume_args(tiny_data_root, trained_run, "--max-iters", "4", *flags, discriminator=discriminator)
    code, err, _ = run_script(trainUnsupervised, args, capsys)
    assert code == EXIT_USER_ERROR
    assert_one_paragraph_error(err, str(trained_run / "last.pth"), *expected)
    assert folder_digest(trained_run, exclude={"run_info.json"}) == before


def test_load_bisenet_refuses_another_backbone_or_class_count(trained_run):
    path = trained_run / "last.pth"
    with pytest.raises(CheckpointError, match=r"holds a BiSeNet with context path resnet18 and 19 classes, but "
                                              r"context path resnet101 with 19 classes was asked for"):
        load_bisenet(path, expect_context_path="resnet101")
    with pytest.raises(CheckpointError, match=r"but context path resnet18 with 7 classes was asked for"):
        load_bisenet(path, expect_num_classes=7)


# ----------------------------------------------------------------------------------- pseudo labels
def _pseudo_dir(data, tmp_path, hw=(32, 64), value=0, skip=0):
    folder = tmp_path / "pseudo"
    names = CityscapesDataset(data / "Cityscapes", split="train", labeled=False).names
    for name in names[skip:]:
        path = pseudo_label_path(folder, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full(hw, value, np.uint8)).save(path)
    return folder, names


@pytest.mark.parametrize("case", ["missing files", "wrong size"])
def test_incompatible_pseudo_label_folder_is_refused_before_training(case, data, tmp_path, capsys):
    if case == "missing files":
        folder, names = _pseudo_dir(data, tmp_path, skip=2)
        expected = [f"pseudo labels of split 'train' in {folder}", "2 missing files",
                    str(pseudo_label_path(folder, names[0]))]
    else:
        folder, names = _pseudo_dir(data, tmp_path, hw=(16, 32))
        expected = [f"label {pseudo_label_path(folder, names[0])} is 16x32", "is 32x64 (HxW)",
                    "pseudo labels must be at their image's full size", "Regenerate"]
    run = tmp_path / "run"
    code, err, _ = run_script(trainUnsupervised, ["--data-root", data, "--output-dir", run, *TINY,
                                                  "--use-pseudolabels", folder], capsys)
    assert code == EXIT_USER_ERROR
    assert_one_paragraph_error(err, *expected)
    assert not run.exists()


def test_pseudo_labels_holding_non_train_ids_stop_at_the_first_batch(data, tmp_path, capsys):
    folder, names = _pseudo_dir(data, tmp_path, value=40)
    code, err, _ = run_script(trainUnsupervised, ["--data-root", data, "--output-dir", tmp_path / "run", *TINY,
                                                  "--discriminator", "none", "--max-iters", "2",
                                                  "--use-pseudolabels", folder], capsys)
    assert code == EXIT_USER_ERROR
    assert_one_paragraph_error(err, f"pseudo label {folder}", "holds values [40]", "expected trainIds 0..18 or 255")


def test_missing_pseudo_label_folder_names_the_flag(tmp_path, tiny_data_root, capsys):
    code, err, _ = run_script(trainUnsupervised, ["--data-root", tiny_data_root, "--output-dir", tmp_path / "run",
                                                  *TINY, "--use-pseudolabels", tmp_path / "nowhere"], capsys)
    assert code != 0
    assert f"--use-pseudolabels {tmp_path / 'nowhere'}: no such folder" in err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("flags,expected", [
    (["--source-size=-5x10"], ["--source-size", "expected WIDTHxHEIGHT such as 1024x512, got '-5x10'"]),
    (["--target-size", "1024"], ["--target-size", "expected WIDTHxHEIGHT such as 1024x512, got '1024'"]),
    (["--crop-size", "0x512"], ["--crop-size", "sizes must be positive, got '0x512'"]),
    (["--batch-size", "-2"], ["--batch-size", "expected a positive integer, got -2"]),
    (["--max-iters", "0"], ["--max-iters", "expected a positive integer, got 0"]),
    (["--learning-rate", "-0.1"], ["--learning-rate", "expected a positive number, got -0.1"]),
    (["--workers", "-1"], ["--workers", "expected an integer >= 0, got -1"]),
    (["--scale-range", "1.5,0.5"], ["--scale-range", "expected 0 < MIN <= MAX, got '1.5,0.5'"]),
    (["--optimizer", "lbfgs"], ["--optimizer", "invalid choice: 'lbfgs'", "'sgd', 'adam', 'rmsprop'"]),
    (["--optimizer-d", "adamw"], ["--optimizer-d", "invalid choice: 'adamw'", "'sgd', 'adam', 'rmsprop'"]),
    (["--context-path", "resnet50"], ["--context-path", "invalid choice: 'resnet50'", "'resnet18', 'resnet101'"]),
    (["--amp", "fp8"], ["--amp", "invalid choice: 'fp8'", "'auto', 'off', 'bf16', 'fp16'"]),
    (["--discriminator", "7"], ["--discriminator", "fcd", "dsc"]),
])
def test_nonsense_flags_are_rejected_by_argparse_with_what_is_valid(flags, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        trainUnsupervised.get_args(["--output-dir", str(tmp_path / "run"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"


def test_crop_larger_than_the_image_without_scale_jitter_is_refused(tiny_data_root, tmp_path, capsys):
    code, err, _ = run_script(trainUnsupervised, ["--data-root", tiny_data_root, "--output-dir", tmp_path / "run",
                                                  *TINY, "--crop-size", "128x64"], capsys)
    assert code != 0
    assert "--crop-size 128x64 is larger than --source-size 64x36" in err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------- safety
class _RunsCode:
    """Unpickling this calls os.system: what a malicious 'checkpoint' would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_executing_pickle_is_refused_everywhere(trained_run, tiny_data_root, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"format": "uda-bisenet/1", "iteration": 0, "model": _RunsCode(marker)}, evil)
    expected = [f"{evil} was refused", "system", "could execute code", "weights_only=True"]
    for load in (load_checkpoint_file, load_bisenet):
        with pytest.raises(CheckpointError) as error:
            load(evil)
        for text in expected:
            assert text in str(error.value)
    code, err, _ = run_script(eval_script, ["--checkpoint", evil, "--data-root", tiny_data_root, "--workers", "0",
                                            "--no-progress"], capsys)
    assert code == EXIT_USER_ERROR
    assert_one_paragraph_error(err, *expected)
    code, err, _ = run_script(trainUnsupervised, ["--data-root", tiny_data_root, "--output-dir", tmp_path / "run", *TINY,
                                                  "--discriminator", "none", "--resume", evil], capsys)
    assert code == EXIT_USER_ERROR
    assert_one_paragraph_error(err, *expected)
    assert not marker.exists()


def _python_sources():
    skip = {".venv", ".git", "tests", "__pycache__", ".hypothesis", ".pytest_cache", "data"}
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = sorted(name for name in subfolders if name not in skip)
        yield from (Path(folder) / name for name in sorted(files) if name.endswith(".py"))


def test_every_torch_load_in_the_code_uses_weights_only():
    calls = []
    for path in _python_sources():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                keywords = {k.arg: k.value for k in node.keywords}
                safe = isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True
                calls.append((f"{path.relative_to(REPO)}:{node.lineno}", safe))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("pickle", "dill"):
                assert node.attr not in ("load", "loads", "Unpickler"), f"{path}:{node.lineno} unpickles"
    assert calls, "no torch.load found: the scan is broken"
    assert [where for where, safe in calls if not safe] == []


def test_stored_args_and_history_are_plain_json(trained_run):
    checkpoint = torch.load(trained_run / "last.pth", map_location="cpu", weights_only=True)
    for key in ("args", "history", "best_miou", "git_commit", "model_config", "global_batch_sizes"):
        assert json.loads(json.dumps(checkpoint[key], allow_nan=False)) == checkpoint[key], key
    assert checkpoint["args"]["output_dir"] == str(trained_run)


# ----------------------------------------------------------------------------------- where runs write
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_written = None  # a list while recording, else None (audit hooks cannot be removed)


def _audit(event, args):
    if _written is None:
        return
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2]
        if (mode and any(c in mode for c in "wax+")) or (mode is None and flags & _WRITE_FLAGS):
            _written.append(os.fsdecode(args[0]))
    elif event in ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.symlink", "os.link",
                   "shutil.rmtree", "shutil.copyfile", "tempfile.mkstemp", "tempfile.mkdtemp"):
        _written.extend(os.fsdecode(arg) for arg in args[:2] if isinstance(arg, (str, bytes, os.PathLike)))


@pytest.mark.slow
def test_training_and_evaluation_write_only_in_their_folders(data, tmp_path, monkeypatch, capsys):
    global _written
    sys.addaudithook(_audit)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    run, scores = tmp_path / "run", tmp_path / "scores"
    data_before = {path: (stat.st_size, stat.st_mtime_ns) for path, stat in
                   ((p, p.stat()) for p in sorted(data.rglob("*")))}
    _written = []
    try:
        with_tensorboard = [flag for flag in TINY if flag != "--no-tensorboard"]
        assert run_script(trainUnsupervised, ["--data-root", data, "--output-dir", run, *with_tensorboard,
                                              "--discriminator", "dsc", "--max-iters", "2", "--val-every", "2"],
                          capsys)[0] == 0
        assert run_script(eval_script, ["--checkpoint", run / "best.pth", "--data-root", data, "--workers", "0",
                                        "--no-progress", "--output-dir", scores, "--save-predictions", scores / "png"],
                          capsys)[0] == 0
        written = sorted(set(_written))
    finally:
        _written = None
    allowed = (str(run) + os.sep, str(scores) + os.sep, "/dev/")
    outside = [path for path in map(os.path.abspath, written)
               if not (path + os.sep).startswith(allowed) and "__pycache__" not in path]
    assert outside == []
    assert any(path.startswith(str(run / "tensorboard")) for path in written)  # the recorder sees the logger
    assert list(workdir.iterdir()) == []
    assert {path: (stat.st_size, stat.st_mtime_ns) for path, stat in
            ((p, p.stat()) for p in sorted(data.rglob("*")))} == data_before


def test_eval_benchmark_reports_throughput_and_latency(trained_run, tiny_data_root, tmp_path, capsys):
    code, err, out = run_script(eval_script, ["--checkpoint", trained_run / "last.pth", "--data-root", tiny_data_root,
                                              "--eval-size", "64x32", "--workers", "0", "--no-progress",
                                              "--output-dir", tmp_path / "eval", "--benchmark", "--benchmark-batches",
                                              "1", "2", "--benchmark-runs", "2", "--benchmark-warmup", "1"], capsys)
    assert code == 0, err
    # The flags reach the measurement (its figures are checked against a fake clock in test_benchmark).
    runs = json.loads((tmp_path / "eval" / "eval.json").read_text())["benchmark"]
    assert [run["batch_size"] for run in runs] == [1, 2]
    for run in runs:
        assert (run["height"], run["width"], run["runs"], run["warmup"]) == (32, 64, 2, 1)
        assert f"{run['images_per_s']:.1f} img/s" in out
    assert "ms per call alone" in out
