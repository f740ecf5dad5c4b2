"""CIFAR ResNets: parameter counts, shapes, timm model interface, features_only."""
import pytest
import timm
import torch
import torch.nn as nn

import timm_cmo  # noqa: F401  (registers the models)
from timm_cmo.models import CIFAR_MEAN, CIFAR_STD, NormedLinear, ResNetCifar, is_head_norm

DEPTHS = {'resnet20_cifar': 3, 'resnet32_cifar': 5, 'resnet44_cifar': 7, 'resnet56_cifar': 9, 'resnet110_cifar': 18}


def expected_params(n: int, num_classes: int, head_norm: bool = False) -> int:
    """Stem conv+bn, 3 stages of n basic blocks (two 3x3 convs + two BNs), pad shortcuts (0 params), head."""
    total = 3 * 16 * 9 + 2 * 16
    in_chs = 16
    for chs in (16, 32, 64):
        for j in range(n):
            total += 9 * (in_chs if j == 0 else chs) * chs + 2 * chs + 9 * chs * chs + 2 * chs
        in_chs = chs
    return total + 64 * num_classes + (0 if head_norm else num_classes)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registered():
    assert set(DEPTHS) <= set(timm.list_models('*_cifar'))


@pytest.mark.parametrize('name,n', sorted(DEPTHS.items()))
def test_param_count_and_shapes(name, n):
    model = timm.create_model(name)
    assert isinstance(model, ResNetCifar) and model.layers_per_stage == n
    assert n_params(model) == expected_params(n, 10)
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == n
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet32_is_046m():
    count = n_params(timm.create_model('resnet32_cifar'))
    assert count == expected_params(5, 10) == 464154
    assert round(count / 1e6, 2) == 0.46
    assert n_params(timm.create_model('resnet32_cifar', num_classes=100)) == expected_params(5, 100)
    assert n_params(timm.create_model('resnet32_cifar', num_classes=100, head_norm=True)) == \
        expected_params(5, 100, head_norm=True)


def test_pretrained_cfg():
    model = timm.create_model('resnet32_cifar')
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 32, 32)
    assert tuple(cfg['mean']) == CIFAR_MEAN == (0.4914, 0.4822, 0.4465)
    assert tuple(cfg['std']) == CIFAR_STD == (0.2023, 0.1994, 0.2010)
    assert cfg['crop_pct'] == 1.0 and cfg['classifier'] == 'fc' and cfg['first_conv'] == 'conv1'
    assert cfg['num_classes'] == 10
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg['input_size'] == (3, 32, 32) and data_cfg['mean'] == CIFAR_MEAN


def test_no_shortcut_params_and_paper_keys():
    sd = timm.create_model('resnet20_cifar').state_dict()
    assert not any('shortcut' in k for k in sd)
    assert {'conv1.weight', 'bn1.running_mean', 'layer2.0.conv1.weight', 'layer3.2.bn2.weight', 'fc.weight',
            'fc.bias'} <= set(sd)
    assert sd['layer2.0.conv1.weight'].shape == (32, 16, 3, 3)


def test_forward_features_head():
    model = timm.create_model('resnet20_cifar', num_classes=100).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 64, 8, 8) and model.num_features == 64
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, 64)
        torch.testing.assert_close(pre, feats.mean((2, 3)))
        torch.testing.assert_close(model.forward_head(feats), model(x))
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 100)


def test_classifier_reset():
    model = timm.create_model('resnet20_cifar')
    assert model.get_classifier() is model.fc and model.get_classifier(name_only=True) == 'fc'
    assert isinstance(model.fc, nn.Linear) and not is_head_norm(model)
    model.reset_classifier(7)
    assert model.fc.out_features == 7 and model.num_classes == 7
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    model.reset_classifier(0)
    assert isinstance(model.fc, nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    model.reset_classifier(0, global_pool='')
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64, 8, 8)


def test_classifier_reset_keeps_head_norm():
    model = timm.create_model('resnet20_cifar', head_norm=True)
    assert isinstance(model.fc, NormedLinear) and model.fc.weight.shape == (64, 10) and is_head_norm(model)
    model.reset_classifier(5)
    assert isinstance(model.fc, NormedLinear) and model.fc.weight.shape == (64, 5)
    model.reset_classifier(0)
    assert isinstance(model.fc, nn.Identity) and not is_head_norm(model)
    model.reset_classifier(3)
    assert isinstance(model.fc, NormedLinear)
    out = model.eval()(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 3) and out.abs().max() <= 1 + 1e-6


def test_num_classes_zero():
    model = timm.create_model('resnet32_cifar', num_classes=0)
    assert isinstance(model.fc, nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_features_only():
    model = timm.create_model('resnet32_cifar', features_only=True).eval()
    assert model.feature_info.channels() == [16, 16, 32, 64]
    assert model.feature_info.reduction() == [1, 1, 2, 4]
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(2, 16, 32, 32), (2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]

    model = timm.create_model('resnet20_cifar', features_only=True, out_indices=(2, 3))
    assert model.feature_info.channels() == [32, 64]
    assert [tuple(o.shape) for o in model(torch.randn(1, 3, 32, 32))] == [(1, 32, 16, 16), (1, 64, 8, 8)]


def test_forward_intermediates_matches_features():
    model = timm.create_model('resnet20_cifar').eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [t.shape[1] for t in inter] == [16, 16, 32, 64]
        getter = timm.create_model('resnet20_cifar', features_only=True, feature_cls='getter', out_indices=(1, 3))
        assert [tuple(o.shape) for o in getter(x)] == [(2, 16, 32, 32), (2, 64, 8, 8)]


def test_grad_checkpointing_same_output():
    model = timm.create_model('resnet20_cifar').eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), ref)
    assert model.group_matcher()['blocks'] == r'^layer(\d+)\.(\d+)'


def test_paper_init():
    torch.manual_seed(0)
    model = timm.create_model('resnet110_cifar')
    # kaiming_normal_ fan_in: std = sqrt(2 / fan_in) (fan_in = 32 * 9 for layer2 convs)
    w = torch.cat([b.conv2.weight.flatten() for b in model.layer2])
    assert abs(w.std().item() - (2 / (32 * 9)) ** 0.5) < 0.01
    assert all(b.bn2.weight.eq(1).all() for b in model.layer3)  # no zero-init of the last BN


def test_train_step():
    model = timm.create_model('resnet20_cifar', num_classes=4, drop_rate=0.1)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert model.conv1.weight.grad is not None and model.fc.weight.grad is not None
