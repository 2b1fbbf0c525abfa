"""Networks of the project: BiSeNet (segmenter), output-space discriminators, checkpoint loading.

The complexity report is a separate module, ``python -m model.flops`` (it needs thop, which is optional).
"""
from model.bisenet import CONTEXT_PATHS, BiSeNet, build_bisenet
from model.discriminator import (
    DISCRIMINATORS,
    DSCDiscriminator,
    FCDiscriminator,
    build_discriminator,
    resolve_discriminator_name,
)
from model.loading import bisenet_checkpoint_entry, convert_course_state_dict, load_bisenet, model_config

__all__ = [
    "BiSeNet", "build_bisenet", "CONTEXT_PATHS",
    "FCDiscriminator", "DSCDiscriminator", "DISCRIMINATORS", "build_discriminator", "resolve_discriminator_name",
    "load_bisenet", "model_config", "bisenet_checkpoint_entry", "convert_course_state_dict",
]
