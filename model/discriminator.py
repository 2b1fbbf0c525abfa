"""Output-space discriminators for adversarial domain adaptation.

Both take softmax maps (B, K, H, W) and return per-pixel domain logits (B, 1, H, W) at the
input's size. ``FCDiscriminator`` is AdaptSegNet's fully convolutional one, with the same
attribute names (conv1..conv4, classifier) so its state_dicts are interchangeable;
``DSCDiscriminator`` factorises each of its convolutions into depthwise + pointwise.
"""

from torch import nn

from dataset.labels import NUM_CLASSES
from model.depthwise import KERNEL_SIZE, PADDING, STRIDE, DepthwiseConv  # 4, 2, 1: each layer halves the resolution
from model.resize import BilinearResize

LEAKY_SLOPE = 0.2
STRIDED_LAYERS = 5
# Smallest input side: the fifth 4x4 convolution needs a 2-pixel input (4 with its padding).
MIN_INPUT_SIDE = STRIDE ** STRIDED_LAYERS
NO_DISCRIMINATOR = "none"
# Numeric codes of the old course scripts' --discriminator option.
_LEGACY_CODES = {"0": "fcd", "1": "dsc"}


class _PatchDiscriminator(nn.Module):
    """Five stride-2 4x4 convolutions, K -> ndf -> 2ndf -> 4ndf -> 8ndf -> 1, LeakyReLU between."""

    def __init__(self, num_classes=NUM_CLASSES, ndf=64):
        super().__init__()
        self.num_classes = num_classes
        widths = (num_classes, ndf, ndf * 2, ndf * 4, ndf * 8)
        for index, (in_channels, out_channels) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            self.add_module(f"conv{index}", self.make_conv(in_channels, out_channels))
        self.classifier = self.make_conv(widths[-1], 1)
        self.leaky_relu = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
        self.upsample = BilinearResize()

    def make_conv(self, in_channels, out_channels):
        raise NotImplementedError

    def forward(self, x):
        y = self.leaky_relu(self.conv1(x))  # (B, ndf, H/2, W/2)
        y = self.leaky_relu(self.conv2(y))  # (B, 2ndf, H/4, W/4)
        y = self.leaky_relu(self.conv3(y))  # (B, 4ndf, H/8, W/8)
        y = self.leaky_relu(self.conv4(y))  # (B, 8ndf, H/16, W/16)
        y = self.classifier(y)              # (B, 1, H/32, W/32)
        # To the input's size rather than x32: 720 is not a multiple of 32.
        return self.upsample(y, x.shape[-2:])  # (B, 1, H, W)


class FCDiscriminator(_PatchDiscriminator):
    """AdaptSegNet's fully convolutional discriminator (plain 4x4 convolutions with bias)."""

    def make_conv(self, in_channels, out_channels):
        return nn.Conv2d(in_channels, out_channels, KERNEL_SIZE, STRIDE, PADDING)


class DepthwiseSeparableConv(nn.Sequential):
    """Depthwise 4x4 stride-2 conv (one filter per channel) then pointwise 1x1 conv; no biases.
    The depthwise one runs natively, as one dense convolution or by Triton kernels
    (``model.depthwise.set_depthwise``, --depthwise); same parameters either way."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.depthwise = DepthwiseConv(in_channels)
        self.pointwise = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)


class DSCDiscriminator(_PatchDiscriminator):
    """The FCDiscriminator with depthwise-separable convolutions (~15x fewer parameters)."""

    def make_conv(self, in_channels, out_channels):
        return DepthwiseSeparableConv(in_channels, out_channels)


DISCRIMINATORS = {"fcd": FCDiscriminator, "dsc": DSCDiscriminator}
DISCRIMINATOR_CHOICES = (*DISCRIMINATORS, NO_DISCRIMINATOR)


class DiscriminatorChoiceError(ValueError):
    """A name that is no discriminator; the command line turns it into an argparse error."""


def resolve_discriminator_name(value):
    """"fcd", "dsc" or "none" from a name or the old numeric codes (0/"0" = fcd, 1/"1" = dsc).

    The command line wraps it as an argparse ``type=`` (``uda.adversarial.discriminator_type``).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        name = value.strip().lower()
        name = _LEGACY_CODES.get(name, name)
        if name in DISCRIMINATOR_CHOICES:
            return name
    raise DiscriminatorChoiceError(
        f"unknown discriminator {value!r}; expected one of {DISCRIMINATOR_CHOICES} "
        f"or the old codes 0 (fcd) and 1 (dsc)"
    )


def build_discriminator(name, num_classes=NUM_CLASSES, **kwargs):
    """The discriminator called ``name`` (a name or an old numeric code; not "none")."""
    name = resolve_discriminator_name(name)
    if name == NO_DISCRIMINATOR:
        raise ValueError("build_discriminator('none'): the run has no discriminator; do not build one")
    return DISCRIMINATORS[name](num_classes=num_classes, **kwargs)
