"""Converter: paper checkpoints -> timm folder, checked against an independent functional forward pass."""
import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_cmo  # noqa: F401
from timm_cmo.convert import convert_checkpoint, load_checkpoint_state_dict, main
from timm_cmo.models import NormedLinear

REPO_ROOT = Path(__file__).resolve().parents[2]


def paper_state_dict(n: int, num_classes: int, normed: bool, prefix: str = 'module.', seed: int = 0):
    """A state dict named as LDAM-DRW's resnet_cifar (classifier 'linear'), random weights and BN stats."""
    g = torch.Generator().manual_seed(seed)
    sd: Dict[str, torch.Tensor] = {}

    def conv(name, cout, cin):
        sd[name + '.weight'] = torch.randn(cout, cin, 3, 3, generator=g) * math.sqrt(2 / (cin * 9))

    def bn(name, c):
        sd[name + '.weight'] = 1 + 0.2 * torch.randn(c, generator=g)
        sd[name + '.bias'] = 0.2 * torch.randn(c, generator=g)
        sd[name + '.running_mean'] = 0.2 * torch.randn(c, generator=g)
        sd[name + '.running_var'] = 0.5 + torch.rand(c, generator=g)
        sd[name + '.num_batches_tracked'] = torch.tensor(1000)

    conv('conv1', 16, 3)
    bn('bn1', 16)
    in_planes = 16
    for s, planes in enumerate((16, 32, 64), start=1):
        for b in range(n):
            conv(f'layer{s}.{b}.conv1', planes, in_planes)
            bn(f'layer{s}.{b}.bn1', planes)
            conv(f'layer{s}.{b}.conv2', planes, planes)
            bn(f'layer{s}.{b}.bn2', planes)
            in_planes = planes
    if normed:  # NormedLinear: (in_features, out_features), no bias
        sd['linear.weight'] = torch.empty(64, num_classes).uniform_(-1, 1, generator=g)
    else:
        sd['linear.weight'] = torch.randn(num_classes, 64, generator=g) * 0.1
        sd['linear.bias'] = torch.randn(num_classes, generator=g) * 0.1
    return {prefix + k: v for k, v in sd.items()}


def reference_forward(sd: Dict[str, torch.Tensor], x: torch.Tensor, n: int) -> torch.Tensor:
    """The paper's ResNet forward (eval mode) written with functional ops on its own state dict."""
    sd = {k.removeprefix('module.'): v for k, v in sd.items()}

    def bn(t, name):
        return F.batch_norm(t, sd[name + '.running_mean'], sd[name + '.running_var'], sd[name + '.weight'],
                            sd[name + '.bias'], training=False, eps=1e-5)

    x = F.relu(bn(F.conv2d(x, sd['conv1.weight'], padding=1), 'bn1'))
    in_planes = 16
    for s, planes in enumerate((16, 32, 64), start=1):
        for b in range(n):
            p = f'layer{s}.{b}'
            stride = 2 if s > 1 and b == 0 else 1
            out = F.relu(bn(F.conv2d(x, sd[p + '.conv1.weight'], stride=stride, padding=1), p + '.bn1'))
            out = bn(F.conv2d(out, sd[p + '.conv2.weight'], padding=1), p + '.bn2')
            if stride != 1 or in_planes != planes:  # option A
                shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), 'constant', 0)
            else:
                shortcut = x
            x = F.relu(out + shortcut)
            in_planes = planes
    x = F.avg_pool2d(x, x.size()[3]).view(x.size(0), -1)
    if 'linear.bias' in sd:
        return F.linear(x, sd['linear.weight'], sd['linear.bias'])
    return F.normalize(x, dim=1).mm(F.normalize(sd['linear.weight'], dim=0))


def save_paper_ckpt(path: Path, sd, **extra) -> Path:
    torch.save({'epoch': 199, 'state_dict': sd, 'best_acc1': torch.tensor(77.0), **extra}, path)
    return path


def check_logits(out_dir: Path, sd, n: int, normed: bool, num_classes: int):
    model = timm.create_model(f'local-dir:{out_dir}', pretrained=True).eval()
    assert isinstance(model.fc, NormedLinear) is normed
    assert model.num_classes == num_classes
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
    ref = reference_forward(sd, x, n)
    assert out.shape == ref.shape == (3, num_classes)
    assert ref.std() > 1e-3  # non-trivial logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_convert_normed_cifar_cli(tmp_path, capsys):
    sd = paper_state_dict(5, 100, normed=True)
    ckpt = save_paper_ckpt(tmp_path / 'ckpt.best.pth.tar', sd)
    out_dir = tmp_path / 'out'
    assert main([str(ckpt), str(out_dir), '--model', 'resnet32_cifar']) == 0
    summary = capsys.readouterr().out
    for text in ('resnet32_cifar', 'num_classes=100', 'NormedLinear', 'epoch=199', 'best_acc1=77.00'):
        assert text in summary
    assert {p.name for p in out_dir.iterdir()} == {'config.json', 'model.safetensors'}
    cfg = json.loads((out_dir / 'config.json').read_text())
    assert cfg['architecture'] == 'resnet32_cifar' and cfg['model_args']['head_norm'] is True
    assert cfg['num_classes'] == 100 and cfg['pretrained_cfg']['input_size'] == [3, 32, 32]
    check_logits(out_dir, sd, 5, normed=True, num_classes=100)


def test_convert_linear_cifar_subprocess(tmp_path):
    sd = paper_state_dict(3, 10, normed=False, seed=2)
    ckpt = save_paper_ckpt(tmp_path / 'ckpt.pth.tar', sd)
    out_dir = tmp_path / 'out'
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get('PYTHONPATH')])))
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_cmo.convert', str(ckpt), str(out_dir), '--model', 'resnet20_cifar',
         '--num-classes', '10'],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert 'num_classes=10' in proc.stdout and 'head=Linear' in proc.stdout
    assert 'head_norm' not in json.loads((out_dir / 'config.json').read_text())['model_args']
    check_logits(out_dir, sd, 3, normed=False, num_classes=10)


def test_convert_bare_state_dict_no_prefix(tmp_path):
    sd = paper_state_dict(3, 10, normed=True, prefix='', seed=3)
    sd = {k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')}  # PyTorch < 0.4.1 checkpoints
    ckpt = tmp_path / 'plain.pth'
    torch.save(sd, ckpt)
    assert convert_checkpoint(ckpt, tmp_path / 'out', 'resnet20_cifar', num_classes=10) == tmp_path / 'out'
    check_logits(tmp_path / 'out', sd, 3, normed=True, num_classes=10)


def test_convert_torchvision_layout_resnet18(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model('resnet18', num_classes=12)
    with torch.no_grad():  # random BN statistics and affine params so the check is meaningful
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.2)
    ckpt = tmp_path / 'r18.pth'
    torch.save({'state_dict': src.state_dict(), 'epoch': 3}, ckpt)
    convert_checkpoint(ckpt, tmp_path / 'out', 'resnet18')
    model = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src.eval()(x))
    assert model.num_classes == 12 and isinstance(model.fc, torch.nn.Linear)
    # the paper's ImageNet-LT / iNaturalist evaluation preprocessing travels with the weights
    cfg = json.loads((tmp_path / 'out' / 'config.json').read_text())['pretrained_cfg']
    assert cfg['input_size'] == [3, 224, 224] and cfg['crop_pct'] == 0.875 and cfg['interpolation'] == 'bilinear'
    assert 'test_input_size' not in cfg
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg['input_size'] == (3, 224, 224) and data_cfg['crop_pct'] == 0.875


def test_convert_normed_timm_resnet18(tmp_path):
    """ImageNet-LT style: torchvision/timm ResNet layout with a NormedLinear 'fc' (no bias, (in, out))."""
    torch.manual_seed(0)
    src = timm.create_model('resnet18', num_classes=6, head_norm=True).eval()
    sd = {'module.' + k: v for k, v in src.state_dict().items()}
    assert sd['module.fc.weight'].shape == (512, 6) and 'module.fc.bias' not in sd
    save_paper_ckpt(tmp_path / 'r18n.pth.tar', sd)
    convert_checkpoint(tmp_path / 'r18n.pth.tar', tmp_path / 'out', 'resnet18')
    model = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True).eval()
    assert isinstance(model.fc, NormedLinear)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = src.forward_head(src.forward_features(x), pre_logits=True)
        ref = F.normalize(feats, dim=1).mm(F.normalize(sd['module.fc.weight'], dim=0))
        torch.testing.assert_close(model(x), ref)


def test_load_strips_prefix_and_reads_meta(tmp_path):
    ckpt = save_paper_ckpt(tmp_path / 'c.pth.tar', paper_state_dict(3, 10, normed=True))
    sd, meta = load_checkpoint_state_dict(ckpt)
    assert 'conv1.weight' in sd and not any(k.startswith('module.') for k in sd)
    assert meta == {'epoch': 199, 'best_acc1': 77.0}


def _convert_error(tmp_path, sd, model='resnet20_cifar', ckpt_extra=None, **kwargs) -> str:
    ckpt = save_paper_ckpt(tmp_path / 'bad.pth.tar', sd, **(ckpt_extra or {}))
    with pytest.raises(ValueError) as info:
        convert_checkpoint(ckpt, tmp_path / 'out', model, **kwargs)
    assert not (tmp_path / 'out').exists()
    return str(info.value)


def test_error_missing_key(tmp_path):
    sd = paper_state_dict(3, 10, normed=True)
    del sd['module.layer2.0.conv1.weight']
    msg = _convert_error(tmp_path, sd)
    assert 'missing keys (1): layer2.0.conv1.weight' in msg


def test_error_unexpected_key(tmp_path):
    sd = paper_state_dict(3, 10, normed=True)
    sd['module.layer4.0.conv1.weight'] = torch.zeros(1)
    msg = _convert_error(tmp_path, sd)
    assert 'unexpected keys (1): layer4.0.conv1.weight' in msg


def test_error_wrong_depth(tmp_path):
    msg = _convert_error(tmp_path, paper_state_dict(5, 10, normed=True), model='resnet20_cifar')
    assert 'unexpected keys (72)' in msg  # blocks 3 and 4 of each stage, 12 keys each and 'layer3.4.bn2.running_var' in msg


def test_error_shape_mismatch(tmp_path):
    sd = paper_state_dict(3, 10, normed=False)
    sd['module.layer1.0.conv1.weight'] = torch.zeros(16, 16, 1, 1)
    msg = _convert_error(tmp_path, sd)
    assert 'shape mismatch for layer1.0.conv1.weight: checkpoint (16, 16, 1, 1), model (16, 16, 3, 3)' in msg


def test_error_normed_head_wrong_features(tmp_path):
    sd = paper_state_dict(3, 10, normed=True)
    sd['module.linear.weight'] = torch.zeros(10, 64)  # (out, in) without bias: not a NormedLinear of this model
    msg = _convert_error(tmp_path, sd)
    assert 'fc.weight' in msg and '(10, 64)' in msg and '64 features' in msg


def test_error_num_classes_disagree(tmp_path, capsys):
    sd = paper_state_dict(3, 10, normed=True)
    msg = _convert_error(tmp_path, sd, num_classes=100)
    assert 'num_classes=100' in msg and '10 classes' in msg
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / 'bad.pth.tar'), str(tmp_path / 'out'), '--model', 'resnet20_cifar',
              '--num-classes', '100'])
    assert info.value.code == 2
    assert 'num_classes=100' in capsys.readouterr().err


def test_error_unknown_model(tmp_path):
    msg = _convert_error(tmp_path, paper_state_dict(3, 10, normed=True), model='resnet_nope')
    assert 'resnet_nope' in msg


def test_refuses_pickled_objects(tmp_path):
    import fractions
    sd = paper_state_dict(3, 10, normed=True)
    msg = _convert_error(tmp_path, sd, ckpt_extra={'note': fractions.Fraction(1, 3)})
    assert 'holds pickled Python objects' in msg and 'fractions.Fraction' in msg and 'bad.pth.tar' in msg


@pytest.mark.parametrize('content', [b'\x00\x17random bytes' * 50, b'epoch: 3\nstate_dict: none\n', 'truncated'])
def test_not_a_checkpoint_names_the_file(tmp_path, content, capsys):
    path = tmp_path / 'weird.pth.tar'
    if content == 'truncated':
        save_paper_ckpt(tmp_path / 'full.pth.tar', paper_state_dict(3, 10, normed=False))
        data = (tmp_path / 'full.pth.tar').read_bytes()
        path.write_bytes(data[:len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        main([str(path), str(tmp_path / 'out'), '--model', 'resnet20_cifar'])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert 'not a checkpoint' in err and str(path) in err
    assert not (tmp_path / 'out').exists()


def test_missing_classifier_and_unexpected_keys_are_named(tmp_path):
    sd = paper_state_dict(3, 10, normed=False)
    del sd['module.linear.weight'], sd['module.linear.bias']
    sd['module.extra.weight'] = torch.zeros(3)
    msg = _convert_error(tmp_path, sd, num_classes=10)
    assert 'it has no classifier' in msg and 'missing keys (2): fc.weight, fc.bias' in msg
    assert 'unexpected keys (1): extra.weight' in msg


def test_state_dict_with_non_tensors(tmp_path):
    ckpt = tmp_path / 'x.pth'
    torch.save({'state_dict': {'conv1.weight': torch.zeros(1), 'step': 3}}, ckpt)
    with pytest.raises(ValueError, match="'state_dict' .* non-tensor entries step"):
        load_checkpoint_state_dict(ckpt)


def test_no_state_dict(tmp_path):
    ckpt = tmp_path / 'x.pth'
    torch.save({'epoch': 1, 'acc': 3.0}, ckpt)
    with pytest.raises(ValueError, match="holds no state dict.*'acc', 'epoch'"):
        convert_checkpoint(ckpt, tmp_path / 'out', 'resnet20_cifar')


class RIDEConfigParser:
    """RIDE pickles its whole ConfigParser into every checkpoint."""
    def __init__(self):
        self.config = {'arch': 'ResNet32Model'}


@pytest.mark.parametrize('top_k', [None, 30])
def test_ride_released_checkpoint(tmp_path, top_k):
    """RIDE's model-zoo file (DataParallel prefixes, backbone.* keys, a pickled config, with or without the EA
    router) converts to a folder timm loads, giving RIDE's logits."""
    from tests.models.test_ride import ride_cifar_state_dict, ride_reference_forward
    ride_sd = ride_cifar_state_dict(seed=3, top_k=top_k)
    path = tmp_path / 'checkpoint-epoch200.pth'
    torch.save({'arch': 'ResNet32Model', 'epoch': 200, 'config': RIDEConfigParser(),
                'state_dict': {'module.' + k: v for k, v in ride_sd.items()}}, path)
    out = convert_checkpoint(path, tmp_path / 'out', 'ride_resnet32_cifar')
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert model.num_experts == 3 and model.num_classes == 100 and (model.router is not None) == bool(top_k)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if top_k:
            (logits, used), (ref, ref_used) = model.forward_with_experts_used(x), ride_reference_forward(ride_sd, x, route=True)
            assert torch.equal(used, ref_used)
        else:
            logits, ref = model(x), ride_reference_forward(ride_sd, x)
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
