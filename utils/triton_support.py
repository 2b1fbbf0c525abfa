"""Whether Triton kernels can run here: shared by the fused loss (engine/) and the DSC depthwise
kernels (model/). Triton itself is imported only to answer, never at module import."""
import os

import torch


def triton_available():
    """Whether Triton can be imported (the kernels' only requirement besides a CUDA device)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreted():
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1: the tests)."""
    try:
        from triton import knobs  # Triton >= 3.4: the setting, however it was made
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
    return bool(knobs.runtime.interpret)


def triton_unavailable(device):
    """Why Triton kernels cannot run on ``device`` (a sentence), or None when they can."""
    if not triton_available():
        return "it needs Triton, which is not installed"
    if torch.device(device).type != "cuda" and not interpreted():
        return f"its Triton kernels need a CUDA device (got {torch.device(device).type})"
    return None
