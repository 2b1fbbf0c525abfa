"""BiSeNet (Yu et al., ECCV 2018) with a ResNet-18 or ResNet-101 context path.

Numerically the same network as the old course repository (itself derived from
ooooverflow/BiSeNet), so its checkpoints load through ``model.loading``; only the attribute names
differ (ours are listed in ``model.loading``'s conversion table). Shapes in comments use
B = batch, K = classes, H x W = input size.
"""
import logging
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from dataset.labels import NUM_CLASSES
from model.resize import BilinearResize, LowResLogits, set_matmul_resize
from model.resnet import IMAGENET1K_V1_URLS, ResNetTrunk
from utils.checkpoint import CheckpointError, load_checkpoint_file

logger = logging.getLogger(__name__)

CONTEXT_PATHS = ("resnet18", "resnet101")
PRETRAINED_CHOICES = ("none", "imagenet")  # or a path to a torchvision ResNet state_dict

SPATIAL_CHANNELS = (64, 128, 256)  # spatial path widths; each block halves the resolution
# Channels of the context path's 1/16 (layer3) and 1/32 (layer4) features.
CONTEXT_CHANNELS = {"resnet18": (256, 512), "resnet101": (1024, 2048)}
# Input channels of the feature fusion module: spatial + 1/16 + 1/32 features
# (1024 for ResNet-18, 3328 for ResNet-101). ``model.loading`` infers the backbone from it.
FFM_IN_CHANNELS = {name: SPATIAL_CHANNELS[-1] + sum(c) for name, c in CONTEXT_CHANNELS.items()}

# torchvision's ImageNet classifier; BiSeNet has no use for it.
_TRUNK_CLASSIFIER_PREFIX = "fc."


def check_context_path(context_path):
    """Raise ValueError naming the valid choices unless ``context_path`` is one of CONTEXT_PATHS."""
    if context_path not in CONTEXT_PATHS:
        raise ValueError(f"unknown context path {context_path!r}; expected one of {CONTEXT_PATHS}")


class ConvBNReLU(nn.Sequential):
    """conv (no bias: the BatchNorm right after makes it redundant) + BatchNorm + ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)


class SpatialPath(nn.Sequential):
    """Three stride-2 ConvBNReLU blocks: (B, 3, H, W) -> (B, 256, H/8, W/8)."""

    def __init__(self, in_channels=3, widths=SPATIAL_CHANNELS):
        super().__init__()
        for index, out_channels in enumerate(widths, start=1):
            self.add_module(f"block{index}", ConvBNReLU(in_channels, out_channels, stride=2))
            in_channels = out_channels


class ContextPath(ResNetTrunk):
    """The ResNet trunk (``model.resnet``: torchvision's, without its classifier), returning the
    1/16 and 1/32 features and the 1/32 features' global average.

    The trunk's modules carry torchvision's names, so a torchvision ResNet state_dict (minus
    ``fc.*``) loads into it directly.
    """

    def __init__(self, name="resnet18"):
        check_context_path(name)
        super().__init__(name)

    def forward(self, x):
        feat16, feat32 = super().forward(x)                     # (B, C16, H/16, W/16), (B, C32, H/32, W/32)
        # Global average pool as two means (width, then height), exactly as the course code
        # computes it, so results match its checkpoints bit for bit.
        tail = feat32.mean(dim=3, keepdim=True).mean(dim=2, keepdim=True)  # (B, C32, 1, 1)
        return feat16, feat32, tail


class AttentionRefinementModule(nn.Module):
    """Channel attention: x * sigmoid(BN(conv1x1(global_avg_pool(x)))); shape preserved.

    The BatchNorm acts on a (B, C, 1, 1) tensor, so in training mode it needs B > 1.
    """

    def __init__(self, channels):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv2d(channels, channels, kernel_size=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        attention = torch.sigmoid(self.bn(self.conv(self.pool(x))))  # (B, C, 1, 1)
        return x * attention


class FeatureFusionModule(nn.Module):
    """Fuse spatial and context features into class scores with a residual channel attention.

    (B, Cs, h, w) + (B, Cc, h, w) -> concat -> ConvBNReLU -> (B, K, h, w) = f;
    out = f * sigmoid(conv2(relu(conv1(avg_pool(f))))) + f.
    """

    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.fuse = ConvBNReLU(in_channels, num_classes, stride=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.attn_conv1 = nn.Conv2d(num_classes, num_classes, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)
        self.attn_conv2 = nn.Conv2d(num_classes, num_classes, kernel_size=1)

    def forward(self, spatial, context):
        features = self.fuse(torch.cat((spatial, context), dim=1))  # (B, K, h, w)
        attention = self.relu(self.attn_conv1(self.pool(features)))   # (B, K, 1, 1)
        attention = torch.sigmoid(self.attn_conv2(attention))         # (B, K, 1, 1)
        return features * attention + features


def _init_weights(module):
    # The course's initialisation of everything outside the (separately initialised) trunk.
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class BiSeNet(nn.Module):
    """BiSeNet: ``forward`` returns (main, aux16, aux32) logits in training mode, main in eval.

    All outputs are (B, K, H, W) for a (B, 3, H, W) input of any size. ``forward(x, aux=False)``
    says the caller reads the main output only: in training mode the auxiliary heads are then
    skipped and main alone is returned (``engine.steps.main_output`` reads either form).

    Speed levers (plain attributes, not in the state_dict: checkpoints are the same either way;
    ``set_speed_levers``, docs/speed.md):
    * ``skip_unread_aux`` (on): honour ``aux=False``. Bitwise exact: the heads are 1x1 convolutions
      without BatchNorm on features the main path computes anyway, and an output no loss reads
      adds nothing to any gradient;
    * ``classifier_first`` (off): the 1x1 classifier on the 1/8 map, then the upsampling. The same
      function, since bilinear weights sum to 1 per output pixel (``classifier(resize(f)) =
      W resize(f) + b = resize(W f + b)``), with 64x fewer classifier multiply-adds; other rounding;
    * matrix-product resizing of every ``BilinearResize`` (off; ``model.resize``): other rounding;
    * ``fused_loss`` (off): the training steps of ``engine.steps`` call ``forward(x, low_res=True)``
      and read the heads' logits before their last upsampling (``LowResLogits``), which the fused
      upsample + cross-entropy kernel of ``engine.fused_loss`` takes. The main head is then the
      classifier-first order (the only one with low-resolution logits).

    ``forward(x, low_res=True)`` in training mode returns ``LowResLogits`` in place of tensors
    (``LowResLogits.full()`` is the tensor); in eval mode it returns the usual tensor.
    """

    def __init__(self, num_classes=NUM_CLASSES, context_path="resnet18"):
        super().__init__()
        check_context_path(context_path)
        self.num_classes = num_classes
        self.context_path_name = context_path
        channels16, channels32 = CONTEXT_CHANNELS[context_path]

        self.spatial_path = SpatialPath()
        self.context_path = ContextPath(context_path)
        self.arm16 = AttentionRefinementModule(channels16)
        self.arm32 = AttentionRefinementModule(channels32)
        # Auxiliary heads (deep supervision of the context path), used in training only.
        self.aux_head16 = nn.Conv2d(channels16, num_classes, kernel_size=1)
        self.aux_head32 = nn.Conv2d(channels32, num_classes, kernel_size=1)
        self.ffm = FeatureFusionModule(FFM_IN_CHANNELS[context_path], num_classes)
        self.classifier = nn.Conv2d(num_classes, num_classes, kernel_size=1)
        self.resize = BilinearResize()
        self.skip_unread_aux = True
        self.classifier_first = False
        self.fused_loss = False

        for child in self.children():
            if child is not self.context_path:  # the trunk keeps its own (torchvision's) initialisation
                child.apply(_init_weights)

    def set_speed_levers(self, *, skip_unread_aux=None, classifier_first=None, matmul_resize=None, fused_loss=None):
        """Set the levers given (None: unchanged); returns the network."""
        if fused_loss is not None:
            self.fused_loss = bool(fused_loss)
        if skip_unread_aux is not None:
            self.skip_unread_aux = bool(skip_unread_aux)
        if classifier_first is not None:
            self.classifier_first = bool(classifier_first)
        if matmul_resize is not None:
            set_matmul_resize(self, matmul_resize)
        return self

    def forward(self, x, aux=True, low_res=False):
        input_size = x.shape[-2:]
        low_res = low_res and self.training
        spatial = self.spatial_path(x)                    # (B, 256, H/8, W/8)
        feat16, feat32, tail = self.context_path(x)       # (B, C16, H/16, W/16), (B, C32, H/32, W/32), (B, C32, 1, 1)
        feat16 = self.arm16(feat16)
        feat32 = self.arm32(feat32) * tail
        feat16 = self.resize(feat16, spatial.shape[-2:])  # (B, C16, H/8, W/8)
        feat32 = self.resize(feat32, spatial.shape[-2:])  # (B, C32, H/8, W/8)

        fused = self.ffm(spatial, torch.cat((feat16, feat32), dim=1))  # (B, K, H/8, W/8)
        # The course upsamples by a factor 8; resizing to the input size is the same operation
        # (bit for bit) when H and W are multiples of 8, and still gives (H, W) when they are not.
        if low_res:
            main = LowResLogits(self.classifier(fused), input_size, self.resize)  # (B, K, H/8, W/8), to (H, W)
        elif self.classifier_first:
            main = self.resize(self.classifier(fused), input_size)     # (B, K, H, W)
        else:
            main = self.classifier(self.resize(fused, input_size))     # (B, K, H, W)
        if not self.training or (not aux and self.skip_unread_aux):
            return main

        if low_res:
            return (main, LowResLogits(self.aux_head16(feat16), input_size, self.resize),
                    LowResLogits(self.aux_head32(feat32), input_size, self.resize))
        aux16 = self.resize(self.aux_head16(feat16), input_size)       # (B, K, H, W)
        aux32 = self.resize(self.aux_head32(feat32), input_size)       # (B, K, H, W)
        return main, aux16, aux32


def imagenet_weights_path(context_path):
    """Where torchvision's IMAGENET1K_V1 file for the trunk must be: the local hub cache."""
    check_context_path(context_path)
    filename = Path(urlparse(IMAGENET1K_V1_URLS[context_path]).path).name
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _trunk_state_dict(context_path, pretrained):
    """The torchvision ResNet state_dict named by ``pretrained`` ("imagenet" or a path) and its path."""
    if pretrained == "imagenet":
        path = imagenet_weights_path(context_path)
        if not path.is_file():
            # Never download: runs must be reproducible offline and on machines without internet.
            raise FileNotFoundError(
                f"ImageNet weights for {context_path} not found at {path}; put torchvision's "
                f"{path.name} there ({IMAGENET1K_V1_URLS[context_path]}), or train from "
                f"scratch with --pretrained none"
            )
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(
                f"--pretrained {pretrained!r}: no such file; expected one of {PRETRAINED_CHOICES} "
                f"or the path of a torchvision ResNet state_dict"
            )
    state_dict = load_checkpoint_file(path, map_location="cpu")
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path} is not a torchvision ResNet state_dict (got {type(state_dict).__name__})")
    return state_dict, path


def load_trunk_weights(model, pretrained):
    """Load ImageNet (or file) weights into ``model.context_path``; log missing/unexpected keys."""
    state_dict, path = _trunk_state_dict(model.context_path_name, pretrained)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_TRUNK_CLASSIFIER_PREFIX)}
    try:
        result = model.context_path.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches, e.g. a ResNet-101 file for a ResNet-18
        raise CheckpointError(f"{path} does not fit the {model.context_path_name} trunk: {error}") from None
    trunk_keys = model.context_path.state_dict().keys()
    if len(result.missing_keys) == len(trunk_keys):
        raise CheckpointError(f"{path} holds no {model.context_path_name} trunk weights (no key matched)")
    if result.missing_keys:
        logger.warning("%s: trunk keys missing from the file: %s", path, result.missing_keys)
    if result.unexpected_keys:
        logger.warning("%s: unexpected keys ignored: %s", path, result.unexpected_keys)
    logger.info("loaded %s trunk weights from %s", model.context_path_name, path)


def build_bisenet(context_path="resnet18", num_classes=NUM_CLASSES, pretrained="none"):
    """A BiSeNet whose trunk is random ("none"), ImageNet ("imagenet", from the local hub cache
    only, never downloaded) or loaded from a torchvision ResNet state_dict file (a path)."""
    check_context_path(context_path)
    model = BiSeNet(num_classes=num_classes, context_path=context_path)
    if pretrained not in (None, "none"):
        load_trunk_weights(model, pretrained)
    return model
