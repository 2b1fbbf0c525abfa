"""Load a BiSeNet from this project's checkpoints or from the old course repository's files.

Three formats are recognised, always read with ``torch.load(weights_only=True)``:

* ``project``: ``{"format": CHECKPOINT_FORMAT, "model": state_dict, "model_config": {...}}``
  (other networks of the same file, e.g. an MPL teacher, under ``key`` and ``f"{key}_config"``);
* ``course-state-dict``: the course's ``model.state_dict()``, possibly with DataParallel's
  ``module.`` prefix;
* ``course-checkpoint``: ``{"model_state": <course state_dict>, "model_d_state": ...,
  "optimizer_state": ..., "optimizer_d_state": ..., "total_epoch_so_far": ...}``.

Course weights expect the course's input convention (see ``dataset.normalization``).
"""
import logging

import torch
from torch import nn

from dataset.normalization import CONVENTIONS
from model.bisenet import FFM_IN_CHANNELS, BiSeNet, check_context_path
from utils.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint_file

logger = logging.getLogger(__name__)

DATA_PARALLEL_PREFIX = "module."
COURSE_CHECKPOINT_KEY = "model_state"
# A key every course BiSeNet state_dict has and no other file plausibly has (sic: "saptial").
COURSE_MARKER_KEY = "saptial_path.convblock1.conv1.weight"
# Keys read to infer the architecture from weights alone (our names).
CLASSIFIER_KEY = "classifier.weight"
FFM_INPUT_KEY = "ffm.fuse.conv.weight"

# Course key prefix -> our key prefix, for everything outside the trunk. First match wins.
_COURSE_TO_OURS = (
    ("saptial_path.convblock1.conv1.", "spatial_path.block1.conv."),
    ("saptial_path.convblock1.bn.", "spatial_path.block1.bn."),
    ("saptial_path.convblock2.conv1.", "spatial_path.block2.conv."),
    ("saptial_path.convblock2.bn.", "spatial_path.block2.bn."),
    ("saptial_path.convblock3.conv1.", "spatial_path.block3.conv."),
    ("saptial_path.convblock3.bn.", "spatial_path.block3.bn."),
    ("attention_refinement_module1.", "arm16."),
    ("attention_refinement_module2.", "arm32."),
    ("supervision1.", "aux_head16."),
    ("supervision2.", "aux_head32."),
    ("feature_fusion_module.convblock.conv1.", "ffm.fuse.conv."),
    ("feature_fusion_module.convblock.bn.", "ffm.fuse.bn."),
    ("feature_fusion_module.conv1.", "ffm.attn_conv1."),
    ("feature_fusion_module.conv2.", "ffm.attn_conv2."),
    ("conv.", "classifier."),
)
# The course's context path holds the torchvision ResNet as ``features`` and again, as aliases of
# the same modules, under its own names; the state_dict therefore stores every trunk tensor twice.
_COURSE_TRUNK_PREFIX = "context_path.features."
_COURSE_TRUNK_ALIASES = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")
_COURSE_TRUNK_UNUSED = ("fc.",)  # torchvision's ImageNet classifier, never used by BiSeNet
_OUR_TRUNK_PREFIX = "context_path."


def model_config(model, input_convention):
    """The ``model_config`` entry that lets ``load_bisenet`` rebuild ``model`` from a checkpoint."""
    if input_convention not in CONVENTIONS:
        raise ValueError(f"unknown input convention {input_convention!r}; expected one of {CONVENTIONS}")
    model = _unwrap(model)
    return {
        "context_path": model.context_path_name,
        "num_classes": model.num_classes,
        "input_convention": input_convention,
    }


def bisenet_checkpoint_entry(model, input_convention, key="model"):
    """``{key: state_dict, f"{key}_config": model_config(...)}``: a BiSeNet's part of a checkpoint.

    Writers add ``"format": CHECKPOINT_FORMAT`` and whatever else they store.
    """
    return {key: _unwrap(model).state_dict(), f"{key}_config": model_config(model, input_convention)}


def _unwrap(model):
    # DataParallel / DistributedDataParallel keep the network as ``.module``: save that one.
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model


def _strip_data_parallel_prefix(state_dict):
    return {
        (k[len(DATA_PARALLEL_PREFIX):] if k.startswith(DATA_PARALLEL_PREFIX) else k): v
        for k, v in state_dict.items()
    }


def _course_key_to_ours(key):
    """Our name for a course key, or None for an unused trunk classifier key; raise if unknown."""
    if key.startswith(_COURSE_TRUNK_PREFIX):
        trunk_key = key[len(_COURSE_TRUNK_PREFIX):]
        if trunk_key.startswith(_COURSE_TRUNK_UNUSED):
            return None
        return _OUR_TRUNK_PREFIX + trunk_key
    if key.startswith(_OUR_TRUNK_PREFIX) and key[len(_OUR_TRUNK_PREFIX):].startswith(_COURSE_TRUNK_ALIASES):
        return key  # an alias: the course and we use the same name
    for course_prefix, our_prefix in _COURSE_TO_OURS:
        if key.startswith(course_prefix):
            return our_prefix + key[len(course_prefix):]
    raise CheckpointError(f"unknown key {key!r} for a course BiSeNet state_dict")


def convert_course_state_dict(state_dict):
    """A course BiSeNet state_dict (optionally ``module.``-prefixed) -> this project's BiSeNet names.

    The trunk's duplicated tensors must agree; ``fc.*`` is dropped. Raises CheckpointError on
    unknown keys or disagreeing duplicates (missing keys are left to ``load_state_dict``).
    """
    converted = {}
    for key, tensor in _strip_data_parallel_prefix(state_dict).items():
        our_key = _course_key_to_ours(key)
        if our_key is None:
            continue
        if our_key in converted:
            if not torch.equal(converted[our_key], tensor):
                raise CheckpointError(
                    f"course state_dict: the two copies of trunk tensor {our_key!r} differ"
                )
            continue
        converted[our_key] = tensor
    return converted


def infer_architecture(state_dict):
    """(context_path, num_classes) of a state_dict in our names, from the weights' shapes."""
    for key in (CLASSIFIER_KEY, FFM_INPUT_KEY):
        if key not in state_dict:
            raise CheckpointError(f"no {key!r} in the weights: not a BiSeNet state_dict")
    num_classes = state_dict[CLASSIFIER_KEY].shape[0]
    ffm_in_channels = state_dict[FFM_INPUT_KEY].shape[1]
    by_channels = {channels: name for name, channels in FFM_IN_CHANNELS.items()}
    if ffm_in_channels not in by_channels:
        raise CheckpointError(
            f"the feature fusion module takes {ffm_in_channels} channels, which matches no "
            f"context path ({FFM_IN_CHANNELS})"
        )
    return by_channels[ffm_in_channels], int(num_classes)


def _check_against_model(model, state_dict):
    """Raise CheckpointError listing missing/unexpected keys and shape mismatches, if any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            shown = ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError("; ".join(problems))


def _require_state_dict(state_dict, what):
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise CheckpointError(f"{what} is not a state_dict (a dict of names to tensors)")
    return state_dict


def _read_weights(checkpoint, key):
    """(format name, state_dict in our names, config dict or None) of a loaded file."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"expected a dict, got {type(checkpoint).__name__}")
    if "format" in checkpoint:
        if checkpoint["format"] != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"checkpoint format {checkpoint['format']!r} is not supported (expected {CHECKPOINT_FORMAT!r})"
            )
        config_key = f"{key}_config"
        if key not in checkpoint or config_key not in checkpoint:
            raise CheckpointError(
                f"no {key!r} network with a {config_key!r} entry in it (it holds {sorted(map(str, checkpoint))})"
            )
        return "project", _require_state_dict(checkpoint[key], repr(key)), checkpoint[config_key]
    if key != "model":
        raise CheckpointError(f"only this project's checkpoints hold several networks; there is no {key!r}")
    if COURSE_CHECKPOINT_KEY in checkpoint:
        state_dict = _require_state_dict(checkpoint[COURSE_CHECKPOINT_KEY], repr(COURSE_CHECKPOINT_KEY))
        return "course-checkpoint", convert_course_state_dict(state_dict), None
    if COURSE_MARKER_KEY in checkpoint or DATA_PARALLEL_PREFIX + COURSE_MARKER_KEY in checkpoint:
        state_dict = _require_state_dict(checkpoint, "the file")
        return "course-state-dict", convert_course_state_dict(state_dict), None
    shown = sorted(map(str, checkpoint))[:8]
    raise CheckpointError(
        f"not a recognised BiSeNet checkpoint (this project's {CHECKPOINT_FORMAT!r}, a course "
        f"state_dict or a course checkpoint with {COURSE_CHECKPOINT_KEY!r}); its first keys are {shown}"
    )


def _check_config(config, context_path, num_classes):
    required = ("context_path", "num_classes", "input_convention")
    if not isinstance(config, dict) or any(k not in config for k in required):
        raise CheckpointError(f"model config {config!r} lacks one of {required}")
    if config["input_convention"] not in CONVENTIONS:
        raise CheckpointError(f"unknown input convention {config['input_convention']!r} (expected one of {CONVENTIONS})")
    if (config["context_path"], config["num_classes"]) != (context_path, num_classes):
        raise CheckpointError(
            f"its config says {config['context_path']} with {config['num_classes']} classes but the "
            f"weights are {context_path} with {num_classes} classes"
        )
    return config["input_convention"]


def load_bisenet(path, map_location="cpu", key="model", expect_context_path=None, expect_num_classes=None):
    """A BiSeNet in eval mode from any recognised checkpoint, with ``checkpoint_info`` attached.

    ``key`` picks the network of a project checkpoint ("model", or e.g. "teacher"). The
    architecture comes from the weights; ``expect_*`` (e.g. command-line flags) must agree.
    Any unusable file raises CheckpointError naming it. The model is returned on the CPU
    (``map_location`` only affects how the file is read); move it where it is needed.
    """
    checkpoint = load_checkpoint_file(path, map_location=map_location)
    try:
        file_format, state_dict, config = _read_weights(checkpoint, key)
        context_path, num_classes = infer_architecture(state_dict)
        input_convention = "course" if config is None else _check_config(config, context_path, num_classes)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None

    if expect_context_path is not None:
        check_context_path(expect_context_path)
    asked = (
        context_path if expect_context_path is None else expect_context_path,
        num_classes if expect_num_classes is None else expect_num_classes,
    )
    if asked != (context_path, num_classes):
        raise CheckpointError(
            f"{path} holds a BiSeNet with context path {context_path} and {num_classes} classes, "
            f"but context path {asked[0]} with {asked[1]} classes was asked for"
        )

    model = BiSeNet(num_classes=num_classes, context_path=context_path)
    try:
        _check_against_model(model, state_dict)
    except CheckpointError as error:
        raise CheckpointError(f"{path} ({file_format}, {context_path}, {num_classes} classes): {error}") from None
    model.load_state_dict(state_dict)
    model.eval()
    model.checkpoint_info = {
        "format": file_format,
        "context_path": context_path,
        "num_classes": num_classes,
        "input_convention": input_convention,
    }
    logger.info(
        "loaded %s from %s (%s format, %d classes, %s input convention)",
        f"BiSeNet-{context_path}", path, file_format, num_classes, input_convention,
    )
    return model

