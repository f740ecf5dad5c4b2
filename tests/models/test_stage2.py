"""Second stages: MiSLAS (classifier + LWS, BN shift), cRT and LWS (all else bit for bit), the registry."""

import pytest
import timm
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import timm_cmo  # noqa: F401  (registers resnet*_cifar, head_norm)
from timm_cmo.losses import LAS_DEFAULTS, create_loss
from timm_cmo.models import NormedLinear
from timm_cmo.models.stage2 import (
    DECOUPLING_STAGE2, MISLAS_STAGE2, fold_weight_scaling, get_stage2, get_weight_scaling, list_stage2,
    match_weight_scaling, prepare_classifier_retraining, set_stage2_mode)

C = 5
COUNTS = [200, 90, 40, 15, 6]

MODELS = [
    pytest.param('resnet20_cifar', {}, 32, id='resnet20_cifar'),
    pytest.param('resnet20_cifar', dict(head_norm=True), 32, id='resnet20_cifar-norm'),
    pytest.param('resnet18', dict(drop_rate=0.5), 32, id='resnet18-dropout'),
    pytest.param('resnet18', dict(head_norm=True), 32, id='resnet18-norm'),
]


def _make(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=C, **kwargs)
    # a "stage-1" model: non-trivial BN affine parameters and running statistics
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _is_bn_stat(key):
    return key.endswith(('running_mean', 'running_var', 'num_batches_tracked'))


def _steps(model, groups, shift_bn, steps=3, lr=0.1):
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=5e-4)
    for group in optimizer.param_groups:
        group['lr'] = lr * group['lr_scale']
    loss_fn = create_loss('las', COUNTS, **LAS_DEFAULTS['cifar100'])
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        set_stage2_mode(model, shift_bn=shift_bn)
        x = torch.randn(8, 3, 32, 32, generator=g)
        y = torch.randint(0, C, (8,), generator=g)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return optimizer


@pytest.mark.parametrize('name,kwargs,size', MODELS)
@pytest.mark.parametrize('shift_bn', [True, False])
def test_only_classifier_and_bn_statistics_change(name, kwargs, size, shift_bn):
    model = _make(name, kwargs)
    model.train()  # warm the running statistics away from their init
    with torch.no_grad():
        model(torch.randn(8, 3, size, size))
    before = _snapshot(model)
    # a stale gradient from stage 1 is dropped from the frozen parameters
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    groups = prepare_classifier_retraining(model, lr_factor=0.2)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith('fc.'))
    # every parameter, frozen or not, goes to the optimizer: frozen ones must still not move
    all_params = [p for p in model.parameters() if all(p is not q for g in groups for q in g['params'])]
    groups = groups + [dict(params=all_params, lr_scale=1.0)]
    _steps(model, groups, shift_bn)
    after = _snapshot(model)
    classifier = model.get_classifier()
    head_keys = {k for k in after if k.startswith('fc.')}
    assert 'fc.lws_scale' in head_keys and 'fc.lws_scale' not in before
    for key, value in before.items():
        if key in head_keys:
            assert not torch.equal(value, after[key]), f'{key} did not train'
        elif _is_bn_stat(key) and shift_bn:
            assert not torch.equal(value, after[key]), f'{key}: BN statistics did not shift'
        else:
            assert torch.equal(value, after[key]), f'{key} changed'
    assert not torch.equal(after['fc.lws_scale'], torch.ones(C))
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.startswith('fc.'))
    assert isinstance(classifier, NormedLinear) == bool(kwargs.get('head_norm'))


@pytest.mark.parametrize('name,kwargs,size', MODELS[:3])
def test_stage2_mode(name, kwargs, size):
    model = _make(name, kwargs)
    model.train()
    set_stage2_mode(model, shift_bn=True)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            assert m.training
        elif m is model.get_classifier():
            assert m.training
        elif not any(isinstance(c, _BatchNorm) for c in m.modules()):
            assert not m.training, type(m).__name__
    assert not model.training  # head dropout of timm's ResNet (drop_rate) is off
    set_stage2_mode(model, shift_bn=False)
    assert not any(m.training for m in model.modules() if m is not model.get_classifier())
    # features are deterministic in stage 2 (dropout off), so two passes agree in eval-BN mode
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))


def test_weight_scaling_forward_groups_and_fold():
    model = _make('resnet20_cifar', {})
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
    groups = prepare_classifier_retraining(model, lr_factor=0.5)
    assert [g['lr_scale'] for g in groups] == [0.5, 1.0]
    assert groups[1]['params'][0] is get_weight_scaling(model)
    assert {id(p) for p in groups[0]['params']} == {id(model.fc.weight), id(model.fc.bias)}
    scale = get_weight_scaling(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain)  # ones: no change
        scale.copy_(torch.arange(1., C + 1))
        scaled = model(x)
        torch.testing.assert_close(scaled, plain * scale)
    # idempotent: a second call neither adds a second scale nor a second hook
    prepare_classifier_retraining(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), scaled)
    fold_weight_scaling(model)
    assert get_weight_scaling(model) is None and 'fc.lws_scale' not in model.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(model(x), scaled)
    fresh = timm.create_model('resnet20_cifar', num_classes=C)
    fresh.load_state_dict(model.state_dict())  # a plain model again


def test_no_weight_scaling_reset_head_and_errors():
    model = _make('resnet20_cifar', dict(head_norm=True))
    w = model.fc.weight.detach().clone()
    groups = prepare_classifier_retraining(model, reset_head=True, weight_scaling=False)
    assert len(groups) == 1 and get_weight_scaling(model) is None
    assert not torch.equal(model.fc.weight, w)
    torch.testing.assert_close(model.fc.weight.norm(dim=0), torch.ones(C))  # NormedLinear's own init
    with pytest.raises(ValueError, match='Cannot fold'):
        prepare_classifier_retraining(model)
        fold_weight_scaling(model)
    with pytest.raises(ValueError, match='lr_factor'):
        prepare_classifier_retraining(model, lr_factor=0.)
    headless = timm.create_model('resnet20_cifar', num_classes=0)
    with pytest.raises(ValueError, match='no parameters'):
        prepare_classifier_retraining(headless)


def test_recipes_table():
    assert MISLAS_STAGE2['cifar10'] == MISLAS_STAGE2['cifar10_if100']
    assert MISLAS_STAGE2['cifar10']['shift_bn'] is False and MISLAS_STAGE2['cifar100']['shift_bn'] is True
    for name, recipe in MISLAS_STAGE2.items():
        assert recipe['epochs'] == 10 and recipe['lr'] == 0.1 and recipe['sampler'] == 'class_aware'
        assert name in LAS_DEFAULTS


# --- Kang et al.'s second stages: cRT and LWS, and the registry ----------------------------------------------

def _ce_steps(model, groups, stage, steps=3, lr=0.1):
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        stage.train_mode(model)
        x = torch.randn(8, 3, 32, 32, generator=g)
        y = torch.randint(0, C, (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize('name,kwargs,size', MODELS)
@pytest.mark.parametrize('kind', ['crt', 'lws'])
def test_decoupled_stages_keep_everything_else_bit_for_bit(name, kwargs, size, kind):
    """cRT: only the (re-initialised) classifier changes; LWS: only the new per-class scale. Every other weight and
    every BatchNorm statistic stays the stage-1 one, even with all parameters handed to the optimizer."""
    stage = get_stage2(kind)
    assert stage.loss == 'ce' and stage.prepare is not None
    model = _make(name, kwargs)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, size, size))
    before = _snapshot(model)
    groups = stage.prepare(model)
    extra = [p for p in model.parameters() if all(p is not q for g in groups for q in g['params'])]
    _ce_steps(model, groups + [dict(params=extra)], stage)
    after = _snapshot(model)
    trained = {'fc.weight', 'fc.bias'} if kind == 'crt' else {'fc.lws_scale'}
    assert set(after) - set(before) == ({'fc.lws_scale'} if kind == 'lws' else set())
    for key, value in after.items():
        if key in trained:
            assert key not in before or not torch.equal(before[key], value), f'{key} did not train'
        else:
            assert torch.equal(before[key], value), f'{key} changed'
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {k for k in trained if k in dict(model.named_parameters())}


def test_crt_reinitialises_the_classifier():
    model = _make('resnet20_cifar', {})
    w = model.fc.weight.detach().clone()
    get_stage2('crt').prepare(model)
    assert not torch.equal(model.fc.weight, w)
    bound = 1 / model.fc.in_features ** 0.5  # nn.Linear's default init, as the authors' DotProductClassifier
    assert model.fc.weight.abs().max() <= bound and model.fc.bias.abs().max() <= bound


def test_lws_on_a_cosine_head_is_an_exportable_head_parameter(tmp_path):
    """A cosine head's LWS scale lives in the head (head_lws), so the model exports and reloads with it."""
    model = _make('resnet20_cifar', dict(head_norm=True))
    get_stage2('lws').prepare(model)
    assert isinstance(model.fc, NormedLinear) and model.fc.lws_scale is not None and model.head_lws
    with torch.no_grad():
        model.fc.lws_scale.copy_(torch.arange(1., C + 1))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    from timm.models import save_for_hf
    save_for_hf(model, tmp_path, safe_serialization=True)
    reloaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)
    plain = timm.create_model('resnet20_cifar', num_classes=C, head_norm=True)
    match_weight_scaling(plain, model.state_dict())  # a checkpoint with the scale: the head gets one
    plain.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match='needs head_norm=True'):
        timm.create_model('resnet20_cifar', num_classes=C, head_lws=True)


def test_registry():
    assert {'crt', 'lws', 'las', 'router'} <= set(list_stage2())
    assert get_stage2('router').model_kwargs == {'router': True} and get_stage2('router').fresh == ('router.',)
    assert get_stage2('las').kwargs({'las_lr_factor': 0.5, 'las_shift_bn': False, 'lr': 1}) == dict(
        lr_factor=0.5, shift_bn=False)
    with pytest.raises(KeyError, match="unknown second stage 'xyz'"):
        get_stage2('xyz')
    with pytest.raises(ValueError, match='needs weight_scaling=True'):
        prepare_classifier_retraining(_make('resnet20_cifar', {}), weight_scaling=False, train_classifier=False)
    ride = timm.create_model('ride_resnet20_cifar', num_classes=C)
    with pytest.raises(ValueError, match='Cannot tell the number of classes'):
        get_stage2('lws').prepare(ride)


def test_decoupling_recipes_table():
    assert DECOUPLING_STAGE2['imagenet_lt_crt']['epochs'] == 10 and DECOUPLING_STAGE2['inat2018_crt']['epochs'] == 30
    for recipe in DECOUPLING_STAGE2.values():
        assert recipe['lr'] == 0.2 and recipe['batch_size'] == 512 and recipe['samples_per_class'] == 4
