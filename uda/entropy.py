"""ADVENT's direct entropy minimisation (Vu et al., CVPR 2019, "MinEnt").

The loss is the normalised entropy of the target predictions, ``-sum_k p_k log p_k / log K`` per
pixel (1 for a uniform prediction, 0 for a one-hot one), averaged over the pixels of the batch:
ADVENT's ``entropy_loss`` (there with log2 / log2(K), the same ratio). Minimising it pushes the
target predictions away from the decision boundaries, as confident source predictions are.
ADVENT weights it 1e-3 on DeepLab's main output; BiSeNet's auxiliary heads are left out, so the
weight means the same thing whatever head weighting the segmentation loss uses.
"""
import math

import torch.nn.functional as F

from engine.steps import main_output

DEFAULT_ENTROPY_WEIGHT = 0.0  # off; ADVENT's MinEnt uses 1e-3 on real GTA5 -> Cityscapes


def normalized_entropy(logits):
    """[B, K, H, W] logits -> [B, H, W] normalised entropy in [0, 1] (float32)."""
    log_probabilities = F.log_softmax(logits.float(), dim=1)
    return -(log_probabilities.exp() * log_probabilities).sum(1) / math.log(logits.shape[1])


def entropy_loss(logits):
    """Mean normalised entropy over every pixel of the batch."""
    return normalized_entropy(logits).mean()


def entropy_terms(weight):
    """The ``target_terms`` hook of ``uda.adversarial.adversarial_step``: the weighted entropy of the
    target batch's main prediction, logged as ``loss_entropy``."""
    def terms(target_outputs):
        return {"loss_entropy": (weight, entropy_loss(main_output(target_outputs)))}
    return terms
