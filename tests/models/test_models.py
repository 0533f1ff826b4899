import pytest
import torch
import torchvision

from selfsup.engine.export import export_encoder
from selfsup.models.backbones import build_backbone
from selfsup.models.heads import projection_head


@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048), ("resnet_small", 256)])
def test_backbone_feature_dim(name, dim):
    net, d = build_backbone(name, cifar_stem=True)
    assert d == dim
    net.eval()
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, dim)


def test_cifar_stem_keeps_resolution():
    net, _ = build_backbone("resnet18", cifar_stem=True)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)


def test_export_loads_into_torchvision(tmp_path):
    from safetensors.torch import load_file

    net, _ = build_backbone("resnet18", cifar_stem=False)
    export_encoder(net, tmp_path / "enc.safetensors")
    ref = torchvision.models.resnet18()
    missing, unexpected = ref.load_state_dict(load_file(str(tmp_path / "enc.safetensors")), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    assert torch.equal(ref.conv1.weight, net.conv1.weight)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="resnet18"):
        build_backbone("vit_b")


@pytest.mark.parametrize("layers,n_linear", [(1, 1), (2, 2), (3, 3)])
def test_heads(layers, n_linear):
    h = projection_head(64, 32, 16, layers)
    assert sum(isinstance(m, torch.nn.Linear) for m in h) == n_linear
    assert h(torch.randn(4, 64)).shape == (4, 16)
