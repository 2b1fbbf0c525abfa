"""Tests of model/: shapes, complexity numbers, discriminator choice, checkpoint formats."""
import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from dataset.labels import NUM_CLASSES
from model import (
    CONTEXT_PATHS,
    DISCRIMINATORS,
    BiSeNet,
    DSCDiscriminator,
    FCDiscriminator,
    bisenet_checkpoint_entry,
    build_bisenet,
    build_discriminator,
    convert_course_state_dict,
    load_bisenet,
    model_config,
    resolve_discriminator_name,
)
from cli.method_options import discriminator_type
from tests.helpers import randomize_
from utils.checkpoint import CHECKPOINT_FORMAT, CheckpointError

# The state_dict keys of the course repository's BiSeNet-R18, listed from its code (kept in the repository).
COURSE_KEYS_JSON = Path(__file__).resolve().parent / "data" / "course_bisenet_resnet18_keys.json"
SMALL = (64, 128)        # divisible by 32
ODD = (100, 150)         # divisible by neither 8 nor 32
TINY = (64, 96)          # for ResNet-101
GTA_SIZE = (720, 1280)   # H, W of GTA5 images: not a multiple of 32
REPORT_SIZE = (512, 1024)


# --- BiSeNet ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "context_path, size, num_classes",
    [("resnet18", SMALL, NUM_CLASSES), ("resnet18", ODD, 7), ("resnet101", TINY, NUM_CLASSES)],
)
def test_bisenet_output_shapes(context_path, size, num_classes):
    torch.manual_seed(0)
    model = BiSeNet(num_classes=num_classes, context_path=context_path)
    x = torch.randn(2, 3, *size)  # batch 2: the ARM's BatchNorm on (B, C, 1, 1) needs B > 1 to train

    model.train()
    outputs = model(x)
    assert isinstance(outputs, tuple) and len(outputs) == 3
    for output in outputs:
        assert output.shape == (2, num_classes, *size)
        assert torch.isfinite(output).all()

    model.eval()
    with torch.no_grad():
        output = model(x)
    assert isinstance(output, torch.Tensor)
    assert output.shape == (2, num_classes, *size)
    assert torch.isfinite(output).all()


def test_bisenet_attributes_and_state_dict_naming():
    model = BiSeNet(context_path="resnet18")
    assert model.context_path_name == "resnet18" and model.num_classes == NUM_CLASSES
    state = model.state_dict()
    assert not any(".features." in k or k.startswith("context_path.fc.") for k in state)
    # No tensor is stored twice under two names (the course's state_dicts did that).
    pointers = [t.data_ptr() for t in state.values() if t.numel() > 0]
    assert len(pointers) == len(set(pointers))
    # The trunk uses torchvision's names, so a torchvision ResNet state_dict maps onto it directly.
    trunk = {k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")}
    assert {k[len("context_path."):] for k in state if k.startswith("context_path.")} == trunk


def test_ffm_input_channels():
    assert BiSeNet(context_path="resnet101").ffm.fuse.conv.in_channels == 3328
    assert BiSeNet(context_path="resnet18").ffm.fuse.conv.in_channels == 1024


def test_weight_init_outside_trunk():
    model = BiSeNet()
    for bn in (model.spatial_path.block1.bn, model.arm16.bn, model.ffm.fuse.bn):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_unknown_context_path_lists_choices():
    with pytest.raises(ValueError, match="resnet101"):
        BiSeNet(context_path="resnet50")
    with pytest.raises(ValueError, match="resnet18"):
        build_bisenet(context_path="mobilenet")
    assert CONTEXT_PATHS == ("resnet18", "resnet101")


def test_resize_to_input_equals_course_x8_upsampling():
    """BiSeNet resizes the fused 1/8 map to the input size where the course upsampled by a factor 8
    before its classifier: bit for bit the same when the input is a multiple of 8, which is what
    makes course checkpoints reproduce. Reference: the course's order of operations, rebuilt from
    the network's own fused features with F.interpolate(scale_factor=8)."""
    torch.manual_seed(0)
    model = randomize_(BiSeNet(num_classes=7, context_path="resnet18")).eval()
    x = torch.randn(1, 3, 64, 96)
    captured = {}
    model.ffm.register_forward_hook(lambda module, inputs, output: captured.setdefault("fused", output))
    with torch.no_grad():
        output = model(x)
        fused = captured["fused"]
        assert fused.shape[-2:] == (8, 12)
        course = model.classifier(F.interpolate(fused, scale_factor=8, mode="bilinear", align_corners=False))
    assert torch.equal(output, course)
    # An input that is no multiple of 8 still comes back at its own size.
    with torch.no_grad():
        assert model(torch.randn(1, 3, 60, 90)).shape == (1, 7, 60, 90)


# --- Pretrained trunk -----------------------------------------------------------------------------

def test_pretrained_imagenet_missing_fails_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_download(*args, **kwargs):
        raise AssertionError("build_bisenet tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(FileNotFoundError) as info:
        build_bisenet("resnet18", pretrained="imagenet")
    assert str(expected) in str(info.value)
    assert "--pretrained none" in str(info.value)


def test_pretrained_imagenet_from_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    trunk = randomize_(torchvision.models.resnet18(), seed=3)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(trunk.state_dict(), cache / "resnet18-f37072fd.pth")
    model = build_bisenet("resnet18", pretrained="imagenet")
    assert torch.equal(model.context_path.layer4[1].conv2.weight, trunk.layer4[1].conv2.weight)
    assert torch.equal(model.context_path.bn1.running_var, trunk.bn1.running_var)


def test_pretrained_from_path_and_bad_path(tmp_path):
    trunk = randomize_(torchvision.models.resnet18(), seed=4)
    path = tmp_path / "resnet18.pth"
    torch.save(trunk.state_dict(), path)
    model = build_bisenet("resnet18", num_classes=5, pretrained=str(path))
    assert torch.equal(model.context_path.conv1.weight, trunk.conv1.weight)
    assert model.num_classes == 5

    with pytest.raises(FileNotFoundError, match="imagenet"):
        build_bisenet("resnet18", pretrained=str(tmp_path / "absent.pth"))
    with pytest.raises(CheckpointError, match="resnet101"):
        build_bisenet("resnet101", pretrained=str(path))  # ResNet-18 weights, ResNet-101 trunk


# --- Discriminators -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fcd", "dsc"])
def test_discriminator_output_matches_input_size(name):
    model = DISCRIMINATORS[name](num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        assert model(torch.rand(1, NUM_CLASSES, *GTA_SIZE)).shape == (1, 1, *GTA_SIZE)
        assert model(torch.rand(2, NUM_CLASSES, *ODD)).shape == (2, 1, *ODD)


def test_dsc_layers_are_depthwise_separable():
    model = DSCDiscriminator(num_classes=NUM_CLASSES)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    depthwise, pointwise = convs[0::2], convs[1::2]
    assert [c.groups for c in depthwise] == [NUM_CLASSES, 64, 128, 256, 512]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in depthwise)
    assert [c.out_channels for c in pointwise] == [64, 128, 256, 512, 1]
    assert all(c.kernel_size == (1, 1) for c in pointwise)
    assert all(c.bias is None for c in convs)


def test_fcd_state_dict_uses_adaptsegnet_names():
    keys = set(FCDiscriminator().state_dict())
    assert keys == {f"{n}.{p}" for n in ("conv1", "conv2", "conv3", "conv4", "classifier") for p in ("weight", "bias")}


def test_resolve_discriminator_name():
    assert resolve_discriminator_name(0) == "fcd"
    assert resolve_discriminator_name(1) == "dsc"
    assert resolve_discriminator_name("0") == "fcd"
    assert resolve_discriminator_name("1") == "dsc"
    assert resolve_discriminator_name("dsc") == "dsc"
    assert resolve_discriminator_name("fcd") == "fcd"
    assert resolve_discriminator_name("none") == "none"
    for bad in (2, "2", "gan", True, None, 0.0):
        with pytest.raises(ValueError, match="fcd"):
            resolve_discriminator_name(bad)
    assert isinstance(build_discriminator(0), FCDiscriminator)
    assert isinstance(build_discriminator("dsc", num_classes=7), DSCDiscriminator)
    with pytest.raises(ValueError):
        build_discriminator("none")


def test_discriminator_names_as_an_argparse_type(capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--discriminator", type=discriminator_type, default="fcd")
    assert parser.parse_args(["--discriminator", "1"]).discriminator == "dsc"
    with pytest.raises(SystemExit):
        parser.parse_args(["--discriminator", "3"])
    assert "expected one of" in capsys.readouterr().err


# --- Complexity report ----------------------------------------------------------------------------

def test_complexity_numbers_of_the_report():
    pytest.importorskip("thop")
    from model.flops import complexity_table, count_complexity

    rows = {row.model: row for row in complexity_table(*REPORT_SIZE, NUM_CLASSES, models=("fcd", "dsc"))}
    assert rows["fcd"].params == 2_781_121
    assert round(rows["fcd"].gflops, 2) == 30.89
    assert rows["dsc"].params == 189_424
    assert round(rows["dsc"].gflops, 3) == 2.147

    model = FCDiscriminator()
    keys = set(model.state_dict())
    count_complexity(model, (NUM_CLASSES, *REPORT_SIZE))
    assert set(model.state_dict()) == keys  # thop's buffers went to a copy, not to the model
    assert next(model.parameters()).device.type == "cpu"


# --- Checkpoint formats ---------------------------------------------------------------------------

# Written independently of model/loading.py: our name prefix -> the course's, from the key list.
OURS_TO_COURSE = (
    ("spatial_path.block1.conv.", "saptial_path.convblock1.conv1."),
    ("spatial_path.block1.bn.", "saptial_path.convblock1.bn."),
    ("spatial_path.block2.conv.", "saptial_path.convblock2.conv1."),
    ("spatial_path.block2.bn.", "saptial_path.convblock2.bn."),
    ("spatial_path.block3.conv.", "saptial_path.convblock3.conv1."),
    ("spatial_path.block3.bn.", "saptial_path.convblock3.bn."),
    ("arm16.", "attention_refinement_module1."),
    ("arm32.", "attention_refinement_module2."),
    ("aux_head16.", "supervision1."),
    ("aux_head32.", "supervision2."),
    ("ffm.fuse.conv.", "feature_fusion_module.convblock.conv1."),
    ("ffm.fuse.bn.", "feature_fusion_module.convblock.bn."),
    ("ffm.attn_conv1.", "feature_fusion_module.conv1."),
    ("ffm.attn_conv2.", "feature_fusion_module.conv2."),
    ("classifier.", "conv."),
)
RESNET18_FC = {"weight": (1000, 512), "bias": (1000,)}


def to_course_state_dict(state_dict):
    """Our BiSeNet-R18 state_dict -> what the course repository's model.state_dict() holds."""
    features, aliases, rest = {}, {}, {}
    for key, tensor in state_dict.items():
        if key.startswith("context_path."):
            trunk_key = key[len("context_path."):]
            features["context_path.features." + trunk_key] = tensor.clone()
            aliases["context_path." + trunk_key] = tensor.clone()
            continue
        matches = [(ours, course) for ours, course in OURS_TO_COURSE if key.startswith(ours)]
        assert len(matches) == 1, key
        ours, course = matches[0]
        rest[course + key[len(ours):]] = tensor.clone()
    for name, shape in RESNET18_FC.items():
        features[f"context_path.features.fc.{name}"] = torch.randn(shape)
    return {**rest, **features, **aliases}


@pytest.fixture(scope="module")
def reference():
    """A random BiSeNet-R18, an input, and its eval output."""
    torch.manual_seed(0)
    model = randomize_(BiSeNet(context_path="resnet18")).eval()
    x = torch.randn(2, 3, *SMALL)
    with torch.no_grad():
        expected = model(x)
    return model, x, expected


def test_generated_course_keys_match_the_reference_list(reference):
    model, _, _ = reference
    generated = {k: (list(v.shape), str(v.dtype)) for k, v in to_course_state_dict(model.state_dict()).items()}
    listed = {k: (shape, dtype) for k, shape, dtype in json.loads(COURSE_KEYS_JSON.read_text())["keys"]}
    assert generated == listed


def _output(model, x):
    with torch.no_grad():
        return model(x)


def test_load_all_three_formats_identically(reference, tmp_path):
    model, x, expected = reference
    course = to_course_state_dict(model.state_dict())
    files = {
        "project": {"format": CHECKPOINT_FORMAT, **bisenet_checkpoint_entry(model, "imagenet")},
        "course-state-dict": course,
        "course-checkpoint": {
            "model_state": {"module." + k: v for k, v in course.items()},
            "model_d_state": {"module.conv1.weight": torch.zeros(1)},
            "optimizer_state": {"state": {}, "param_groups": []},
            "optimizer_d_state": {"state": {}, "param_groups": []},
            "total_epoch_so_far": 12,
        },
    }
    for file_format, content in files.items():
        path = tmp_path / f"{file_format}.pth"
        torch.save(content, path)
        loaded = load_bisenet(path)
        assert not loaded.training
        assert loaded.checkpoint_info == {
            "format": file_format,
            "context_path": "resnet18",
            "num_classes": NUM_CLASSES,
            "input_convention": "imagenet" if file_format == "project" else "course",
        }
        assert torch.equal(_output(loaded, x), expected), file_format


def test_convert_course_state_dict_handles_prefix_and_aliases(reference):
    model, _, _ = reference
    course = to_course_state_dict(model.state_dict())
    converted = convert_course_state_dict({"module." + k: v for k, v in course.items()})
    assert converted.keys() == model.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())

    course["context_path.layer2.0.conv1.weight"] = course["context_path.layer2.0.conv1.weight"] + 1
    with pytest.raises(CheckpointError, match="layer2.0.conv1.weight"):
        convert_course_state_dict(course)


def test_project_checkpoint_with_a_second_network(reference, tmp_path):
    model, x, expected = reference
    path = tmp_path / "mpl.pth"
    other = BiSeNet(num_classes=5)
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            **bisenet_checkpoint_entry(other, "imagenet"),
            **bisenet_checkpoint_entry(model, "course", key="teacher"),
        },
        path,
    )
    teacher = load_bisenet(path, key="teacher")
    assert teacher.checkpoint_info["input_convention"] == "course"
    assert torch.equal(_output(teacher, x), expected)
    assert load_bisenet(path).num_classes == 5


def test_model_config():
    model = BiSeNet(num_classes=7, context_path="resnet18")
    assert model_config(model, "course") == {"context_path": "resnet18", "num_classes": 7, "input_convention": "course"}
    with pytest.raises(ValueError, match="imagenet"):
        model_config(model, "bgr")


def test_expectations_that_differ_from_the_weights(reference, tmp_path):
    model, _, _ = reference
    path = tmp_path / "course.pth"
    torch.save(to_course_state_dict(model.state_dict()), path)
    with pytest.raises(CheckpointError, match="resnet18 and 19 classes"):
        load_bisenet(path, expect_num_classes=7)
    with pytest.raises(CheckpointError, match="resnet101"):
        load_bisenet(path, expect_context_path="resnet101")
    assert load_bisenet(path, expect_context_path="resnet18", expect_num_classes=NUM_CLASSES).num_classes == NUM_CLASSES


def test_unusable_files_raise_checkpoint_error_naming_them(reference, tmp_path):
    model, _, _ = reference
    course = to_course_state_dict(model.state_dict())
    junk = tmp_path / "junk.pth"
    junk.write_bytes(bytes(range(256)) * 8)
    not_a_dict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_a_dict)
    unknown_dict = tmp_path / "unknown.pth"
    torch.save({"weights": torch.zeros(3)}, unknown_dict)
    extra_key = tmp_path / "extra.pth"
    torch.save({**course, "dropout.weight": torch.zeros(3)}, extra_key)
    missing_key = tmp_path / "missing.pth"
    torch.save({k: v for k, v in course.items() if not k.startswith("supervision2.")}, missing_key)
    bad_shape = tmp_path / "shape.pth"
    torch.save({**course, "supervision1.weight": torch.zeros(NUM_CLASSES, 128, 1, 1)}, bad_shape)
    wrong_format = tmp_path / "format.pth"
    torch.save({"format": "other/9", "model": model.state_dict()}, wrong_format)
    bad_config = tmp_path / "config.pth"
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
                "model_config": {"context_path": "resnet101", "num_classes": 19, "input_convention": "imagenet"}},
               bad_config)

    cases = {
        junk: None, not_a_dict: "dict", unknown_dict: "not a recognised", extra_key: "dropout",
        missing_key: "supervision2|aux_head32", bad_shape: "shape", wrong_format: "other/9", bad_config: "resnet101",
    }
    for path, detail in cases.items():
        with pytest.raises(CheckpointError, match=detail) as info:
            load_bisenet(path)
        assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_bisenet(tmp_path / "absent.pth")
