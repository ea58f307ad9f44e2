"""The papers' architectures: registered with timm on import, right sizes, timm's pretrained-file loading."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_dst  # noqa: F401  (registers the models)

# (name, parameters with 10 classes on 32x32x3 inputs)
MODELS = [
    ('itop_mlp', 3_676_682),  # 3072-1024-512-10
    ('vgg16_cifar', 15_255_626),
    ('vgg16c_cifar', 10_537_034),
    ('resnet18_cifar', 11_173_962),
    ('resnet34_cifar', 21_282_122),
    ('wrn28_2', 1_467_610),  # WRN-28-2: 1.47M, as in Zagoruyko & Komodakis / DSR
]


@pytest.mark.parametrize('name, n_params', MODELS)
def test_registered_and_sized(name, n_params):
    assert timm.is_model(name)
    model = timm.create_model(name, num_classes=10).eval()
    assert sum(p.numel() for p in model.parameters()) == n_params
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert model.get_classifier().out_features == 10
    model.reset_classifier(7)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_itop_mlp_shape_from_data():
    model = timm.create_model('itop_mlp', in_chans=1, img_size=28, num_classes=10)
    assert model.features[0].in_features == 784
    assert [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)] == [1024, 512, 10]
    assert not any(isinstance(m, torch.nn.BatchNorm1d | torch.nn.Dropout) for m in model.modules())


@pytest.mark.parametrize('name', ['itop_mlp', 'resnet18_cifar', 'wrn28_2'])
def test_pretrained_file_roundtrip(tmp_path, name):
    kw = dict(num_classes=10, in_chans=1, img_size=(16, 16)) if name == 'itop_mlp' else dict(num_classes=10)
    src = timm.create_model(name, **kw).eval()
    path = tmp_path / 'w.safetensors'
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw).eval()
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
