"""python -m model.export: the ONNX graph equals PyTorch's predictions; model/ needs no training code."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset.labels import NUM_CLASSES
from model import bisenet_checkpoint_entry, build_bisenet
from utils.checkpoint import CHECKPOINT_FORMAT

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch.onnx.export(dynamo=True) builds the graph with it

from model import export  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def write_checkpoint(path, convention="imagenet", key="model"):
    torch.manual_seed(1)  # untrained: several classes predicted, so a wrong graph shows
    network = build_bisenet("resnet18", NUM_CLASSES)
    torch.save({"format": CHECKPOINT_FORMAT, **bisenet_checkpoint_entry(network, convention, key=key)}, path)
    return path


def run_onnx(path, images):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": images.astype(np.float32)})[0]


@pytest.mark.slow  # about 15 s of CPU time, most of it in torch.export
def test_argmax_graph_equals_the_predict_path(tmp_path):
    """The exported labels are predict.py's labels (the course convention baked into the graph)."""
    from dataset.normalization import get_normalization
    from model import load_bisenet
    from engine.predict import Predictor

    checkpoint = write_checkpoint(tmp_path / "course.pth", convention="course")
    target = tmp_path / "bisenet.onnx"
    report = export.main(export.get_args(["--checkpoint", str(checkpoint), "--onnx", str(target),
                                          "--size", "64x32", "--check-count", "2"]))
    assert report["passed"] and report["check"]["agreement"] >= 0.999
    assert report["check"]["pixels"] == 2 * 64 * 32
    assert json.loads((tmp_path / "bisenet.onnx.json").read_text())["check"] == report["check"]
    model = onnx.load(str(target))
    assert {entry.key: entry.value for entry in model.metadata_props}["input_convention"] == "course"
    assert any(opset.domain in ("", "ai.onnx") and opset.version == export.OPSET for opset in model.opset_import)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 64, 3), dtype=np.uint8)  # a batch of 3: the batch is dynamic
    labels = run_onnx(target, images.transpose(0, 3, 1, 2))
    assert labels.dtype == np.uint8 and labels.shape == (3, 32, 64)
    network = load_bisenet(checkpoint)
    predictor = Predictor(network, get_normalization("course", "cityscapes"), torch.device("cpu"))
    expected = np.stack(predictor([torch.from_numpy(image) for image in images], (32, 64)))
    assert (labels == expected).mean() >= 0.999
    assert len(np.unique(expected)) > 1


@pytest.mark.slow  # about 25 s: a graph with symbolic sizes takes longer to export
def test_dynamic_size_softmax_graph_takes_any_size(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "mpl.pth", key="teacher")
    target = tmp_path / "dynamic.onnx"
    report = export.main(export.get_args(["--checkpoint", str(checkpoint), "--onnx", str(target), "--network", "teacher",
                                          "--dynamic-size", "--output", "softmax", "--size", "64x32",
                                          "--check-count", "1"]))
    assert report["passed"] and report["check"]["pixels"] == 512 * 256  # the synthetic image at its own size
    network = export.load_bisenet(checkpoint, key="teacher")
    for height, width in ((32, 64), (45, 77)):
        images = np.random.default_rng(height).uniform(0, 255, (1, 3, height, width)).astype(np.float32)
        probabilities = run_onnx(target, images)
        with torch.no_grad():
            logits = network((torch.from_numpy(images) / 255 - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1))
                             / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1))
        assert probabilities.shape == (1, NUM_CLASSES, height, width)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
        np.testing.assert_allclose(probabilities, logits.softmax(dim=1).numpy(), atol=1e-4)


def test_model_package_imports_no_training_code():
    """model.export loads with model/, the label and normalisation tables and leaf utils only."""
    project = ("model", "dataset", "utils", "engine", "uda", "cli", "reporting")
    code = ("import sys, model.export; print(' '.join(sorted(name for name in sys.modules "
            f"if name.split('.')[0] in {project!r})))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            check=True).stdout.split()
    # utils/ holds leaves that import nothing of the project (tests/test_architecture.py).
    allowed = {"dataset", "dataset.labels", "dataset.normalization"}
    assert {name for name in loaded if name.split(".")[0] not in ("model", "utils")} <= allowed, loaded


def test_an_onnx_path_that_is_a_folder_is_refused(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "model.pth")
    process = subprocess.run([sys.executable, "-m", "model.export", "--checkpoint", str(checkpoint),
                              "--onnx", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines() == [f"error: --onnx {tmp_path} is a folder; expected the path of "
                                                   f"the .onnx file to write"]
