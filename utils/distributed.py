"""Process-group set-up read from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

Plain ``python script.py`` runs are a world of size 1 and every helper here is then a no-op,
so the scripts have one code path for one device and for many. Under torchrun only rank 0 prints
(torchvision's ``setup_for_distributed``); warnings, errors and tracebacks (stderr) stay visible
on every rank. See docs/multi-gpu.md for the launch commands and what "global step" means.
"""
import builtins
import logging
import os
import sys
import types

import torch
import torch.distributed as dist
from torch import nn
from utils.errors import OptionError



def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main_process():
    return get_rank() == 0


def init_distributed(device_arg="auto"):
    """Initialise the process group if launched by torchrun; return the torch.device to use.

    ``device_arg``: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N". Under torchrun
    each process takes the CUDA device of its LOCAL_RANK and the NCCL backend; on CPU, gloo.
    """
    device = resolve_device(device_arg)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not is_distributed():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        setup_for_distributed(get_rank() == 0)
    elif device.type == "cuda" and device.index is not None:
        # --device cuda:N in one process: N becomes the current device, where Triton kernels
        # (--fused-loss, --depthwise triton) launch and a CUDA graph (--cuda-graph) is captured.
        torch.cuda.set_device(device)
    return device


_saved_console = None  # (print, sys.stdout, root log level) from before setup_for_distributed


def setup_for_distributed(is_main):
    """Silence console output off rank 0, as torchvision's reference scripts do.

    Off rank 0, stdout goes to os.devnull (``print`` and ``tqdm.write`` alike) and the root logger
    shows only WARNING and above; stderr is left alone, so warnings, errors and tracebacks of every
    rank still reach the console. ``print(..., force=True)`` prints on any rank.
    """
    global _saved_console
    if _saved_console is None:
        _saved_console = (builtins.print, sys.stdout, logging.getLogger().level)
    builtin_print, real_stdout = _saved_console[0], _saved_console[1]

    def print(*args, force=False, **kwargs):  # noqa: A001 - replaces the builtin on purpose
        if force and not is_main and kwargs.get("file") in (None, sys.stdout):
            kwargs["file"] = real_stdout
        builtin_print(*args, **kwargs)

    builtins.print = print
    if not is_main:
        sys.stdout = open(os.devnull, "w")
        logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))


def _restore_console():
    global _saved_console
    if _saved_console is None:
        return
    builtin_print, stdout, level = _saved_console
    if sys.stdout is not stdout:
        sys.stdout.close()
    builtins.print, sys.stdout = builtin_print, stdout
    logging.getLogger().setLevel(level)
    _saved_console = None


def resolve_device(device_arg="auto"):
    if device_arg in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device_arg)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise OptionError(f"--device {device_arg}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {device_arg}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise OptionError(f"--device {device_arg}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def cleanup_distributed():
    if is_distributed():
        dist.destroy_process_group()
    _restore_console()


def barrier():
    if is_distributed():
        dist.barrier()


def all_reduce_mean(tensors):
    """{name: tensor} -> {name: mean of the tensor over all ranks}, in one collective (identity alone)."""
    if not is_distributed() or not tensors:
        return tensors
    names = list(tensors)
    stacked = torch.stack([torch.as_tensor(tensors[name]).detach().float() for name in names])
    dist.all_reduce(stacked)
    stacked /= get_world_size()
    return dict(zip(names, stacked))


def all_reduce_max(value, device):
    """The largest of the ranks' integer ``value``s (``value`` itself when not distributed)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def broadcast_object(obj, src=0):
    """Send a picklable object from ``src`` to every rank (identity when not distributed)."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def wrap_ddp(module, device, find_unused_parameters=False):
    """DistributedDataParallel around ``module`` under torchrun; the module itself otherwise.

    Checkpoints always store the unwrapped module (see ``engine.steps.unwrap``).
    ``find_unused_parameters`` is needed where a backward pass leaves some heads out (the
    target branch of adversarial training uses only BiSeNet's main output).
    """
    if module is None or not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def _stay_in_eval(module, mode=True):
    """``train()`` of a frozen BatchNorm: whatever the caller asks, the layer stays in eval mode."""
    return nn.Module.train(module, False)


def configure_batchnorm(module, device, sync_bn=False, freeze_bn=False):
    """Apply --sync-bn or --freeze-bn to ``module`` (before DDP wrapping and before the optimizer).

    * ``sync_bn``: BatchNorm statistics over the global batch of all ranks
      (``nn.SyncBatchNorm.convert_sync_batchnorm``). PyTorch's SyncBatchNorm is CUDA-only; in a
      single process there is nothing to synchronise and the module is returned unchanged.
    * ``freeze_bn``: every BatchNorm layer stays in eval mode (running statistics used and not
      updated, even after ``model.train()``); its affine weight and bias still train. The step then
      no longer depends on how the global batch is split across ranks (nor on batch size 1).
    State-dict keys are unchanged either way, so checkpoints load with or without the flags.
    """
    if sync_bn and freeze_bn:
        raise OptionError("--sync-bn and --freeze-bn exclude each other: frozen BatchNorm layers compute no "
                         "batch statistics to synchronise")
    if freeze_bn:
        for layer in module.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.train = types.MethodType(_stay_in_eval, layer)
                layer.eval()
    if sync_bn and get_world_size() > 1:
        if device.type != "cuda":
            raise OptionError("--sync-bn needs CUDA devices: PyTorch's SyncBatchNorm does not run on the CPU "
                             "(gloo). Drop the flag (per-process BatchNorm) or use --freeze-bn")
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module
