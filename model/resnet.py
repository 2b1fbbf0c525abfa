"""The ResNet-18/101 trunk of BiSeNet's context path, written here so that building a network does
without torchvision, whose import pulls in torch._dynamo (seconds of every script start).

It is torchvision's ResNet (v1.5: a Bottleneck strides on its 3x3 convolution) without the
classifier, module for module:

* the same module names, hence the same state_dict keys: a torchvision ResNet state_dict minus
  ``fc.*`` loads unchanged (and so do the course checkpoints, see ``model.loading``);
* the same random initialisation, bit for bit, under the same ``torch.manual_seed``: the modules
  are built in torchvision's order (their default ``reset_parameters`` draw from the global RNG),
  the ImageNet classifier included (built and dropped), then re-initialised as torchvision does;
* the same operations in ``forward``, so the same features.

tests/test_resnet.py checks all three against torchvision itself.
"""
from torch import nn

# Where torchvision downloads its IMAGENET1K_V1 weights (``ResNet18_Weights`` / ``ResNet101_Weights``), by trunk.
IMAGENET1K_V1_URLS = {"resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
                      "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth"}

STEM_CHANNELS = 64
STAGE_WIDTHS = (64, 128, 256, 512)  # planes of layer1..layer4 (times the block's expansion out)
IMAGENET_CLASSES = 1000             # outputs of torchvision's classifier, built only for its RNG draws


def conv3x3(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (the first strides) + identity or ``downsample`` shortcut."""

    expansion = 1

    def __init__(self, in_channels, planes, stride=1, downsample=None):
        super().__init__()
        # Attribute order = torchvision's: it fixes the RNG draws and the state_dict key order.
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # The shortcut after the residual branch, as torchvision orders it (same autograd graph).
        identity = x if self.downsample is None else self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, ResNet v1.5), 1x1 expand (x4) + identity or ``downsample`` shortcut."""

    expansion = 4

    def __init__(self, in_channels, planes, stride=1, downsample=None):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        out += identity
        return self.relu(out)


# Block type and blocks per stage (layer1..layer4), by trunk name.
RESNET_LAYOUTS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet101": (Bottleneck, (3, 4, 23, 3))}


def _make_stage(block, in_channels, planes, num_blocks, stride):
    """torchvision's ``ResNet._make_layer`` (no dilation, one group): an nn.Sequential of blocks."""
    out_channels = planes * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
    blocks = [block(in_channels, planes, stride, downsample)]
    blocks += [block(out_channels, planes) for _ in range(1, num_blocks)]
    return nn.Sequential(*blocks)


class ResNetTrunk(nn.Module):
    """torchvision's ``resnet18``/``resnet101(weights=None)`` up to layer4, without avgpool and fc.

    ``forward`` returns the layer3 (1/16) and layer4 (1/32) features.
    """

    def __init__(self, name="resnet18"):
        super().__init__()
        if name not in RESNET_LAYOUTS:
            raise ValueError(f"unknown ResNet trunk {name!r}; expected one of {tuple(RESNET_LAYOUTS)}")
        block, blocks_per_stage = RESNET_LAYOUTS[name]
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = STEM_CHANNELS
        for index, (planes, num_blocks) in enumerate(zip(STAGE_WIDTHS, blocks_per_stage), start=1):
            stride = 1 if index == 1 else 2
            self.add_module(f"layer{index}", _make_stage(block, in_channels, planes, num_blocks, stride))
            in_channels = planes * block.expansion
        # torchvision builds its ImageNet classifier here, whose default init draws from the global
        # RNG; build the same one and drop it, so every module built after the trunk (the rest of
        # BiSeNet) draws the same numbers as under torchvision for the same seed.
        nn.Linear(in_channels, IMAGENET_CLASSES)
        # torchvision's re-initialisation (zero_init_residual=False), in module order.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        x = self.layer2(self.layer1(x))                         # (B, C8, H/8, W/8)
        feat16 = self.layer3(x)                                 # (B, C16, H/16, W/16)
        feat32 = self.layer4(feat16)                            # (B, C32, H/32, W/32)
        return feat16, feat32
