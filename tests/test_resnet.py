"""model.resnet against torchvision's ResNet, the independent reference it replaces: same names and
shapes, the same random initialisation bit for bit (of the trunk and of the whole BiSeNet built
after it), the same features and gradients, torchvision's ImageNet weight URLs."""
import pytest
import torch
import torchvision
from torch import nn

import model.bisenet
from model import CONTEXT_PATHS, build_bisenet
from model.bisenet import imagenet_weights_path
from model.resnet import IMAGENET1K_V1_URLS, ResNetTrunk
from tests.helpers import randomize_

TORCHVISION_WEIGHTS = {"resnet18": torchvision.models.ResNet18_Weights,
                       "resnet101": torchvision.models.ResNet101_Weights}
SEEDS = (0, 7)


def torchvision_trunk_state(trunk):
    return {k: v for k, v in trunk.state_dict().items() if not k.startswith("fc.")}


class TorchvisionContextPath(nn.Module):
    """The context path as built before model.resnet: torchvision's modules, its classifier dropped."""

    def __init__(self, name="resnet18"):
        super().__init__()
        trunk = getattr(torchvision.models, name)(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4


@pytest.mark.parametrize("name", CONTEXT_PATHS)
def test_the_trunk_has_torchvisions_state_dict_keys_and_shapes(name):
    ours = ResNetTrunk(name).state_dict()
    reference = torchvision_trunk_state(getattr(torchvision.models, name)())
    assert list(ours) == list(reference)  # the same names, in the same order
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}
    assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in reference.items()}


@pytest.mark.parametrize("name", CONTEXT_PATHS)
@pytest.mark.parametrize("seed", SEEDS)
def test_the_trunk_initialises_as_torchvision_bit_for_bit(name, seed):
    torch.manual_seed(seed)
    ours = ResNetTrunk(name).state_dict()
    after_ours = torch.get_rng_state()
    torch.manual_seed(seed)
    reference = torchvision_trunk_state(getattr(torchvision.models, name)(weights=None))
    # The dropped classifier drew its numbers too: what is built next draws the same ones.
    assert torch.equal(after_ours, torch.get_rng_state())
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


@pytest.mark.parametrize("name", CONTEXT_PATHS)
def test_a_seeded_bisenet_is_bitwise_the_one_built_on_torchvision(name, monkeypatch):
    """The whole network, not only the trunk: the modules built after the trunk see the same RNG,
    so the committed seeded results stay what they are."""
    torch.manual_seed(SEEDS[1])
    ours = build_bisenet(name, num_classes=7).state_dict()
    monkeypatch.setattr(model.bisenet, "ContextPath", TorchvisionContextPath)
    torch.manual_seed(SEEDS[1])
    reference = build_bisenet(name, num_classes=7).state_dict()
    assert list(ours) == list(reference)
    mismatched = [k for k in reference if not torch.equal(ours[k], reference[k])]
    assert mismatched == []


@pytest.mark.parametrize("name", CONTEXT_PATHS)
def test_the_trunk_computes_torchvisions_features_and_gradients(name):
    reference = randomize_(getattr(torchvision.models, name)(), seed=5)
    ours = ResNetTrunk(name)
    ours.load_state_dict(torchvision_trunk_state(reference))  # strict: every key, no other
    captured = {}
    for layer in ("layer3", "layer4"):
        getattr(reference, layer).register_forward_hook(
            lambda module, inputs, output, layer=layer: captured.__setitem__(layer, output))
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))

    ours.eval(), reference.eval()
    with torch.no_grad():
        feat16, feat32 = ours(x)
        reference(x)
    assert feat16.shape[-2:] == (4, 6) and feat32.shape[-2:] == (2, 3)
    assert torch.equal(feat16, captured["layer3"]) and torch.equal(feat32, captured["layer4"])

    # Training mode: batch statistics, the same running-stat updates and the same gradients.
    ours.train(), reference.train()
    feat16, feat32 = ours(x)
    reference(x)
    (feat16.sum() + feat32.square().sum()).backward()
    (captured["layer3"].sum() + captured["layer4"].square().sum()).backward()
    assert torch.equal(feat32, captured["layer4"])
    reference_state = torchvision_trunk_state(reference)
    assert all(torch.equal(v, reference_state[k]) for k, v in ours.state_dict().items())
    reference_grads = dict(reference.named_parameters())
    assert all(torch.equal(p.grad, reference_grads[k].grad) for k, p in ours.named_parameters())


@pytest.mark.parametrize("name", CONTEXT_PATHS)
def test_imagenet_weights_are_torchvisions_imagenet1k_v1(name, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = TORCHVISION_WEIGHTS[name].IMAGENET1K_V1.url
    assert IMAGENET1K_V1_URLS[name] == url
    assert imagenet_weights_path(name) == tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
