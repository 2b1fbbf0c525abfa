"""Mixed precision as a null object: one code path for fp32 on CPU and bf16/fp16 on CUDA.

``--amp auto`` means bf16 autocast on a CUDA device that supports it (no loss scaling needed),
fp16 with GradScaler on older CUDA devices, and plain fp32 on the CPU, where autocast only
slows convolutions down. ``--amp bf16`` may still be asked for on the CPU (CPU autocast supports
bf16): the same code path as on a GPU, which is how the tests cover it without one.
"""
import contextlib

import torch

from utils.errors import OptionError

AMP_CHOICES = ("auto", "off", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, device, mode="auto"):
        if mode not in AMP_CHOICES:
            raise OptionError(f"unknown --amp {mode!r}; expected one of {AMP_CHOICES}")
        self.device = torch.device(device)
        if mode == "auto":
            if self.device.type != "cuda":
                mode = "off"
            else:
                mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if mode == "fp16" and self.device.type != "cuda":
            raise OptionError(f"--amp fp16 needs a CUDA device (got {self.device}); use --amp off or bf16 on the CPU")
        self.mode = mode
        # Autocast keeps each weight's low-precision cast for the rest of its region; a CUDA-graph
        # capture (engine.cuda_graph) turns that off, since a cast made once would never be redone.
        self.autocast_cache = True

    @property
    def enabled(self):
        return self.mode != "off"

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.mode], cache_enabled=self.autocast_cache)

    def grad_scaler(self):
        """A GradScaler that is active only for fp16 (bf16 has fp32's range and needs none)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.mode == "fp16")

    def __repr__(self):
        return f"Precision({self.mode} on {self.device})"
