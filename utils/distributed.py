"""Process-group set-up read from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

Plain ``python script.py`` runs are a world of size 1 and every helper here is then a no-op,
so the scripts have one code path for one device and for many.
"""
import os

import torch
import torch.distributed as dist


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
    return device


def resolve_device(device_arg="auto"):
    if device_arg in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device_arg)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device_arg}: CUDA is not available on this machine; use --device cpu")
    return device


def cleanup_distributed():
    if is_distributed():
        dist.destroy_process_group()


def barrier():
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src=0):
    """Send a picklable object from ``src`` to every rank (identity when not distributed)."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def wrap_ddp(module, device, find_unused_parameters=False):
    """DistributedDataParallel around ``module`` under torchrun; the module itself otherwise.

    Checkpoints always store the unwrapped module (see ``utils.engine.unwrap``).
    ``find_unused_parameters`` is needed where a backward pass leaves some heads out (the
    target branch of adversarial training uses only BiSeNet's main output).
    """
    if module is None or not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)
