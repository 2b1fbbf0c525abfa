"""The one evaluation function: confusion matrix over a whole split at full label resolution.

Images are inferred at the loader's size (e.g. 1024x512) and the logits upsampled bilinearly to
the label's resolution before the argmax (the common protocol: infer at 1024x512, score at
2048x1024). Under torchrun each rank scores its shard and the matrices are summed.
"""
import contextlib

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dataset.labels import NUM_CLASSES
from engine.data import to_device
from utils.distributed import is_main_process
from engine.metrics import ConfusionMatrix


@contextlib.contextmanager
def eval_mode(*modules):
    """Put modules in eval mode and restore each one's previous mode afterwards."""
    previous = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, was_training in zip(modules, previous):
            module.train(was_training)


def predict_logits(model, images, output_size=None, precision=None):
    """Main-head logits (float32), bilinearly upsampled to ``output_size`` when given."""
    with precision.autocast() if precision is not None else contextlib.nullcontext():
        logits = model(images)
    if isinstance(logits, (tuple, list)):  # a model left in training mode returns aux heads too
        logits = logits[0]
    logits = logits.float()
    if output_size is not None and tuple(logits.shape[-2:]) != tuple(output_size):
        logits = F.interpolate(logits, size=tuple(output_size), mode="bilinear", align_corners=False)
    return logits


@torch.no_grad()
def evaluate(model, loader, device, num_classes=NUM_CLASSES, precision=None, progress=True,
             description="eval", on_batch=None):
    """Score ``model`` on a labeled loader; return the scores dict of ``engine.metrics``.

    ``on_batch(batch, prediction)`` is called with each batch and its predicted trainIds (at label
    resolution), e.g. to save prediction images.
    """
    confusion = ConfusionMatrix(num_classes, device=device)
    with eval_mode(model):
        for batch in tqdm(loader, desc=description, disable=not (progress and is_main_process()), leave=False):
            batch = to_device(batch, device)
            if "label" not in batch:
                raise ValueError("evaluation needs labels, but the loader's dataset is unlabeled")
            labels = batch["label"]
            prediction = predict_logits(model, batch["image"], labels.shape[-2:], precision).argmax(dim=1)
            confusion.update(labels, prediction)
            if on_batch is not None:
                on_batch(batch, prediction)
    confusion.all_reduce_()
    return confusion.scores()
