"""RIDE models: RIDE's architecture (parameter count, shapes), outputs, features, checkpoint layout, router, DDP."""
import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

import timm_cmo  # noqa: F401  (registers the models and losses)
from timm_cmo.losses import create_loss
from timm_cmo.models import NormedLinear
from timm_cmo.models.ride import (
    RIDEResNet, RIDEResNetCifar, freeze_for_router_training, ride_checkpoint_filter_fn, router_parameters)

# last.pth.tar files train_cmo.py wrote before RIDE models returned one logits tensor (commit a09f651), and that
# code's outputs on a fixed input: a stage-1 RIDE run (`--model ride_resnet20_cifar --model-kwargs num_experts=2
# expert_widths=(4,8) --loss ride --reweight drw --drw-epoch 1 --epochs 2 -b 16 --seed 5 --color-jitter 0
# --train-crop-mode pad`, on 6 training images a class: its epoch-0 checkpoint) and its router stage from that
# checkpoint (`--stage2 router --loss ride_ea --reweight none --lr 0.01 --epochs 1`); see tests/test_train_cmo.py
RUN_FIXTURES = Path(__file__).parent / 'fixtures' / 'ride_run_a09f651'
FIXTURE_MODEL = dict(num_classes=10, num_experts=2, expert_widths=(4, 8))

CIFAR_NAMES = ['ride_resnet20_cifar', 'ride_resnet32_cifar', 'ride_resnet44_cifar', 'ride_resnet56_cifar',
               'ride_resnet110_cifar']


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- RIDE's layouts, written from its code (model/ldam_drw_resnets/*_resnet_cifar.py, fb_resnets/RIDEResNet.py) ---

def _bn(sd, name, c, g):
    sd[f'{name}.weight'] = torch.rand(c, generator=g) + 0.5
    sd[f'{name}.bias'] = torch.randn(c, generator=g) * 0.1
    sd[f'{name}.running_mean'] = torch.randn(c, generator=g) * 0.1
    sd[f'{name}.running_var'] = torch.rand(c, generator=g) + 0.5
    sd[f'{name}.num_batches_tracked'] = torch.tensor(7)


def ride_cifar_state_dict(n=5, experts=3, num_classes=100, widths=(24, 48), use_norm=True, top_k=None, seed=0):
    """RIDE's ResNet_s state dict (``backbone.`` keys): conv1/bn1, layer1, layer2s.i, layer3s.i, linears.i and, with
    ``top_k``, the EA module (expert_help_pred_hidden_fcs.i, expert_help_pred_fc)."""
    g = torch.Generator().manual_seed(seed)
    sd = {'conv1.weight': torch.randn(16, 3, 3, 3, generator=g) * 0.3}
    _bn(sd, 'bn1', 16, g)

    def layer(prefix, cin, cout):
        for j in range(n):
            sd[f'{prefix}.{j}.conv1.weight'] = torch.randn(cout, cin if j == 0 else cout, 3, 3, generator=g) * 0.1
            _bn(sd, f'{prefix}.{j}.bn1', cout, g)
            sd[f'{prefix}.{j}.conv2.weight'] = torch.randn(cout, cout, 3, 3, generator=g) * 0.1
            _bn(sd, f'{prefix}.{j}.bn2', cout, g)

    layer('layer1', 16, 16)
    for e in range(experts):
        layer(f'layer2s.{e}', 16, widths[0])
        layer(f'layer3s.{e}', widths[0], widths[1])
    for e in range(experts):
        if use_norm:
            sd[f'linears.{e}.weight'] = torch.randn(widths[1], num_classes, generator=g)
        else:
            sd[f'linears.{e}.weight'] = torch.randn(num_classes, widths[1], generator=g) * 0.1
            sd[f'linears.{e}.bias'] = torch.randn(num_classes, generator=g) * 0.1
    if top_k:
        for i in range(experts - 1):
            sd[f'expert_help_pred_hidden_fcs.{i}.weight'] = torch.randn(16, widths[1], generator=g)
            sd[f'expert_help_pred_hidden_fcs.{i}.bias'] = torch.randn(16, generator=g) * 0.1
        sd['expert_help_pred_fc.weight'] = torch.randn(1, 16 + top_k, generator=g) * 0.1
        sd['expert_help_pred_fc.bias'] = torch.zeros(1)
    return {'backbone.' + k: v for k, v in sd.items()}


def ride_resnet50_shapes(experts=3, num_classes=1000, planes=(192, 384), groups=1, width_per_group=64):
    """Key -> shape of RIDE's fb_resnets ResNet / ResNext (Bottleneck, [3, 4, 6, 3]) with ``experts`` experts."""
    shapes = {'conv1.weight': (64, 3, 7, 7)}

    def bn(name, c):
        shapes.update({f'{name}.{k}': (c,) for k in ('weight', 'bias', 'running_mean', 'running_var')})
        shapes[f'{name}.num_batches_tracked'] = ()

    def layer(prefix, cin, p, blocks):
        width = int(p * (width_per_group / 64.)) * groups
        for j in range(blocks):
            c = cin if j == 0 else 4 * p
            shapes[f'{prefix}.{j}.conv1.weight'] = (width, c, 1, 1)
            bn(f'{prefix}.{j}.bn1', width)
            shapes[f'{prefix}.{j}.conv2.weight'] = (width, width // groups, 3, 3)
            bn(f'{prefix}.{j}.bn2', width)
            shapes[f'{prefix}.{j}.conv3.weight'] = (4 * p, width, 1, 1)
            bn(f'{prefix}.{j}.bn3', 4 * p)
        shapes[f'{prefix}.0.downsample.0.weight'] = (4 * p, cin, 1, 1)
        bn(f'{prefix}.0.downsample.1', 4 * p)

    bn('bn1', 64)
    layer('layer1', 64, 64, 3)
    layer('layer2', 256, 128, 4)
    for e in range(experts):
        layer(f'layer3s.{e}', 512, planes[0], 6)
        layer(f'layer4s.{e}', 4 * planes[0], planes[1], 3)
        shapes[f'linears.{e}.weight'] = (4 * planes[1], num_classes)
    return {'module.backbone.' + k: v for k, v in shapes.items()}  # trained with DataParallel


def ride_reference_forward(sd, x, n=5, experts=3, s=30., route=False):
    """RIDE's eval forward (ride_resnet_cifar.py / ea_resnet_cifar.py) in plain torch ops on its own state dict."""
    sd = {k[len('backbone.'):]: v for k, v in sd.items()}

    def bn(t, p):
        return F.batch_norm(t, sd[p + '.running_mean'], sd[p + '.running_var'], sd[p + '.weight'], sd[p + '.bias'],
                            False, 0., 1e-5)

    def layer(t, prefix, stride):
        for j in range(n):
            out = F.relu(bn(F.conv2d(t, sd[f'{prefix}.{j}.conv1.weight'], stride=stride if j == 0 else 1, padding=1),
                            f'{prefix}.{j}.bn1'))
            out = bn(F.conv2d(out, sd[f'{prefix}.{j}.conv2.weight'], padding=1), f'{prefix}.{j}.bn2')
            cin, cout = t.shape[1], out.shape[1]
            if j == 0 and (stride != 1 or cin != cout):  # option A: subsample, zero-pad channels both sides
                t = F.pad(t[:, :, ::2, ::2], (0, 0, 0, 0, (cout - cin) // 2, (cout - cin) // 2))
            t = F.relu(out + t)
        return t

    def expert(t, e):
        feat = layer(layer(t, f'layer2s.{e}', 2), f'layer3s.{e}', 2)
        pooled = F.avg_pool2d(feat, feat.shape[3]).flatten(1)
        return pooled, F.normalize(pooled, dim=1) @ F.normalize(sd[f'linears.{e}.weight'], dim=0) * s

    shared = layer(F.relu(bn(F.conv2d(x, sd['conv1.weight'], padding=1), 'bn1')), 'layer1', 1)
    if not route:
        return torch.stack([expert(shared, e)[1] for e in range(experts)], dim=1).mean(1)
    top_k = sd['expert_help_pred_fc.weight'].shape[1] - 16
    feat, output = expert(shared, 0)
    nxt = torch.ones(x.shape[0], dtype=torch.bool)
    count = torch.ones(x.shape[0], dtype=torch.long)
    for i in range(1, experts):
        f = feat / feat.norm(dim=1, keepdim=True)
        h = F.relu(F.linear(f, sd[f'expert_help_pred_hidden_fcs.{i - 1}.weight'],
                            sd[f'expert_help_pred_hidden_fcs.{i - 1}.bias']))
        top = torch.topk(output[nxt] / i, k=top_k, dim=1)[0]
        pred = F.linear(torch.cat((top, h), 1), sd['expert_help_pred_fc.weight'], sd['expert_help_pred_fc.bias'])
        nxt[nxt.clone()] = torch.sigmoid(pred.view(-1)) > 0.5
        if not nxt.any():
            break
        feat, logits = expert(shared[nxt], i)
        output[nxt] += logits
        count[nxt] += 1
    return output / count.unsqueeze(1), count


def expected_cifar_params(n, experts, num_classes, widths=(24, 48), head_norm=True):
    """Stem + shared stage 1 (16 ch) + per expert: stages 2-3 (n basic blocks each) and a head."""
    def stage(cin, cout):
        return sum(9 * (cin if j == 0 else cout) * cout + 9 * cout * cout + 4 * cout for j in range(n))
    shared = 3 * 16 * 9 + 2 * 16 + stage(16, 16)
    head = widths[1] * num_classes + (0 if head_norm else num_classes)
    return shared + experts * (stage(16, widths[0]) + stage(widths[0], widths[1]) + head)


# --- architecture ---------------------------------------------------------------------------------------------

def test_registered():
    names = set(CIFAR_NAMES) | {'ride_resnet10', 'ride_resnet50', 'ride_resnext50_32x4d'}
    assert names <= set(timm.list_models('ride_*'))
    model = timm.create_model('ride_resnet32_cifar', num_classes=100)
    assert isinstance(model, RIDEResNetCifar) and model.num_classes == 100 and model.num_experts == 3
    assert model.pretrained_cfg['classifier'] == ('heads.0', 'heads.1', 'heads.2')
    assert model.pretrained_cfg['input_size'] == (3, 32, 32)
    # the registered cfg names 3 heads; a model with other experts names its own (and exports them)
    four = timm.create_model('ride_resnet20_cifar', num_experts=4)
    assert four.pretrained_cfg['classifier'] == ('heads.0', 'heads.1', 'heads.2', 'heads.3')
    assert timm.get_pretrained_cfg_value('ride_resnet20_cifar', 'classifier') == ('heads.0', 'heads.1', 'heads.2')


def test_resnet32_param_count_matches_ride():
    """RIDE ResNet-32, 3 experts, reduce_dimension, NormedLinear, CIFAR-100: 783,856 parameters."""
    model = timm.create_model('ride_resnet32_cifar', num_classes=100)
    assert n_params(model) == expected_cifar_params(5, 3, 100) == 783856
    ride_sd = ride_cifar_state_dict()
    assert sum(v.numel() for k, v in ride_sd.items() if not k.endswith(('running_mean', 'running_var',
                                                                          'num_batches_tracked'))) == 783856
    assert n_params(timm.create_model('ride_resnet32_cifar', num_classes=100, reduce_dimension=False)) == \
        expected_cifar_params(5, 3, 100, widths=(32, 64))
    assert n_params(timm.create_model('ride_resnet20_cifar', num_experts=2, head_norm=False)) == \
        expected_cifar_params(3, 2, 10, head_norm=False)


def test_shapes_train_and_eval():
    model = timm.create_model('ride_resnet32_cifar', num_classes=100)
    x = torch.randn(2, 3, 32, 32)
    plain = model(x)  # timm's contract: one logits tensor in train mode too
    assert isinstance(plain, torch.Tensor) and plain.shape == (2, 100)
    model.set_expert_training(True)
    logits, expert_logits = model(x)
    torch.testing.assert_close(logits, plain, rtol=0, atol=0)  # the same ensemble (same batch statistics)
    assert logits.shape == (2, 100) and expert_logits.shape == (2, 3, 100)
    torch.testing.assert_close(logits, expert_logits.mean(1))
    assert expert_logits.abs().max() <= 30 + 1e-4  # cosine logits times s = 30
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 3 * 48, 8, 8) and model.num_features == 144 and model.expert_features == 48
        assert model.forward_head(feats, pre_logits=True).shape == (2, 144)
        assert model(x).shape == (2, 100)


def test_eval_is_mean_of_experts():
    model = timm.create_model('ride_resnet20_cifar', num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        shared = model.forward_shared(x)
        manual = []
        for i in range(3):
            pooled = model.experts[i](shared).mean((2, 3))
            manual.append(F.normalize(pooled, dim=1) @ F.normalize(model.heads[i].weight, dim=0) * 30)
        torch.testing.assert_close(model(x), torch.stack(manual, 1).mean(1))
        torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x)))
        model.train()
        model.experts.eval(), model.layer1.eval(), model.bn1.eval()  # train-mode tuple with eval BN
        torch.testing.assert_close(model(x), torch.stack(manual, 1).mean(1))  # expert training off: the mean
        model.set_expert_training(True)
        logits, expert_logits = model(x)
        torch.testing.assert_close(expert_logits, torch.stack(manual, 1))


def test_reset_classifier_and_linear_heads():
    model = timm.create_model('ride_resnet20_cifar')
    assert model.get_classifier() is model.heads and model.get_classifier(name_only=True) == 'heads'
    model.reset_classifier(7)
    assert all(isinstance(h, NormedLinear) and h.weight.shape == (48, 7) for h in model.heads)
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    model.reset_classifier(0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 144)
    model.reset_classifier(0, global_pool='')
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 144, 8, 8)
    linear = timm.create_model('ride_resnet20_cifar', head_norm=False, num_classes=5)
    assert all(isinstance(h, nn.Linear) for h in linear.heads) and linear.logit_scale == 1.


def test_num_experts():
    one = timm.create_model('ride_resnet20_cifar', num_experts=1, num_classes=10)
    one.set_expert_training(True)
    logits, expert_logits = one(torch.randn(2, 3, 32, 32))
    assert expert_logits.shape == (2, 1, 10)
    torch.testing.assert_close(logits, expert_logits[:, 0])
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f'num_experts must be an integer >= 1, got {bad}'):
            timm.create_model('ride_resnet20_cifar', num_experts=bad)
    with pytest.raises(ValueError, match='router needs num_experts >= 2'):
        one.enable_router()


def test_imagenet_models():
    model = timm.create_model('ride_resnet50', num_classes=10)
    assert isinstance(model, RIDEResNet) and model.expert_features == 1536 and model.router is None
    assert not hasattr(model, 'layer3') and len(model.experts) == 3
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
        assert model.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 3 * 1536, 2, 2)
    rx = timm.create_model('ride_resnext50_32x4d', num_classes=10)
    assert rx.experts[0].layer3[0].conv2.groups == 32 and rx.experts[0].layer3[0].conv2.out_channels == 384
    r10 = timm.create_model('ride_resnet10', num_classes=10, router=True)
    assert r10.expert_features == 384 and r10.router.top_k == 10  # top_k 30 capped at num_classes


@pytest.mark.parametrize('router', [False, True])
def test_expert_training_output_is_switched_on(router):
    """Off (the default), train mode gives the (B, C) logits as eval mode does: the mean of the experts, routed with a
    router. On, train mode gives (logits, expert_logits[, router_logits]) with the unrouted mean; eval mode still the
    tensor. The switch survives copies (timm's EMA deep-copies the model)."""
    model = timm.create_model('ride_resnet20_cifar', num_classes=10, router=router).eval()
    assert model.expert_training is False
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        shared = model.forward_shared(x)
        per_expert = model._expert_logits(torch.stack([e(shared).mean((2, 3)) for e in model.experts], 1))
        model.train()
        for m in model.modules():  # BatchNorm with its running statistics: outputs comparable with per_expert
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        if router:
            _force_router(model, go=False)  # every sample stops after expert 0
            torch.testing.assert_close(model(x), per_expert[:, 0], rtol=0, atol=0)
            _force_router(model, go=True)
        out = model(x)
        assert isinstance(out, torch.Tensor)
        torch.testing.assert_close(out, per_expert.mean(1))
        model.set_expert_training(True)
        assert copy.deepcopy(model).expert_training is True
        out = model(x)
        assert isinstance(out, tuple) and len(out) == (3 if router else 2)
        torch.testing.assert_close(out[0], per_expert.mean(1))
        torch.testing.assert_close(out[1], per_expert)
        if router:
            assert out[2].shape == (4, 2)
            _force_router(model, go=False)
            torch.testing.assert_close(model(x)[0], per_expert.mean(1))  # the training ensemble is not routed
        model.eval()
        assert isinstance(model(x), torch.Tensor)
        model.set_expert_training(False)
        assert isinstance(model.train()(x), torch.Tensor)


def test_router_needs_a_classifier():
    """Built without classes (a feature backbone, timm's num_classes=0) a routed RIDE model has no router, as after
    reset_classifier(0)."""
    model = timm.create_model('ride_resnet20_cifar', num_classes=0, router=True)
    assert model.router is None and model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 144)


@pytest.mark.parametrize('name,size', [('ride_resnet20_cifar', 32), ('ride_resnet10', 64)])
def test_intermediates_are_the_experts_maps_concatenated(name, size):
    """forward_intermediates / features_only: the stem, the shared stages, then per expert stage the experts' maps of
    that stage concatenated on channels (expert 0 first), the last of them forward_features' output."""
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        t = model.act1(model.bn1(model.conv1(x)))
        expected = [t]
        if hasattr(model, 'maxpool'):
            t = model.maxpool(t)
        for name_ in model._shared_stages:
            t = getattr(model, name_)(t)
            expected.append(t)
        per_expert = [t] * model.num_experts
        for name_ in model._expert_stages:
            per_expert = [getattr(e, name_)(m) for e, m in zip(model.experts, per_expert)]
            expected.append(torch.cat(per_expert, 1))
        assert len(maps) == len(expected) == len(model.feature_info)
        for m, e, info in zip(maps, expected, model.feature_info):
            assert torch.equal(m, e) and m.shape[1] == info['num_chs'] and size // m.shape[-1] == info['reduction']
        assert torch.equal(final, model.forward_features(x)) and torch.equal(final, expected[-1])

        # the feature wrapper (timm's 'getter') with the model's weights; a subset of maps prunes the rest
        sd = model.state_dict()
        for out_indices in (None, (1, 3), (0, 1)):
            kw = {} if out_indices is None else dict(out_indices=out_indices)
            features = timm.create_model(name, num_classes=10, features_only=True, pretrained=True,
                                         pretrained_cfg_overlay=dict(state_dict=sd), **kw).eval()
            wanted = list(range(len(expected))) if out_indices is None else list(out_indices)
            got = features(x)
            assert features.feature_info.channels() == [model.feature_info[i]['num_chs'] for i in wanted]
            assert len(got) == len(wanted) and all(torch.equal(g, expected[i]) for g, i in zip(got, wanted))
    with pytest.raises(ValueError, match="features_only needs feature_cls='getter'"):
        timm.create_model(name, features_only=True, feature_cls='hook')


def test_grad_checkpointing_same_output():
    model = timm.create_model('ride_resnet20_cifar').eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), ref)
    groups = create_optimizer_v2(model, 'sgd', lr=0.1, layer_decay=0.9).param_groups
    assert sum(len(g['params']) for g in groups) == len(list(model.parameters()))


def test_hf_round_trip(tmp_path):
    model = timm.create_model('ride_resnet20_cifar', num_classes=100).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    model.enable_router()
    x = torch.randn(4, 3, 32, 32)
    timm.models.save_for_hf(model, tmp_path / 'plain')  # with the router recorded in config.json
    loaded = timm.create_model(f'local-dir:{tmp_path / "plain"}', pretrained=True).eval()
    assert loaded.router is not None and loaded.num_classes == 100
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded.forward_with_experts_used(x), model.forward_with_experts_used(x))
    model.disable_router()
    timm.models.save_for_hf(model, tmp_path / 'norouter')
    loaded = timm.create_model(f'local-dir:{tmp_path / "norouter"}', pretrained=True).eval()
    assert loaded.router is None
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


# --- RIDE checkpoints ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('run,path,router', [('stage1', 'stage1_epoch0.pth', False), ('router', 'router.pth', True)])
def test_run_checkpoints_of_the_earlier_code_load_with_its_outputs(run, path, router):
    """Run checkpoints written before the model contract (RUN_FIXTURES) load strictly into today's model, which gives
    that code's outputs: eval, routed (with the experts used) and, expert training on, the training tuple."""
    ref = torch.load(RUN_FIXTURES / 'outputs.pt', weights_only=True)
    ckpt = torch.load(RUN_FIXTURES / path, map_location='cpu', weights_only=True)
    assert ckpt['arch'] == 'ride_resnet20_cifar'
    model = timm.create_model('ride_resnet20_cifar', router=router, **FIXTURE_MODEL)
    model.load_state_dict(ckpt['state_dict'], strict=True)
    x = ref['input']
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(x), ref[f'{run}.eval'])
        logits, used = model.forward_with_experts_used(x)
        torch.testing.assert_close(logits, ref[f'{run}.routed'])
        assert torch.equal(used, ref[f'{run}.used'])
        model.train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        model.set_expert_training(True)
        out = model(x)
        assert len(out) == (3 if router else 2)
        for i, t in enumerate(out):
            torch.testing.assert_close(t, ref[f'{run}.train.{i}'])


def test_filter_loads_ride_cifar_checkpoint_with_same_logits():
    ride_sd = ride_cifar_state_dict(seed=1)
    ckpt = {'arch': 'Model', 'epoch': 200, 'state_dict': ride_sd}  # RIDE's saved checkpoint layout
    # the overlay describes the weights (100 classes, the cfg says 10): timm then keeps the heads
    model = timm.create_model('ride_resnet32_cifar', num_classes=100, pretrained=True,
                              pretrained_cfg_overlay=dict(state_dict=ckpt, num_classes=100)).eval()
    own = model.state_dict()
    # without it the class count differs from the cfg's: timm drops every head the cfg names, as for any classifier
    headless = timm.create_model('ride_resnet32_cifar', num_classes=100, pretrained=True,
                                 pretrained_cfg_overlay=dict(state_dict=ckpt)).state_dict()
    assert all(torch.equal(headless[k], own[k]) != k.startswith('heads.') for k in own)
    mapped = ride_checkpoint_filter_fn(ride_sd, model)
    assert set(mapped) == set(own)
    assert 'experts.2.layer3.4.bn2.running_var' in mapped and 'heads.1.weight' in mapped
    for k, v in mapped.items():
        assert torch.equal(own[k], v), k
    torch.testing.assert_close(own['experts.1.layer2.0.conv1.weight'], ride_sd['backbone.layer2s.1.0.conv1.weight'])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ride_reference_forward(ride_sd, x), rtol=1e-4, atol=1e-4)


def test_filter_router_checkpoint_and_routing_matches_ride():
    ride_sd = ride_cifar_state_dict(n=3, seed=2, top_k=30)
    # decision i gets its own offset through hidden unit 0 of hidden fc i (kept in ReLU's linear part)
    fc = ride_sd['backbone.expert_help_pred_fc.weight']
    fc[0, 30:] = 0.
    fc[0, 30] = 1.
    for i in range(2):
        ride_sd[f'backbone.expert_help_pred_hidden_fcs.{i}.bias'][0] = 500.
    model = timm.create_model('ride_resnet20_cifar', num_classes=100, router=True).eval()
    model.load_state_dict(ride_checkpoint_filter_fn({'module.' + k: v for k, v in ride_sd.items()}, model))
    torch.testing.assert_close(model.router.fc.weight, ride_sd['backbone.expert_help_pred_fc.weight'])
    torch.testing.assert_close(model.router.hidden[1].bias, ride_sd['backbone.expert_help_pred_hidden_fcs.1.bias'])
    x = torch.randn(12, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True).unflatten(1, (3, 48))
        expert_logits = model._expert_logits(feats)
        a = model._router_logits(feats, expert_logits)  # (B, 2) decision logits
        a0 = a[:, 0].sort().values
        bias = -(a0[3] + a0[4]) / 2  # 4 samples stop after expert 0 (midway: no ties at sigmoid = 0.5)
        a1 = (a[:, 1][a[:, 0] + bias > 0] + bias).sort().values
        delta = -(a1[3] + a1[4]) / 2  # of the 8 others, 4 stop after expert 1
        ride_sd['backbone.expert_help_pred_fc.bias'] = bias.reshape(1)
        ride_sd['backbone.expert_help_pred_hidden_fcs.1.bias'][0] += delta
        model.load_state_dict(ride_checkpoint_filter_fn(ride_sd, model))
        ref_logits, ref_used = ride_reference_forward(ride_sd, x, n=3, route=True)
        assert torch.bincount(ref_used.view(-1)).tolist() == [0, 4, 4, 4]
        logits, used = model.forward_with_experts_used(x)
        assert torch.equal(used, ref_used.view(-1)) and used.dtype == torch.int64
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(x), logits)
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), logits, rtol=1e-4, atol=1e-4)
        # TorchScript keeps the per-sample routing; a torch.fx graph routes densely, to the same logits
        torch.testing.assert_close(torch.jit.script(model)(x), logits, rtol=0, atol=0)
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), logits, rtol=1e-5, atol=1e-5)

    plain = timm.create_model('ride_resnet20_cifar', num_classes=100)
    with pytest.warns(UserWarning, match='no router'):
        mapped = ride_checkpoint_filter_fn(ride_sd, plain)
    plain.load_state_dict(mapped)  # router weights dropped
    staged = timm.create_model('ride_resnet20_cifar', num_classes=100, router=True)
    staged.load_state_dict(ride_checkpoint_filter_fn(ride_cifar_state_dict(n=3), staged))  # stage-1 ckpt + new router
    with pytest.raises(ValueError, match='router_top_k=30'):
        ride_checkpoint_filter_fn(ride_sd, timm.create_model('ride_resnet20_cifar', num_classes=100, router=True,
                                                             router_top_k=20))


def test_filter_mismatched_heads_and_linear_heads():
    ride_sd = ride_cifar_state_dict(n=3, num_classes=100)
    model = timm.create_model('ride_resnet20_cifar', num_classes=10)
    heads = {k: v.clone() for k, v in model.state_dict().items() if k.startswith('heads.')}
    with pytest.warns(UserWarning, match='heads do not match'):
        model.load_state_dict(ride_checkpoint_filter_fn(ride_sd, model))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in heads.items())
    torch.testing.assert_close(model.layer1[0].conv1.weight, ride_sd['backbone.layer1.0.conv1.weight'])

    linear_sd = ride_cifar_state_dict(n=3, num_classes=10, use_norm=False)
    linear = timm.create_model('ride_resnet20_cifar', num_classes=10, head_norm=False)
    linear.load_state_dict(ride_checkpoint_filter_fn(linear_sd, linear))
    torch.testing.assert_close(linear.heads[2].bias, linear_sd['backbone.linears.2.bias'])


@pytest.mark.parametrize('name,groups,wpg', [('ride_resnet50', 1, 64), ('ride_resnext50_32x4d', 32, 4)])
def test_filter_maps_ride_imagenet_layout(name, groups, wpg):
    """Every key of RIDE's ImageNet ResNet-50 / ResNeXt-50 (reduce_dimension, 3 experts) lands on a tensor of the
    same shape, and nothing is left over (same parameter count as RIDE)."""
    shapes = ride_resnet50_shapes(num_classes=1000, groups=groups, width_per_group=wpg)
    model = timm.create_model(name, num_classes=1000)
    fake = {k: torch.empty(s) for k, s in shapes.items()}
    mapped = ride_checkpoint_filter_fn({'state_dict': fake}, model)
    own = model.state_dict()
    assert set(mapped) == set(own)
    assert all(mapped[k].shape == own[k].shape for k in own)
    assert mapped['experts.2.layer4.0.downsample.0.weight'].shape == (1536, 768, 1, 1)


# --- router ---------------------------------------------------------------------------------------------------------

def _force_router(model, go: bool):
    with torch.no_grad():
        model.router.fc.weight.zero_()
        model.router.fc.bias.fill_(20. if go else -20.)


@pytest.mark.parametrize('experts', [2, 3, 4])
def test_router_always_or_never(experts):
    model = timm.create_model('ride_resnet20_cifar', num_experts=experts, num_classes=10, router=True).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        shared = model.forward_shared(x)
        pooled = torch.stack([model.experts[i](shared).mean((2, 3)) for i in range(experts)], 1)
        per_expert = model._expert_logits(pooled)
        _force_router(model, go=True)
        logits, used = model.forward_with_experts_used(x)
        assert used.tolist() == [experts] * 5
        torch.testing.assert_close(logits, per_expert.mean(1))
        _force_router(model, go=False)
        logits, used = model.forward_with_experts_used(x)
        assert used.tolist() == [1] * 5
        torch.testing.assert_close(logits, per_expert[:, 0])
        torch.testing.assert_close(model(x), per_expert[:, 0])
        model.disable_router()
        logits, used = model.forward_with_experts_used(x)
        assert used.tolist() == [experts] * 5


def test_freeze_for_router_training():
    model = timm.create_model('ride_resnet20_cifar', num_classes=10)
    with pytest.raises(ValueError, match='no router'):
        freeze_for_router_training(model)
    model.enable_router()
    freeze_for_router_training(model)
    model.train()
    assert model.training and model.router.training and not model.layer1.training and not model.experts.training
    bn_before = model.experts[1].layer3[0].bn1.running_mean.clone()
    opt = torch.optim.SGD(router_parameters(model), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loss_fn = create_loss('ride_ea', [100, 60, 30, 20, 10, 8, 6, 4, 2, 1])
    model.set_expert_training(True)
    out = model(torch.randn(8, 3, 32, 32))
    assert len(out) == 3 and out[2].shape == (8, 2)
    loss = loss_fn(out, torch.randint(0, 10, (8,)))
    loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        if name.startswith('router.'):
            assert p.requires_grad and p.grad is not None
        else:
            assert not p.requires_grad and p.grad is None, name
    assert model.router.fc.weight.grad.abs().sum() > 0
    assert torch.equal(model.experts[1].layer3[0].bn1.running_mean, bn_before)  # frozen BN statistics
    freeze_for_router_training(model, freeze=False)
    model.train()
    assert all(p.requires_grad for p in model.parameters()) and model.layer1.training


def test_router_loss_never_trains_experts():
    """Router inputs are detached: without freezing, the ride_ea loss still leaves the experts without gradient."""
    model = timm.create_model('ride_resnet20_cifar', num_classes=10, router=True)
    model.set_expert_training(True)
    loss = create_loss('ride_ea', [10] * 10)(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,)))
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith('router.'))


# --- DDP --------------------------------------------------------------------------------------------------------------

def test_torchrun_ddp_every_expert_gets_gradients(tmp_path):
    script = tmp_path / 'worker.py'
    script.write_text(textwrap.dedent(f'''
        import json, os
        import torch, torch.distributed as dist
        import timm, timm_cmo
        from timm_cmo.losses import create_loss
        dist.init_process_group('gloo')
        rank = dist.get_rank()
        torch.manual_seed(0)
        model = timm.create_model('ride_resnet20_cifar', num_classes=10)
        model.set_expert_training(True)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        loss_fn = create_loss('ride', [100, 60, 30, 20, 10, 8, 6, 4, 2, 1], reweight='drw', drw_epoch=1,
                              additional_diversity_factor=-0.45)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(rank)
        steps = []
        for step in range(2):
            loss_fn.set_epoch(step)
            x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
            opt.zero_grad()
            loss = loss_fn(ddp(x), y)
            loss.backward()
            missing = [n for n, p in model.named_parameters() if p.grad is None]
            experts = [sum(p.grad.abs().sum().item() for p in model.experts[i].parameters()) for i in range(3)]
            heads = [model.heads[i].weight.grad.abs().sum().item() for i in range(3)]
            steps.append(dict(loss=loss.item(), missing=missing, experts=experts, heads=heads,
                              shared=model.layer1[0].conv1.weight.grad.abs().sum().item()))
            opt.step()
        with open(os.path.join(r"{tmp_path}", f"rank{{rank}}.json"), "w") as f:
            json.dump(steps, f)
        dist.destroy_process_group()
    '''))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2))
    for steps in (r0, r1):
        for s in steps:
            assert not s['missing'] and all(v > 0 for v in s['experts'] + s['heads']) and s['shared'] > 0
    for a, b in zip(r0, r1):  # gradients are averaged across ranks, losses are per rank
        assert a['experts'] == pytest.approx(b['experts'], rel=1e-5)
        assert a['heads'] == pytest.approx(b['heads'], rel=1e-5)
        assert a['loss'] != b['loss']
