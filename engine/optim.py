"""Optimizers by registry and the polynomial learning-rate schedule.

The schedule is a pure function of the iteration, applied before every step, so a resumed run
gets exactly the learning rate an uninterrupted one would.
"""
import torch

OPTIMIZERS = ("sgd", "adam", "rmsprop")
POLY_POWER = 0.9

# Defaults of the report: SGD for the segmentation network, Adam for the discriminator.
SGD_MOMENTUM = 0.9
SGD_WEIGHT_DECAY = 1e-4
ADAM_BETAS = (0.9, 0.99)


def build_optimizer(name, parameters, lr, weight_decay=None, momentum=SGD_MOMENTUM):
    name = name.lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
    parameters = [p for p in parameters if p.requires_grad]
    # Fused kernels update every parameter in one pass, where foreach still launches a few kernels
    # per step and a for-loop one per parameter. RMSprop has no fused kernel: foreach batches its
    # updates into a few launches instead.
    if name == "sgd":
        wd = SGD_WEIGHT_DECAY if weight_decay is None else weight_decay
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=wd, fused=True)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, betas=ADAM_BETAS, weight_decay=weight_decay or 0.0, fused=True)
    return torch.optim.RMSprop(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay or 0.0, foreach=True)


def poly_lr(base_lr, iteration, max_iterations, power=POLY_POWER):
    """lr = base * (1 - it / max_it) ** power, the schedule of DeepLab/BiSeNet/AdaptSegNet."""
    return base_lr * (1.0 - min(iteration, max_iterations) / max_iterations) ** power


def set_lr(optimizer, lr):
    """Every param group's learning rate; a tensor one (a CUDA-graph step reads it from its address,
    engine.cuda_graph) is filled in place."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def portable_state_dict(optimizer):
    """``optimizer.state_dict()`` as an eager run writes it: learning rates as floats and capturable
    off, where a CUDA-graph step (engine.cuda_graph) changed its param groups, so the checkpoint
    resumes in either mode and on any device."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:  # copies: the optimizer's own groups keep their tensors
        if torch.is_tensor(group["lr"]):
            group["lr"] = float(group["lr"])
        if group.get("capturable"):
            group["capturable"] = False
    return state
