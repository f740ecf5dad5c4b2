"""Normalised head: NormedLinear, head_norm on CIFAR and timm ResNets, export/reload via save_for_hf."""
import inspect
import json

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import save_for_hf
from timm.models.resnet import ResNet

import timm_cmo  # noqa: F401  (patches ResNet)
from timm_cmo.models import NormedLinear, add_head_norm_arg, is_head_norm


def test_normed_linear_layout_and_forward():
    torch.manual_seed(0)
    head = NormedLinear(8, 3)
    assert head.weight.shape == (8, 3) and dict(head.named_parameters()).keys() == {'weight'}
    assert torch.allclose(head.weight.norm(dim=0), torch.ones(3), atol=1e-4)  # LDAM init: unit class vectors
    x = torch.randn(5, 8)
    expected = F.normalize(x, dim=1).mm(F.normalize(head.weight, dim=0))
    torch.testing.assert_close(head(x), expected)
    assert head(x).abs().max() <= 1 + 1e-6
    assert 'bias=False' in repr(head)


def test_patch_idempotent_and_signature():
    init = ResNet.__init__
    timm_cmo.models.patch_timm_resnet()
    add_head_norm_arg(ResNet)
    assert ResNet.__init__ is init
    assert 'head_norm' in inspect.signature(ResNet.__init__).parameters


def test_resnet50_default_unchanged():
    model = timm.create_model('resnet50', num_classes=3)
    assert isinstance(model.fc, nn.Linear) and model.head_norm is False and not is_head_norm(model)


def _roundtrip(model: nn.Module, tmp_path, x: torch.Tensor) -> nn.Module:
    model.eval()
    save_for_hf(model, tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / 'config.json').read_text())
    assert cfg['model_args']['head_norm'] is True
    reloaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert isinstance(reloaded.get_classifier(), NormedLinear) and is_head_norm(reloaded)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)
    return reloaded


def test_resnet32_cifar_head_norm_roundtrip(tmp_path):
    model = timm.create_model('resnet32_cifar', num_classes=100, head_norm=True)
    assert isinstance(model.fc, NormedLinear) and model.fc.weight.shape == (64, 100)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model.eval()(x)
    assert out.shape == (2, 100) and out.abs().max() <= 1 + 1e-6
    reloaded = _roundtrip(model, tmp_path, x)
    assert reloaded.num_classes == 100


def test_resnet50_head_norm_roundtrip(tmp_path):
    model = timm.create_model('resnet50', head_norm=True, num_classes=10)
    assert isinstance(model.fc, NormedLinear) and model.fc.weight.shape == (2048, 10)
    assert model.head_norm is True and model._model_args['head_norm'] is True
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model.eval()(x)
    assert out.shape == (2, 10) and out.abs().max() <= 1 + 1e-6
    _roundtrip(model, tmp_path, x)


def test_resnet50_head_norm_reset_classifier():
    model = timm.create_model('resnet50', head_norm=True, num_classes=10)
    model.reset_classifier(4)
    assert isinstance(model.fc, NormedLinear) and model.fc.weight.shape == (2048, 4)
    model.reset_classifier(0)
    assert isinstance(model.fc, nn.Identity)
    model.reset_classifier(6, global_pool='catavgmax')  # pooled features double
    assert isinstance(model.fc, NormedLinear) and model.fc.weight.shape == (4096, 6)


@pytest.mark.parametrize('name', ['wide_resnet50_2', 'resnet101'])
def test_other_timm_resnets_construct(name):
    model = timm.create_model(name, head_norm=True, num_classes=5)
    assert isinstance(model.fc, NormedLinear) and model.fc.weight.shape == (2048, 5)


def test_head_norm_features_only():
    model = timm.create_model('resnet50', head_norm=True, features_only=True, out_indices=(4,))
    assert [tuple(o.shape) for o in model(torch.randn(1, 3, 64, 64))] == [(1, 2048, 2, 2)]


@pytest.mark.parametrize('wrap', ['none', 'ddp-like', 'compiled'])
def test_classifier_kind_is_seen_through_wrappers(wrap):
    """is_head_norm and is_causal_norm read the classifier through model_classifier(): the same answer for the model,
    a DDP-style wrapper (``.module``) and torch.compile's wrapper (``._orig_mod``)."""
    from timm_cmo.models import is_causal_norm
    from timm_cmo.models.head_norm import model_classifier

    class Wrapper(nn.Module):
        def __init__(self, inner, attr):
            super().__init__()
            setattr(self, attr, inner)

    def wrapped(model):
        return {'none': model, 'ddp-like': Wrapper(model, 'module'), 'compiled': Wrapper(model, '_orig_mod')}[wrap]
    normed = timm.create_model('resnet20_cifar', num_classes=10, head_norm=True)
    causal = timm.create_model('resnet20_cifar', num_classes=10, causal_norm=True)
    plain = timm.create_model('resnet20_cifar', num_classes=10)
    assert model_classifier(wrapped(plain)) is plain.fc
    assert is_head_norm(wrapped(normed)) and not is_head_norm(wrapped(plain)) and not is_head_norm(wrapped(causal))
    assert is_causal_norm(wrapped(causal)) and not is_causal_norm(wrapped(plain)) and not is_causal_norm(wrapped(normed))
