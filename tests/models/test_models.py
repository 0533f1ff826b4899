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


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_head_output_bn(layers):
    """model.head_out_bn: an affine-free BN on the output (and no bias before it) at any depth; the default
    keeps it for the 3-layer head only, as before."""
    default = projection_head(64, 32, 16, layers)
    assert isinstance(default[-1], torch.nn.BatchNorm1d) == (layers == 3)
    h = projection_head(64, 32, 16, layers, out_bn=True)
    assert isinstance(h[-1], torch.nn.BatchNorm1d) and not h[-1].affine and h[-2].bias is None
    z = h.train()(torch.randn(64, 64) * 3 + 1)
    torch.testing.assert_close(z.mean(0), torch.zeros(16), atol=1e-5, rtol=0)   # batch-normalised output
    assert not isinstance(projection_head(64, 32, 16, 3, out_bn=False)[-1], torch.nn.BatchNorm1d)


def test_fast_precision_is_bf16_only_where_the_device_computes_it():
    from omegaconf import OmegaConf

    from selfsup.engine import setup

    cfg = OmegaConf.create({"train": {"precision": "fast"}})
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert setup.autocast_dtype(cfg, cuda) is torch.bfloat16
    for amx in (True, False):
        old = setup.cpu_has_amx
        setup.cpu_has_amx = lambda: amx
        try:
            assert setup.autocast_dtype(cfg, cpu) is (torch.bfloat16 if amx else None)
        finally:
            setup.cpu_has_amx = old
    cfg.train.precision = "auto"   # auto stays fp32 on any CPU
    assert setup.autocast_dtype(cfg, cpu) is None and setup.autocast_dtype(cfg, cuda) is torch.bfloat16
