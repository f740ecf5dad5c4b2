"""hub.py: export a run folder, load it back through huggingface_hub's cache offline, push (mocked / offline), CLI."""
import argparse
import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import timm_cmo  # noqa: F401
from timm_cmo import hub
from timm_cmo.hub import export, main, push
from timm_cmo.metrics import ClassAccuracy
from timm_cmo.models import NormedLinear
from timm_cmo.results import results_table_markdown, write_results

CIFAR10 = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
TOKEN = 'hf_SECRETtoken1234567890abcdef'

RUN_ARGS = dict(
    model='resnet20_cifar', num_classes=10, head_norm=True, in_chans=None, input_size=[3, 32, 32],
    mean=[0.4914, 0.4822, 0.4465], std=[0.2023, 0.1994, 0.201], crop_pct=1.0, interpolation='',
    dataset='torch/cifar10', data_dir='/data/cifar10', imb_ratio=100.0, imb_max=None, imb_seed=0,
    loss='ldam', reweight='drw', drw_epoch=160, cmo=True, cmo_r=1.0, cmo_prob=0.5, cmo_beta=1.0,
    cmo_mode='batch', cmo_variant='cmo', epochs=200, lr=0.1, opt='sgd', sched='multistep', weight_decay=2e-4,
    batch_size=128, model_ema=False, config='hparams/cifar10_lt_r100_ldam_drw_cmo.yaml', seed=0, workers=4,
)


def random_model(seed: int = 0, in_chans: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model('resnet20_cifar', num_classes=10, head_norm=True, in_chans=in_chans)
    with torch.no_grad():  # non-trivial BN statistics so that eval logits depend on them
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.2)
    return model.eval()


def make_run(run_dir: Path, ema: bool = False, run_model: torch.nn.Module = None, **arg_overrides) -> torch.nn.Module:
    """A run folder as train_cmo.py writes it: args.yaml, last.pth.tar (timm CheckpointSaver layout), results.json
    (of ``run_model``, a random resnet20_cifar by default)."""
    run_dir.mkdir(parents=True)
    args = dict(RUN_ARGS, **arg_overrides)
    build = {} if run_model is None else dict(model_build=hub.model_build(run_model))  # as train_cmo.py records it
    model = run_model if run_model is not None else random_model(in_chans=args['in_chans'] or 3)
    (run_dir / 'args.yaml').write_text(yaml.safe_dump(args))
    ckpt = {
        'epoch': 199, 'arch': args['model'],
        'state_dict': {'module.' + k: v for k, v in model.state_dict().items()},  # DDP prefix
        'optimizer': torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict(),
        'version': 2, 'metric': 77.5, 'args': argparse.Namespace(**args),
        'saver': {'checkpoint_files': [('checkpoint-199.pth.tar', 77.5)], 'best_epoch': 150, 'best_metric': 78.0},
    }
    if ema:
        ckpt['state_dict_ema'] = random_model(seed=1).state_dict()
    torch.save(ckpt, run_dir / 'last.pth.tar')

    g = torch.Generator().manual_seed(0)
    target = torch.arange(10).repeat(30)
    logits = torch.randn(300, 10, generator=g)
    logits[torch.arange(300), target] += torch.linspace(2.5, 0., 10).repeat(30)  # head classes more accurate
    metric = ClassAccuracy(10)
    metric.update(logits, target)
    extra = dict(
        model=args['model'], **build,
        dataset=dict(name='torch/cifar10', data_dir='/data/cifar10', imb_ratio=100.0, imb_max=None, imb_seed=0,
                     num_classes=10, train_images=sum(COUNTS), class_counts=COUNTS),
        method=dict(loss='ldam', reweight='drw', drw_epoch=160, cmo=True, cmo_r=1.0, cmo_prob=0.5, cmo_beta=1.0,
                    cmo_mode='batch', cmo_variant='cmo'),
        epoch=199, command='train_cmo.py --config hparams/cifar10_lt_r100_ldam_drw_cmo.yaml',
        config=args['config'], best=dict(metric='top1', value=78.0, epoch=150),
    )
    write_results(run_dir, metric.summary(COUNTS), metric.per_class(), COUNTS, CIFAR10, extra)
    return model


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp('hub') / 'run'
    return run_dir, make_run(run_dir)


def test_export_files_config_and_card(run, tmp_path):
    run_dir, model = run
    out = export(run_dir, tmp_path / 'export')
    assert out == tmp_path / 'export'
    assert {p.name for p in out.iterdir()} == {'config.json', 'model.safetensors', 'README.md', 'results.json'}
    assert not [p for p in tmp_path.iterdir() if p.name != 'export']  # staging folder removed

    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['architecture'] == 'resnet20_cifar' and cfg['num_classes'] == 10
    assert cfg['model_args']['head_norm'] is True and cfg['label_names'] == CIFAR10
    pcfg = cfg['pretrained_cfg']
    assert pcfg['input_size'] == [3, 32, 32] and pcfg['crop_pct'] == 1.0
    assert pcfg['mean'] == pytest.approx(RUN_ARGS['mean']) and pcfg['std'] == pytest.approx(RUN_ARGS['std'])

    weights = load_file(out / 'model.safetensors')
    assert weights.keys() == model.state_dict().keys()  # 'module.' stripped
    torch.testing.assert_close(weights['fc.weight'], model.state_dict()['fc.weight'])

    results = json.loads((out / 'results.json').read_text())
    assert results == json.loads((run_dir / 'results.json').read_text())
    card = (out / 'README.md').read_text()
    front = yaml.safe_load(card.split('---')[1])
    assert front == {'tags': ['image-classification', 'timm', 'long-tail', 'cmo'], 'library_name': 'timm',
                     'license': 'apache-2.0'}
    assert results_table_markdown(results).strip() in card
    m = results['metrics']
    for key in ('top1', 'many', 'medium', 'head', 'middle', 'tail'):
        assert f'{m[key]:.1f}' in card
    assert '| All | Many | Medium | Few |' in card and '| Head | Middle | Tail |' in card
    for text in ('Park et al.', 'CVPR 2022', 'LDAM', 'DRW', 'epoch 160', '`torch/cifar10`', '| Imbalance ratio',
                 '100', '12406', 'cifar10_lt_r100_ldam_drw_cmo.yaml', '| Epochs | 200 |', 'sgd', 'multistep',
                 "import timm_cmo", "hf-hub:<org>/<name>", 'is an architecture of the timm-cmo plugin',
                 'Best top1 during training: 78.00 (epoch 150)', '`last.pth.tar`, epoch 199'):
        assert text in card, text


def test_ride_export_loads_with_another_class_count(tmp_path):
    """An exported RIDE run (4 experts, a router) loads as timm loads any classifier with another class count
    (``num_classes=`` at creation): the exported pretrained_cfg names all 4 heads, they and the router (which reads
    their logits) are new, everything else is the run's; with the run's class count everything is."""
    torch.manual_seed(0)
    model = timm.create_model('ride_resnet20_cifar', num_classes=10, num_experts=4, router=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    make_run(tmp_path / 'run', run_model=model, model='ride_resnet20_cifar', model_kwargs={'num_experts': 4},
             head_norm=False, loss='ride', stage2='router')
    out = export(tmp_path / 'run', tmp_path / 'export')
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['pretrained_cfg']['classifier'] == ['heads.0', 'heads.1', 'heads.2', 'heads.3']
    assert cfg['model_args']['num_experts'] == 4 and cfg['model_args']['router'] is True
    x = torch.randn(3, 3, 32, 32)
    same = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(same(x), model(x))
    with pytest.warns(UserWarning, match='keeping the model.s new heads and router'):
        other = timm.create_model(f'local-dir:{out}', pretrained=True, num_classes=7).eval()
    assert other.num_classes == 7 and other.router is not None and other.router.top_k == 7
    own, loaded = model.state_dict(), other.state_dict()
    fresh = timm.create_model('ride_resnet20_cifar', num_classes=7, num_experts=4, router=True).state_dict()
    for k, v in loaded.items():
        if k.startswith(('heads.', 'router.')):
            assert v.shape == fresh[k].shape, k
        else:
            assert torch.equal(v, own[k]), k
    assert all(loaded[f'heads.{i}.weight'].shape == (48, 7) for i in range(4))
    with torch.no_grad():
        assert other(x).shape == (3, 7)
        torch.testing.assert_close(other.forward_features(x), model.forward_features(x), rtol=0, atol=0)


def test_hf_hub_cache_offline_round_trip(run, tmp_path, monkeypatch):
    """The download side for real: hf-hub:org/name resolved from a huggingface_hub cache in offline mode."""
    run_dir, model = run
    repo_id = 'timm-cmo-test/resnet20-cifar10-lt'
    out = export(run_dir, tmp_path / 'export', repo_id=repo_id)
    assert f"timm.create_model('hf-hub:{repo_id}', pretrained=True)" in (out / 'README.md').read_text()

    cache = tmp_path / 'hf_cache'
    repo_cache = cache / ('models--' + repo_id.replace('/', '--'))
    commit = hashlib.sha1(b'timm-cmo export').hexdigest()
    shutil.copytree(out, repo_cache / 'snapshots' / commit)
    (repo_cache / 'refs').mkdir()
    (repo_cache / 'refs' / 'main').write_text(commit)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))

    loaded = timm.create_model(f'hf-hub:{repo_id}', pretrained=True).eval()
    assert isinstance(loaded.fc, NormedLinear) and loaded.num_classes == 10
    assert loaded.pretrained_cfg['label_names'] == CIFAR10
    assert timm.data.resolve_model_data_config(loaded)['input_size'] == (3, 32, 32)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, out_logits = model(x), loaded(x)
    assert ref.std() > 1e-3
    torch.testing.assert_close(out_logits, ref)


def test_one_channel_run_exports_its_data_config(tmp_path):
    """A --in-chans 1 run: the model's pretrained config holds 3-channel values, the export holds the run's."""
    run_dir = tmp_path / 'run'
    model = make_run(run_dir, in_chans=1, input_size=None, mean=None, std=None)
    out = export(run_dir, tmp_path / 'export')
    pcfg = json.loads((out / 'config.json').read_text())['pretrained_cfg']
    default = timm.create_model('resnet20_cifar').pretrained_cfg
    assert len(default['mean']) == 3 and pcfg['input_size'] == [1, *default['input_size'][1:]]
    assert pcfg['mean'] == pytest.approx([sum(default['mean']) / 3])
    assert pcfg['std'] == pytest.approx([sum(default['std']) / 3])

    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    data_config = timm.data.resolve_model_data_config(loaded)
    transform = timm.data.create_transform(**data_config, is_training=False)
    gray = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8), mode='L')
    x = transform(gray)
    assert x.shape == (1, 32, 32)
    torch.testing.assert_close(x, (torch.from_numpy(np.array(gray)).float()[None] / 255 - pcfg['mean'][0])
                               / pcfg['std'][0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x[None]), model(x[None]))


def test_export_ema_and_errors(tmp_path):
    run_dir = tmp_path / 'run'
    make_run(run_dir, ema=True, head_norm=True)
    export(run_dir, tmp_path / 'ema', use_ema=True)
    weights = load_file(tmp_path / 'ema' / 'model.safetensors')
    torch.testing.assert_close(weights['conv1.weight'], random_model(seed=1).state_dict()['conv1.weight'])
    assert 'EMA weights' in (tmp_path / 'ema' / 'README.md').read_text()

    with pytest.raises(FileNotFoundError, match='model_best.pth.tar'):
        export(run_dir, tmp_path / 'best', checkpoint='best')
    (run_dir / 'results.json').unlink()
    with pytest.raises(FileNotFoundError, match='results.json'):
        export(run_dir, tmp_path / 'x')
    with pytest.raises(FileNotFoundError, match='args.yaml'):
        export(tmp_path / 'ema', tmp_path / 'x')
    # a run whose args do not match the checkpoint (linear head) fails strict loading
    args = yaml.safe_load((run_dir / 'args.yaml').read_text())
    (run_dir / 'args.yaml').write_text(yaml.safe_dump(dict(args, head_norm=False)))
    shutil.copyfile(tmp_path / 'ema' / 'results.json', run_dir / 'results.json')
    with pytest.raises(ValueError, match='does not match resnet20_cifar'):
        export(run_dir, tmp_path / 'x')
    assert not (tmp_path / 'x').exists()


def test_no_ema_in_checkpoint(run, tmp_path, capsys):
    run_dir, _ = run
    assert main(['export', str(run_dir), str(tmp_path / 'out'), '--ema']) == 1
    err = capsys.readouterr().err
    assert 'no EMA weights' in err and len(err.strip().splitlines()) == 1


def all_file_bytes(root: Path) -> bytes:
    return b''.join(p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file())


def test_push_upload_fails_export_intact_token_never_written(run, tmp_path, monkeypatch, capsys):
    run_dir, _ = run
    work = tmp_path / 'work'
    shutil.copytree(run_dir, work)

    def offline(*args, **kwargs):
        raise ConnectionError('Network is unreachable')

    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', offline)
    monkeypatch.setattr(huggingface_hub.HfApi, 'upload_folder', offline)
    with pytest.raises(hub.HubUploadError) as info:
        push(work, 'org/name', token=TOKEN, private=True)
    msg = str(info.value)
    out_dir = work / 'hub_export'
    assert f'local export at {out_dir} is intact' in msg and 'Network is unreachable' in msg
    assert f'python -m timm_cmo.hub push {work} org/name --out-dir {out_dir}' in msg and '--private' in msg
    assert {p.name for p in out_dir.iterdir()} == {'config.json', 'model.safetensors', 'README.md', 'results.json'}
    assert "hf-hub:org/name" in (out_dir / 'README.md').read_text()
    assert TOKEN not in msg
    assert TOKEN.encode() not in all_file_bytes(tmp_path)

    # the CLI reports it in one line, exit code 1
    assert main(['push', str(work), 'org/name']) == 1
    captured = capsys.readouterr()
    assert 'is intact' in captured.err and len(captured.err.strip().splitlines()) == 1
    assert TOKEN not in captured.out + captured.err


@pytest.mark.parametrize('source', ['env', 'login_cache'])
def test_server_error_echoing_the_token_never_shows_it(run, tmp_path, monkeypatch, capsys, caplog, source):
    """A server error that echoes the request (its Authorization header) must not print or log the token when it
    came from HF_TOKEN or the login cache, not only when it was passed in."""
    run_dir, _ = run
    secret = 'hf_' + 'S3cr3tT0kenFromTheEnvironment' + source
    if source == 'env':
        monkeypatch.setenv('HF_TOKEN', secret)
    else:
        monkeypatch.delenv('HF_TOKEN', raising=False)
        monkeypatch.setattr(huggingface_hub, 'get_token', lambda: secret)

    def echo(self, *args, **kwargs):
        raise RuntimeError(f'500 Server Error for request headers {{"authorization": "Bearer {secret}"}}')

    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', echo)
    with pytest.raises(hub.HubUploadError) as info:
        push(run_dir, 'org/name', out_dir=tmp_path / 'exp')
    assert secret not in str(info.value) and 'Bearer ***' in str(info.value)
    assert main(['push', str(run_dir), 'org/name', '--out-dir', str(tmp_path / 'exp2')]) == 1
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err + caplog.text
    assert secret.encode() not in all_file_bytes(tmp_path)


def test_push_real_client_offline_mode(run, tmp_path, monkeypatch):
    """No mocks: huggingface_hub in offline mode refuses the request; the export stays."""
    run_dir, _ = run
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(hub.HubUploadError, match='is intact'):
        push(run_dir, 'org/name', out_dir=tmp_path / 'exp', token=TOKEN)
    assert (tmp_path / 'exp' / 'model.safetensors').is_file()
    assert TOKEN.encode() not in all_file_bytes(tmp_path)


def test_push_success_records_calls(run, tmp_path, monkeypatch):
    run_dir, _ = run
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls['create_repo'] = dict(repo_id=repo_id, token=self.token, **kwargs)
        return huggingface_hub.hf_api.RepoUrl(f'https://huggingface.co/{repo_id}')

    def upload_folder(self, **kwargs):
        calls['upload_folder'] = kwargs
        calls['uploaded'] = sorted(p.name for p in Path(kwargs['folder_path']).iterdir())

    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, 'upload_folder', upload_folder)
    out_dir = tmp_path / 'exp'
    url = push(run_dir, 'org/name', out_dir=out_dir, checkpoint='last', token=TOKEN)
    assert url == 'https://huggingface.co/org/name'
    assert calls['create_repo'] == dict(repo_id='org/name', token=TOKEN, exist_ok=True, private=False, repo_type='model')
    up = calls['upload_folder']
    assert Path(up['folder_path']) == out_dir and up['repo_id'] == 'org/name'
    assert calls['uploaded'] == ['README.md', 'config.json', 'model.safetensors', 'results.json']
    assert TOKEN.encode() not in all_file_bytes(tmp_path)
    with pytest.raises(ValueError):
        push(run_dir, 'not a/valid//id', out_dir=out_dir)


def test_cli_export_and_missing_checkpoint(run, tmp_path, capsys):
    run_dir, _ = run
    assert main(['export', str(run_dir), str(tmp_path / 'out')]) == 0
    assert 'Exported' in capsys.readouterr().out
    assert (tmp_path / 'out' / 'model.safetensors').is_file()

    broken = tmp_path / 'broken'
    shutil.copytree(run_dir, broken)
    (broken / 'last.pth.tar').unlink()
    assert main(['export', str(broken), str(tmp_path / 'out2')]) == 1
    err = capsys.readouterr().err
    assert 'last.pth.tar' in err and len(err.strip().splitlines()) == 1
    assert main(['export', str(run_dir), str(tmp_path / 'out3'), '--checkpoint', 'best']) == 1
    assert 'model_best.pth.tar' in capsys.readouterr().err
    assert not (tmp_path / 'out2').exists() and not (tmp_path / 'out3').exists()


def test_card_for_timm_resnet_baseline():
    """A timm architecture without head_norm and without CMO: plain timm usage, baseline wording."""
    args = dict(RUN_ARGS, model='resnet18', head_norm=False, cmo=False, loss='ce', reweight='none', config='')
    results = dict(metrics=dict(top1=50.0, top5=80.0, many=60.0, medium=None, few=None, head=70.0, middle=50.0,
                                tail=30.0, samples=100),
                   method=dict(loss='ce', reweight='none', cmo=False))
    card = hub.model_card(args, results, repo_id='org/r18')
    assert 'not needed' in card and 'import timm_cmo' not in card.split('## Usage')[1].split('```python')[1]
    assert 'without CMO' in card and '| 50.0 | 60.0 | – | – |' in card and 'Recipe file' not in card
    card = hub.model_card(dict(args, head_norm=True), results)
    assert "the plugin's `head_norm` classifier" in card
    for loss, words in (('lade', 'LADE (PC softmax with the LADE regulariser'), ('ib', 'influence-balanced loss (IB')):
        card = hub.model_card(dict(args, loss=loss), dict(results, method=dict(results['method'], loss=loss)))
        assert words in card, loss
    np.testing.assert_equal(hub.run_data_config(dict(interpolation='', crop_pct=None, mean=[0.5])), {'mean': (0.5,)})


def test_run_model_from_args_rebuilds_a_causal_norm_head():
    """Without results.json's model_build, args.yaml's --head causal and --causal-* flags rebuild the head."""
    from timm_cmo.models import CausalNormClassifier
    model = hub.create_run_model({'model': 'resnet20_cifar', 'num_classes': 10, 'head': 'causal', 'causal_heads': 4,
                                  'causal_alpha': 1.5, 'causal_tau': None})
    assert isinstance(model.fc, CausalNormClassifier)
    assert (model.fc.heads, model.fc.alpha, model.fc.tau) == (4, 1.5, 16.0)
    assert not isinstance(hub.create_run_model({'model': 'resnet20_cifar', 'num_classes': 10, 'head': 'linear',
                                                'causal_heads': 4}).fc, CausalNormClassifier)
