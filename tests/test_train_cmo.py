"""train_cmo.py: recipes and config handling, the paper's schedule, end-to-end runs on real CIFAR-10 JPEGs."""
import glob
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml

import train_cmo

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(glob.glob(str(REPO / 'hparams' / '*.yaml')))
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(REPO))


# --- configuration ------------------------------------------------------------------------

def test_recipes_cover_the_paper_settings():
    names = {Path(r).stem for r in RECIPES}
    for ds in ('cifar10', 'cifar100'):
        for rho in (100, 50, 10):
            for method in ('ce', 'ce_drw', 'ldam_drw', 'bs', 'lade', 'ib'):
                assert f'{ds}_lt_r{rho}_{method}' in names
                assert f'{ds}_lt_r{rho}_{method}_cmo' in names
        for method in ('ce', 'ce_drw', 'ldam_drw', 'ride'):  # the paper's oversampling comparison (rho 100)
            assert {f'{ds}_lt_r100_{method}_{variant}' for variant in ('ros', 'remix', 'cmo')} <= names
        for rho in (100, 50, 10):  # the paper's Table 2 comparison methods, with and without CMO
            assert {f'{ds}_lt_r{rho}_causal_norm', f'{ds}_lt_r{rho}_causal_norm_cmo'} <= names
            assert {f'{ds}_lt_r{rho}_bbn', f'{ds}_lt_r{rho}_bbn_cmo'} <= names
        for stage1 in ('ce', 'ce_cmo'):  # Kang et al.'s second stages after CE and after CE + CMO
            assert {f'{ds}_lt_r100_{stage1}_{stage}' for stage in ('crt', 'lws')} <= names
    assert {'imagenet_lt_resnext50_causal_norm', 'imagenet_lt_resnext50_causal_norm_cmo'} <= names
    assert {'inat2018_bbn_resnet50', 'inat2018_bbn_resnet50_cmo'} <= names  # the paper's Table 7
    for name in ('imagenet_lt_resnet50_ce', 'imagenet_lt_resnet50_ce_crt', 'imagenet_lt_resnet50_ce_lws',
                 'inat2018_resnet50_ce', 'inat2018_resnet50_ce_crt', 'inat2018_resnet50_ce_lws'):
        assert name in names
    for name in ('imagenet_lt_resnet50_ce_cmo', 'imagenet_lt_resnet50_ce_drw_cmo', 'imagenet_lt_resnet50_bs_cmo',
                 'imagenet_lt_resnet50_bs_cmo_400ep', 'inat2018_resnet50_ce_drw_cmo', 'inat2018_resnet50_bs_cmo',
                 'imagenet_lt_resnet101_bs_cmo', 'imagenet_lt_resnet152_bs_cmo', 'imagenet_lt_wrn50_bs_cmo',
                 'inat2018_resnet50_lade', 'inat2018_resnet50_lade_cmo', 'imagenet_lt_resnext50_lade',
                 'imagenet_lt_resnext50_lade_cmo'):
        assert name in names


@pytest.mark.parametrize('recipe', RECIPES, ids=[Path(r).stem for r in RECIPES])
def test_recipe_parses_and_states_its_target(recipe):
    text = Path(recipe).read_text()
    assert 'Paper target:' in text
    stage2 = ['--initial-checkpoint', 'stage1.pth.tar'] if 'stage2' in yaml.safe_load(text) else []
    args, args_text = train_cmo.parse_args(['-c', recipe, '--data-dir', '/data'] + stage2)
    assert 'paper_top1' in yaml.safe_load(text)
    assert args.cmo == Path(recipe).stem.endswith(('_cmo', '_cmo_400ep', '_cmo_mixup', '_cmo_blur', '_cmo_jitter'))
    # the paper's loaders keep the last incomplete batch; Causal Norm's, LADE's and Kang et al.'s loops run
    # int(N / batch) steps an epoch
    assert args.drop_last is ('causal_norm' in Path(recipe).stem or args.loss == 'lade' or 'int(N / batch)' in text)
    if args.stage2 in ('crt', 'lws'):
        assert args.loss == 'ce' and args.ros and args.ros_r == 1.0 and args.sched == 'cosine'
        assert args.warmup_epochs == 0 and args.min_lr == 0 and args.epochs == (5 if args.stage2 == 'lws' else
                                                                                 30 if 'inat' in recipe else 10)
    assert yaml.safe_load(args_text)['model'] == args.model


def test_yaml_keys_dashes_and_command_line_override(tmp_path):
    cfg = tmp_path / 'r.yaml'
    cfg.write_text('cmo: true\ncmo-r: 2.0\nloss: bs\nepochs: 7\n')
    args, _ = train_cmo.parse_args(['-c', str(cfg), '--data-dir', 'x', '--epochs', '9'])
    assert args.cmo and args.cmo_r == 2.0 and args.loss == 'bs' and args.epochs == 9


@pytest.mark.parametrize('content,argv,message', [
    ('cmo_rr: 1\n', [], "unknown key 'cmo_rr'"),
    ('cmo_r: -1\n', [], '--cmo-r -1'),
    ('', ['--cmo-prob', '1.5'], '--cmo-prob 1.5'),
    ('loss: hinge\n', [], "--loss 'hinge': unknown loss"),
    ('', ['--reweight', 'sometimes'], "--reweight 'sometimes'"),
    ('imb_ratio: 0.5\n', [], '--imb-ratio 0.5'),
    ('', ['--in-chans', '2'], 'in_chans 2: images decode to 1 (L) or 3 (RGB)'),
    ('input_img_mode: RGB\n', ['--in-chans', '1'], "input_img_mode 'RGB' decodes to 3 channels"),
    ('', ['--in-chans', '3', '--input-size', '1', '32', '32'], 'in_chans 3 disagrees with input_size'),
    ('', ['--layer-decay', '1.5'], '--layer-decay 1.5: must be in (0, 1]'),
    ('', ['--torchcompile-mode', 'max-autotune'], '--torchcompile-mode max-autotune: add --torchcompile'),
    ('', ['--torchcompile', '--torchcompile-mode', 'fast'], "--torchcompile-mode 'fast': choose from default"),
    ('', ['--pretrained-path', 'a.pth', '--initial-checkpoint', 'b.pth'], '--pretrained-path and --initial-checkpoint'),
    ('', ['--plot-format', 'jpg'], "--plot-format 'jpg': choose from png, svg, pdf"),
    ('', ['--grad-accum-steps', '0'], '--grad-accum-steps 0: must be >= 1'),
    ('', ['--wandb-resume-id', 'abc', '--log-wandb'], '--wandb-resume-id abc: continues the wandb run'),
    ('', ['--wandb-project', 'p'], 'add --log-wandb'),
])
def test_bad_config_fails_before_training(tmp_path, capsys, content, argv, message):
    cfg = tmp_path / 'bad.yaml'
    cfg.write_text(content or '{}\n')
    with pytest.raises(SystemExit) as e:
        train_cmo.parse_args(['-c', str(cfg), '--data-dir', 'x'] + argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def paper_lr(epoch, base=0.1, milestones=(160, 180), rates=(0.01, 0.0001)):
    """The paper code's adjust_learning_rate (with its e = epoch + 1)."""
    e = epoch + 1
    if e <= 5:
        return base * e / 5
    lr = base
    for m, r in zip(milestones, rates):
        if e > m:
            lr = base * r
    return lr


@pytest.mark.parametrize('recipe,milestones,rates,epochs', [
    ('cifar100_lt_r100_ce_cmo.yaml', (160, 180), (0.01, 0.0001), 200),
    ('imagenet_lt_resnet50_bs_cmo.yaml', (60, 80), (0.1, 0.01), 100),
    # IB's cifar_train.py: lr x0.01 once IB starts (e > 100), x1e-4 for e > 160, x1e-6 for e > 180
    ('cifar100_lt_r100_ib.yaml', (100, 160, 180), (0.01, 1e-4, 1e-6), 200),
    ('cifar10_lt_r10_ib_cmo.yaml', (100, 160, 180), (0.01, 1e-4, 1e-6), 200),
])
def test_schedule_is_the_papers(recipe, milestones, rates, epochs):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    args, _ = train_cmo.parse_args(['-c', str(REPO / 'hparams' / recipe), '--data-dir', 'x'])
    opt = create_optimizer_v2(torch.nn.Linear(2, 2), opt=args.opt, lr=args.lr, momentum=args.momentum)
    sched, num_epochs = create_scheduler_v2(opt, **scheduler_kwargs(args))
    assert num_epochs == epochs
    assert opt.defaults.get('nesterov') is False  # the paper's SGD
    for epoch in range(epochs):
        sched.step(epoch)
        assert opt.param_groups[0]['lr'] == pytest.approx(paper_lr(epoch, args.lr, milestones, rates), rel=1e-9), epoch


def causal_norm_lr(epoch, base=0.2, warmup=5, milestones=(120, 160), factor=0.01):
    """Causal Norm's CIFAR schedule: WarmupMultiStepLR(warmup_factor 1/3, linear) stepped before each epoch, so
    0-based epoch e trains with its last_epoch = e + 1."""
    t = epoch + 1
    warm = 1 / 3 * (1 - t / warmup) + t / warmup if t < warmup else 1.
    return base * warm * factor ** sum(t >= m for m in milestones)


@pytest.mark.parametrize('ds,alpha,paper', [('cifar10', 1.0, None), ('cifar100', 1.5, 44.1)])
def test_causal_norm_recipe_is_the_authors(ds, alpha, paper):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    args, _ = train_cmo.parse_args(['-c', f'{ds}_lt_r100_causal_norm', '--data-dir', 'x'])
    assert (args.head, args.causal_heads, args.causal_tau, args.causal_gamma, args.causal_alpha, args.causal_momentum,
            args.causal_lr_scale) == ('causal', 2, 16.0, 1 / 32, alpha, 0.9, 0.0)
    assert (args.loss, args.reweight, args.batch_size, args.weight_decay, args.epochs) == ('ce', 'none', 256, 5e-4, 200)
    assert args.paper_top1 == paper and args.model == 'resnet32_cifar'
    opt = create_optimizer_v2(torch.nn.Linear(2, 2), opt=args.opt, lr=args.lr, momentum=args.momentum)
    sched, num_epochs = create_scheduler_v2(opt, **scheduler_kwargs(args))
    assert num_epochs == 200 and opt.defaults.get('nesterov') is False
    for epoch in range(200):
        sched.step(epoch)
        assert opt.param_groups[0]['lr'] == pytest.approx(causal_norm_lr(epoch), rel=1e-12), epoch
    # ImageNet-LT: cosine to 0 over 90 epochs (the authors' epoch e trains at the lr timm gives epoch e + 1)
    args, _ = train_cmo.parse_args(['-c', 'imagenet_lt_resnext50_causal_norm_cmo', '--data-dir', 'x'])
    assert (args.model, args.causal_alpha, args.causal_lr_scale, args.cmo) == ('resnext50_32x4d', 3.0, 50.0, True)
    opt = create_optimizer_v2(torch.nn.Linear(2, 2), opt=args.opt, lr=args.lr, momentum=args.momentum)
    sched, num_epochs = create_scheduler_v2(opt, **scheduler_kwargs(args))
    assert num_epochs == 90
    import math
    for epoch in range(1, 90):
        sched.step(epoch)
        assert opt.param_groups[0]['lr'] == pytest.approx(0.1 * (1 + math.cos(math.pi * epoch / 90)), abs=1e-12)


@pytest.mark.parametrize('ds,rho,paper', [('cifar100', 100, 42.6), ('cifar100', 50, 47.1), ('cifar100', 10, 59.2),
                                         ('cifar10', 100, None)])
def test_bbn_recipes_are_the_authors(ds, rho, paper):
    """BBN's CIFAR config: bbn_res32_cifar, CE, the reversed sampler, alpha over the 200 epochs, Nesterov SGD lr 0.1,
    wd 2e-4, batch 128 dropping the last, WarmupMultiStepLR (5 epochs from 1/3, x0.01 at 120 and 160) stepped before
    each epoch; iNaturalist 2018: bbn_res50, lr 0.05, wd 1e-4, MultiStepLR x0.1 at 120 and 160 over 180 epochs, alpha
    divided by 200. paper_top1 from the CMO paper's Tables 2 and 7; none for the CMO rows."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    for cmo in (False, True):
        args, _ = train_cmo.parse_args(['-c', f'{ds}_lt_r{rho}_bbn{"_cmo" if cmo else ""}', '--data-dir', 'x'])
        assert (args.model, args.loss, args.reweight, args.bbn_r, args.bbn_alpha_epochs) == \
               ('bbn_resnet32_cifar', 'bbn', 'none', 2.0, None)
        assert (args.batch_size, args.drop_last, args.weight_decay, args.epochs, args.imb_ratio) == \
               (128, True, 2e-4, 200, rho)
        assert args.cmo is cmo and args.paper_top1 == (None if cmo else paper)
        assert args.train_crop_mode == 'pad' and args.color_jitter == 0 and args.hflip == 0.5
        opt = create_optimizer_v2(torch.nn.Linear(2, 2), opt=args.opt, lr=args.lr, momentum=args.momentum)
        assert opt.defaults.get('nesterov') is True  # BBN's SGD(nesterov=True)
        sched, num_epochs = create_scheduler_v2(opt, **scheduler_kwargs(args))
        assert num_epochs == 200
        for epoch in range(200):
            sched.step(epoch)
            assert opt.param_groups[0]['lr'] == pytest.approx(causal_norm_lr(epoch, base=0.1), rel=1e-12), epoch
    for cmo in (False, True):
        args, _ = train_cmo.parse_args(['-c', f'inat2018_bbn_resnet50{"_cmo" if cmo else ""}', '--data-dir', 'x'])
        assert (args.model, args.loss, args.bbn_r, args.bbn_alpha_epochs, args.epochs) == \
               ('bbn_resnet50', 'bbn', 2.0, 200, 180)
        assert (args.lr, args.weight_decay, args.batch_size, args.num_classes) == (0.05, 1e-4, 32, 8142)
        assert args.cmo is cmo and args.paper_top1 == (None if cmo else 69.6)
        opt = create_optimizer_v2(torch.nn.Linear(2, 2), opt=args.opt, lr=args.lr, momentum=args.momentum)
        assert opt.defaults.get('nesterov') is True
        sched, num_epochs = create_scheduler_v2(opt, **scheduler_kwargs(args))
        assert num_epochs == 180
        for epoch in range(180):  # MultiStepLR stepped before each epoch: 0-based epoch e trains at last_epoch e + 1
            sched.step(epoch)
            expected = 0.05 * 0.1 ** sum(epoch + 1 >= m for m in (120, 160))
            assert opt.param_groups[0]['lr'] == pytest.approx(expected, rel=1e-12), epoch


def lade_lr(epoch, base=0.2, milestones=(120, 160), gamma=0.01, warmup=5):
    """LADE's WarmupMultiStepLR (warm-up factor 1/3, linear), stepped before each 1-based epoch (last_epoch = e + 1)."""
    import bisect
    last = epoch + 1
    factor = 1.
    if last < warmup:
        a = last / warmup
        factor = 1. / 3 * (1 - a) + a
    return base * factor * gamma ** bisect.bisect_right(milestones, last)


def lade_cosine_lr(epoch, base, epochs):
    """LADE's CosineAnnealingLR (eta_min 0) as its loop steps it: epoch e uses the cosine at e + 1."""
    import math
    return base * (1 + math.cos(math.pi * (epoch + 1) / epochs)) / 2


def recipe_lrs(recipe):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    args, _ = train_cmo.parse_args(['-c', str(REPO / 'hparams' / recipe), '--data-dir', 'x'])
    if args.warmup_lr is None:
        args.warmup_lr = args.lr / 5
    opt = create_optimizer_v2(torch.nn.Linear(2, 2), opt=args.opt, lr=args.lr, momentum=args.momentum)
    sched, num_epochs = create_scheduler_v2(opt, **scheduler_kwargs(args))
    lrs = []
    for epoch in range(num_epochs):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]['lr'])
    return args, lrs


@pytest.mark.parametrize('recipe', ['cifar100_lt_r100_lade.yaml', 'cifar10_lt_r50_lade_cmo.yaml'])
def test_lade_cifar_schedule_is_the_authors(recipe):
    args, lrs = recipe_lrs(recipe)
    assert len(lrs) == 200 and (args.lr, args.weight_decay, args.batch_size) == (0.2, 5e-4, 256)
    for epoch, lr in enumerate(lrs):
        assert lr == pytest.approx(lade_lr(epoch), rel=1e-9), epoch


@pytest.mark.parametrize('recipe,base,epochs', [('inat2018_resnet50_lade.yaml', 0.1, 200),
                                                ('imagenet_lt_resnext50_lade_cmo.yaml', 0.05, 180)])
def test_lade_cosine_schedule_is_within_one_epoch_of_the_authors(recipe, base, epochs):
    """timm's cosine at epoch e, LADE's at e + 1 (its scheduler steps before the epoch): under 1% of the lr apart."""
    args, lrs = recipe_lrs(recipe)
    assert len(lrs) == epochs and args.lr == base
    for epoch, lr in enumerate(lrs):
        assert lr == pytest.approx(lade_cosine_lr(epoch - 1, base, epochs), rel=1e-9, abs=1e-12), epoch
        assert abs(lr - lade_cosine_lr(epoch, base, epochs)) < 0.01 * base


# --- end to end on real data ----------------------------------------------------------------

def cifar_subset(root: Path, cifar10_dir: Path, train_per_class: int, test_per_class: int) -> Path:
    """A folder of real CIFAR-10 JPEGs: train/<class>/ the first ``train_per_class`` images each, test/<class>/ the
    first ``test_per_class``."""
    for split, per_class in (('train', train_per_class), ('test', test_per_class)):
        with tarfile.open(cifar10_dir / f'{split}.tar') as tf:
            members = [m for m in tf.getmembers() if m.isfile() and int(Path(m.name).stem) < per_class]
            for m in members:
                target = root / split / Path(m.name).parent.name / Path(m.name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tf.extractfile(m).read())
    return root


@pytest.fixture(scope='module')
def small_cifar(tmp_path_factory, cifar10_dir):
    """A folder of real CIFAR-10 JPEGs: train/<class>/ 60 images each, test/<class>/ 20 each."""
    return cifar_subset(tmp_path_factory.mktemp('small_cifar'), cifar10_dir, 60, 20)


def base_argv(data_dir, out, exp, epochs=2, *extra):
    return ['--data-dir', str(data_dir), '--imb-ratio', '10', '--model', 'resnet20_cifar', '--epochs', str(epochs),
            '-b', '32', '--workers', '0', '--color-jitter', '0', '--train-crop-mode', 'pad', '--output', str(out),
            '--experiment', exp, '--log-interval', '1', '--seed', '3', *extra]


LDAM_CMO = ['--cmo', '--cmo-start-epoch', '-1', '--cmo-end-epochs', '0', '--loss', 'ldam', '--reweight', 'drw',
            '--drw-epoch', '1', '--head-norm', '--cmo-prob', '1.0', '--model-ema', '--model-ema-decay', '0.9']


def kill_after_first_checkpoint(argv, run_dir: Path, timeout: float = 300) -> Path:
    """Start train_cmo.py ``argv`` in a process, SIGKILL it once ``run_dir/last.pth.tar`` exists (or it ended, or
    ``timeout`` s passed); returns that checkpoint's path."""
    proc = subprocess.Popen([sys.executable, str(REPO / 'train_cmo.py')] + argv, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=ENV)
    last = run_dir / 'last.pth.tar'
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not last.exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return last


def assert_same_training_state(reference: dict, resumed: dict) -> None:
    """Two checkpoints hold the same model and EMA weights (same keys, bit for bit) and the same optimizer momentum
    buffers (the optimizer continued where it stopped)."""
    for key in ('state_dict', 'state_dict_ema'):
        assert reference[key].keys() == resumed[key].keys(), key
        for k, v in reference[key].items():
            assert torch.equal(resumed[key][k], v), f'{key} {k}'
    mom_ref = [s['momentum_buffer'] for s in reference['optimizer']['state'].values()]
    mom_res = [s['momentum_buffer'] for s in resumed['optimizer']['state'].values()]
    assert len(mom_ref) == len(mom_res) > 0 and all(torch.equal(a, b) for a, b in zip(mom_ref, mom_res))


def run_script(argv, timeout=600, env=None, **kwargs):
    return subprocess.run([sys.executable, str(REPO / 'train_cmo.py')] + argv, capture_output=True, text=True,
                          timeout=timeout, env=env or ENV, **kwargs)


@pytest.fixture(scope='module')
def ldam_cmo_run(small_cifar, tmp_path_factory):
    out = tmp_path_factory.mktemp('runs')
    # --push-to-hub with the Hub unreachable: the run still succeeds and keeps the export
    env = dict(ENV, HF_HUB_OFFLINE='1', HF_HOME=str(out / 'hf_home'))
    proc = run_script(base_argv(small_cifar, out, 'ref', 3, *LDAM_CMO) + ['--push-to-hub', 'timm-cmo/test-run'], env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out / 'ref', proc


def test_end_to_end_outputs(ldam_cmo_run):
    run, proc = ldam_cmo_run
    for name in ('args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar', 'results.json',
                 'per_class_accuracy.csv', 'per_class_accuracy.png', 'train.log'):
        assert (run / name).is_file(), name
    results = json.loads((run / 'results.json').read_text())
    m = results['metrics']
    assert set(m) >= {'top1', 'top5', 'many', 'medium', 'few', 'head', 'middle', 'tail'}
    assert results['dataset']['class_counts'] == [60, 46, 35, 27, 21, 16, 12, 10, 7, 6]
    assert m['many'] is None and m['medium'] is not None and m['few'] is not None
    assert results['method']['cmo'] and results['method']['loss'] == 'ldam'
    assert 'train_cmo.py' in results['command'] and results['epoch'] == 2
    assert results['resources']['peak_rss_mib'] > 100 and results['resources']['wall_min'] > 0
    if not torch.cuda.is_available():  # OMP_NUM_THREADS=1: the count and its noun agree
        assert results['resources']['device'].endswith(' cores, 1 torch thread'), results['resources']['device']
    rows = (run / 'per_class_accuracy.csv').read_text().strip().splitlines()
    assert len(rows) == 11
    assert len((run / 'summary.csv').read_text().strip().splitlines()) == 4
    args = yaml.safe_load((run / 'args.yaml').read_text())
    assert args['cmo'] is True and args['loss'] == 'ldam'
    ckpt = torch.load(run / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['epoch'] == 2 and 'optimizer' in ckpt
    assert 'Train: 2' in proc.stderr and 'Eval: 2' in proc.stderr  # progress is logged
    assert 'Upload to the Hub failed' in proc.stderr and 'is intact' in proc.stderr
    export = run / 'hub_export'
    card = (export / 'README.md').read_text()
    assert (export / 'model.safetensors').is_file() and 'timm-cmo/test-run' in card
    assert 'ldam / drw (epoch 1; applied in 2 of 3 epochs)' in card and 'mixing in 3 of 3 epochs' in card
    assert 'Recipe file' not in card and "'experiment'" not in card
    assert results['method']['drw_epoch'] == 1
    assert results['method']['drw_epochs'] == 2 and results['method']['cmo_epochs'] == 3
    assert results['best']['metric'] == 'top1' and results['best']['epoch'] in (0, 1, 2)
    config = json.loads((export / 'config.json').read_text())
    assert config['timm_cmo']['train_class_counts'] == [60, 46, 35, 27, 21, 16, 12, 10, 7, 6]


def test_resume_after_kill_matches_uninterrupted_run(ldam_cmo_run, small_cifar, tmp_path):
    """SIGKILL a run with 2 loader workers (CMO, EMA, DRW), resume it: bit for bit the uninterrupted run
    (which read its data without workers: the epoch plan and per-batch seeds make them the same)."""
    ref_run, _ = ldam_cmo_run
    argv = base_argv(small_cifar, tmp_path, 'killed', 3, *LDAM_CMO) + ['--workers', '2']
    last = kill_after_first_checkpoint(argv, tmp_path / 'killed')
    killed_epoch = torch.load(last, map_location='cpu', weights_only=True)['epoch']
    assert killed_epoch < 2
    done = run_script(base_argv(small_cifar, tmp_path, 'killed', 3, *LDAM_CMO) +
                      ['--resume', str(last), '--experiment', 'killed', '--workers', '2'])
    assert done.returncode == 0, done.stderr[-4000:]
    assert 'Loaded checkpoint' in done.stderr
    resumed = torch.load(last, map_location='cpu', weights_only=True)
    reference = torch.load(ref_run / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert resumed['epoch'] == reference['epoch'] == 2
    assert_same_training_state(reference, resumed)
    assert resumed['best'] == reference['best']  # the best metric carried over the resume
    rows = (tmp_path / 'killed' / 'summary.csv').read_text().strip().splitlines()
    assert [r.split(',')[0] for r in rows] == ['epoch', '0', '1', '2']
    # results.json times the whole run (every epoch, before and after the kill), not only the resumed process
    resources = json.loads((tmp_path / 'killed' / 'results.json').read_text())['resources']
    times = [float(r.split(',')[3]) for r in rows[1:]]
    assert resources['epochs_min'] == round(sum(times) / 60, 1) and all(t > 0 for t in times)


def test_evaluate_checkpoint_and_exported_model(ldam_cmo_run, small_cifar, tmp_path):
    from timm_cmo import hub
    run, _ = ldam_cmo_run
    ref = json.loads((run / 'results.json').read_text())['metrics']
    proc = run_script(['--evaluate', '--data-dir', str(small_cifar), '--imb-ratio', '10', '--model', 'resnet20_cifar',
                       '--head-norm', '--resume', str(run / 'last.pth.tar'), '--workers', '0',
                       '--output', str(tmp_path), '--experiment', 'eval_ckpt'])
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((tmp_path / 'eval_ckpt' / 'results.json').read_text())['metrics']
    assert got['top1'] == pytest.approx(ref['top1']) and got['few'] == pytest.approx(ref['few'])
    assert (tmp_path / 'eval_ckpt' / 'per_class_accuracy.png').is_file()

    export = hub.export(run, tmp_path / 'export')
    proc = run_script(['--evaluate', '--data-dir', str(small_cifar), '--imb-ratio', '10', '--model',
                       f'local-dir:{export}', '--pretrained', '--workers', '0', '--output', str(tmp_path),
                       '--experiment', 'eval_export'])
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((tmp_path / 'eval_export' / 'results.json').read_text())['metrics']
    assert got['top1'] == pytest.approx(ref['top1'])


def test_pretrained_path_evaluates_and_fine_tunes(ldam_cmo_run, small_cifar, tmp_path, capsys):
    """--pretrained-path: a run's weights (as a bare state dict and as the export's safetensors) evaluate to the run's
    own figures; on a 5-class folder the head starts new and every other weight is the file's; a bad file is one
    line, exit 2, nothing written."""
    from timm_cmo import hub
    run, _ = ldam_cmo_run
    ref = json.loads((run / 'results.json').read_text())['metrics']
    sd = torch.load(run / 'last.pth.tar', map_location='cpu', weights_only=True)['state_dict']
    torch.save({'state_dict': sd}, tmp_path / 'weights.pth')
    export = hub.export(run, tmp_path / 'export')
    common = ['--evaluate', '--data-dir', str(small_cifar), '--imb-ratio', '10', '--model', 'resnet20_cifar',
              '--head-norm', '--workers', '0', '--output', str(tmp_path)]
    for exp, path in (('eval_pth', tmp_path / 'weights.pth'), ('eval_st', export / 'model.safetensors')):
        train_cmo.main(common + ['--pretrained-path', str(path), '--experiment', exp])
        got = json.loads((tmp_path / exp / 'results.json').read_text())['metrics']
        assert got['top1'] == pytest.approx(ref['top1']) and got['nll'] == pytest.approx(ref['nll']), exp

    five = tmp_path / 'five'
    for split in ('train', 'test'):
        for c in sorted(os.listdir(small_cifar / split))[:5]:
            (five / split).mkdir(parents=True, exist_ok=True)
            os.symlink(small_cifar / split / c, five / split / c)
    args, _ = train_cmo.parse_args(['--data-dir', str(five), '--model', 'resnet20_cifar', '--head-norm',
                                    '--pretrained-path', str(tmp_path / 'weights.pth')])
    args.rank = 0
    model = timm.create_model('resnet20_cifar', num_classes=5, head_norm=True)
    head = model.fc.weight.detach().clone()
    train_cmo.load_pretrained_path(model, args)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items() if not k.startswith('fc.'))
    assert got['fc.weight'].shape == (64, 5) and torch.equal(got['fc.weight'], head)  # the model's new head
    proc = run_script(base_argv(five, tmp_path, 'tuned', 1, '--loss', 'ce', '--head-norm', '--pretrained-path',
                                str(tmp_path / 'weights.pth'), '--layer-decay', '0.7'))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 'classifier fc new for 5 classes (fc.weight is (64, 10) in the file, (64, 5) in the model)' in proc.stderr

    bad = tmp_path / 'bad.pth'
    torch.save({'state_dict': {k: v for k, v in sd.items() if not k.startswith('layer3.')}}, bad)
    for path, message in ((bad, 'missing keys'), (tmp_path / 'nope.pth', 'no such file')):
        code, err = main_exit(base_argv(five, tmp_path, 'refused', 1, '--head-norm', '--pretrained-path', str(path)),
                              capsys)
        assert code == 2 and message in err and str(path) in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / 'refused').exists()


def test_pretrained_offline_is_one_line_and_writes_nothing(small_cifar, tmp_path):
    """--pretrained without network and with an empty HF cache: one line naming the model and the ways out, exit 2,
    no run folder (not the Hub's traceback)."""
    env = dict(ENV, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'empty_hf_home'))
    proc = run_script(base_argv(small_cifar, tmp_path, 'offline', 1, '--model', 'resnet18', '--pretrained'), env=env)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert 'Traceback' not in proc.stderr and err[-1].startswith('train_cmo.py: error: --model resnet18: its '
                                                                 'pretrained weights could not be fetched')
    assert sum('error' in line.lower() for line in err) == 1, proc.stderr[-3000:]
    for part in ('HF_HUB_OFFLINE is set', 'timm/resnet18.a1_in1k', '--pretrained-path FILE', '--model local-dir:',
                 'HF_HOME'):
        assert part in err[-1]
    assert not (tmp_path / 'offline').exists()


def test_one_channel_run_evaluates_from_checkpoint_and_export(small_cifar, tmp_path):
    """A --in-chans 1 run evaluates to the same figures from its checkpoint and from its export, neither command
    repeating --in-chans (the checkpoint records it; the exported config holds the input size and mean/std)."""
    from timm_cmo import hub
    train_cmo.main(base_argv(small_cifar, tmp_path, 'gray', 1, '--in-chans', '1', '--loss', 'ce'))
    ckpt = torch.load(tmp_path / 'gray' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['state_dict']['conv1.weight'].shape[1] == 1
    ref = json.loads((tmp_path / 'gray' / 'results.json').read_text())['metrics']
    common = ['--evaluate', '--data-dir', str(small_cifar), '--imb-ratio', '10', '--workers', '0',
              '--output', str(tmp_path)]
    export = hub.export(tmp_path / 'gray', tmp_path / 'export')
    last = str(tmp_path / 'gray' / 'last.pth.tar')
    for exp, model in (('eval_ckpt', ['--model', 'resnet20_cifar', '--resume', last]),
                       ('eval_export', ['--model', f'local-dir:{export}', '--pretrained'])):
        train_cmo.main(common + model + ['--experiment', exp])
        got = json.loads((tmp_path / exp / 'results.json').read_text())['metrics']
        assert got['top1'] == pytest.approx(ref['top1']) and got['nll'] == pytest.approx(ref['nll']), exp


def test_hub_export_loads_from_offline_cache(ldam_cmo_run, tmp_path):
    """The exported run, placed where huggingface_hub caches a download, rebuilds through timm offline."""
    from timm_cmo import hub
    run, _ = ldam_cmo_run
    export = hub.export(run, tmp_path / 'export', repo_id='timm-cmo/resnet20-cifar10-lt-ldam-drw-cmo')
    commit = '0123456789abcdef0123456789abcdef01234567'
    repo = tmp_path / 'hub' / 'models--timm-cmo--resnet20-cifar10-lt-ldam-drw-cmo'
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    snap = repo / 'snapshots' / commit
    snap.mkdir(parents=True)
    for f in export.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    code = (
        'import torch, timm, timm_cmo\n'
        'from timm_cmo.models import is_head_norm\n'
        "m = timm.create_model('hf-hub:timm-cmo/resnet20-cifar10-lt-ldam-drw-cmo', pretrained=True).eval()\n"
        "sd = torch.load(r'%s', map_location='cpu', weights_only=True)['state_dict']\n"
        'assert is_head_norm(m)\n'
        'assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())\n'
        "print('OK', m.num_classes, m.pretrained_cfg.get('label_names', [])[:2])\n" % (run / 'last.pth.tar'))
    env = dict(ENV, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(tmp_path / 'hub'), HF_HOME=str(tmp_path / 'hf_home'))
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 'OK 10' in proc.stdout and 'airplane' in proc.stdout


@pytest.mark.parametrize('loss', [['--loss', 'bs'], ['--loss', 'ib', '--ib-start-epoch', '1']], ids=['bs', 'ib'])
def test_torchrun_two_processes(small_cifar, tmp_path, loss):
    # IB: the model trains through WithFeatures inside DDP (its (logits, features) output through DDP's forward)
    argv = base_argv(small_cifar, tmp_path, 'ddp', 2, '--cmo', '--cmo-start-epoch', '-1', *loss)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(REPO / 'train_cmo.py')] + argv + ['--device', 'cpu'],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 'Process 1 of 2' in proc.stderr
    run = tmp_path / 'ddp'
    results = json.loads((run / 'results.json').read_text())
    assert results['metrics']['samples'] == 200  # the full test set once, padding excluded
    assert len(glob.glob(str(tmp_path / '*'))) == 1  # only rank 0 wrote an output folder
    # each rank saw half of the training images per epoch (timm's DistributedSampler)
    steps = [line for line in proc.stderr.splitlines() if 'Training resnet20_cifar' in line]
    assert steps and '3 steps each' in steps[0]  # 240 images / 2 ranks / 32 per batch


def test_torchrun_diverging_run_stops_every_rank(small_cifar, tmp_path):
    """Under torchrun a non-finite loss stops both processes (none is left waiting in a collective)."""
    argv = base_argv(small_cifar, tmp_path, 'ddp_nan', 3, '--loss', 'ce', '--no-wd-bias-bn', '--lr', '1e30',
                     '--warmup-lr', '1e-4', '--warmup-epochs', '1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(REPO / 'train_cmo.py')] + argv + ['--device', 'cpu'],
                          capture_output=True, text=True, timeout=400, env=ENV)
    assert proc.returncode != 0 and 'non-finite loss' in proc.stderr
    ckpt = torch.load(tmp_path / 'ddp_nan' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt['state_dict'].values() if v.is_floating_point())


def test_non_finite_loss_stops_and_keeps_checkpoint(small_cifar, tmp_path):
    argv = base_argv(small_cifar, tmp_path, 'nan', 3, '--loss', 'ce', '--no-wd-bias-bn')
    # a sane first epoch, then an lr that overflows: the warm-up lr is multiplied by 1e30 after epoch 0
    proc = run_script(argv + ['--lr', '1e30', '--warmup-lr', '1e-4', '--warmup-epochs', '1'])
    assert proc.returncode != 0
    assert 'non-finite loss' in proc.stderr
    last = tmp_path / 'nan' / 'last.pth.tar'
    assert last.is_file() and 'the last good checkpoint is' in proc.stderr
    ckpt = torch.load(last, map_location='cpu', weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt['state_dict'].values() if v.is_floating_point())


def test_data_on_device_run(small_cifar, tmp_path):
    # the compiled step falls back to eager where the backend cannot compile (here a backend that always fails)
    proc = run_script(base_argv(small_cifar, tmp_path, 'fast', 2, '--data-on-device', '--cmo', '--cmo-start-epoch',
                                '-1', '--loss', 'bs', '--device', 'cpu', '--channels-last', '--amp',
                                '--amp-dtype', 'bfloat16', '--torchcompile', 'no_such_backend'))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "torch.compile (backend 'no_such_backend') is unavailable here, training eagerly" in proc.stderr
    results = json.loads((tmp_path / 'fast' / 'results.json').read_text())
    assert results['metrics']['samples'] == 200
    assert 'Decoded 240 images' in proc.stderr


PATH_CASES = {
    'ce': ['--loss', 'ce'],
    'cmo-ldam-drw-head-norm-ema': LDAM_CMO,
    'cmo-elem-back-effective-bs-smoothing-keep-last': [
        '--cmo', '--cmo-mode', 'elem', '--cmo-variant', 'back', '--cmo-effective', '--cmo-start-epoch', '-1',
        '--cmo-end-epochs', '0', '--loss', 'bs', '--smoothing', '0.1', '--no-drop-last'],
    'ros-sqrt-cmo-ce-drw': ['--ros', '--ros-r', '0.5', '--cmo', '--cmo-start-epoch', '0', '--cmo-end-epochs', '1',
                            '--loss', 'ce', '--reweight', 'drw', '--drw-epoch', '1'],
    'remix-cutmix-ros-la': ['--remix', '--remix-mode', 'cutmix', '--ros', '--loss', 'la'],
    'ride-remix-drw': ['--model', 'ride_resnet20_cifar', '--loss', 'ride', '--reweight', 'drw', '--drw-epoch', '1',
                       '--remix'],
    'one-channel-cmo-ce': ['--in-chans', '1', '--cmo', '--cmo-start-epoch', '-1', '--cmo-end-epochs', '0',
                           '--loss', 'ce'],
    'cutmix-prob-off-epoch-ce-drw': ['--cutmix', '1', '--mixup-prob', '0.5', '--mixup-off-epoch', '1', '--loss', 'ce',
                                     '--reweight', 'drw', '--drw-epoch', '1'],
    'mixup-cutmix-elem-smoothing-ldam-keep-last': ['--mixup', '0.4', '--cutmix', '1', '--mixup-mode', 'elem',
                                                   '--smoothing', '0.1', '--loss', 'ldam', '--head-norm', '--no-drop-last'],
    'cmo-blur-ce': ['--cmo', '--cmo-variant', 'blur', '--cmo-start-epoch', '-1', '--cmo-end-epochs', '0',
                    '--cmo-prob', '1.0', '--loss', 'ce'],
    'cmo-jitter-elem-bs-drw': ['--cmo', '--cmo-variant', 'jitter', '--cmo-mode', 'elem', '--cmo-start-epoch', '-1',
                               '--cmo-end-epochs', '0', '--loss', 'bs', '--reweight', 'drw', '--drw-epoch', '1'],
    'causal-norm-cmo-ce-ema': ['--head', 'causal', '--causal-alpha', '1.5', '--cmo', '--cmo-start-epoch', '-1',
                               '--cmo-end-epochs', '0', '--loss', 'ce', '--model-ema', '--model-ema-decay', '0.9'],
    'grad-accum-cmo-ce-drw-keep-last': ['--grad-accum-steps', '3', '--cmo', '--cmo-start-epoch', '-1', '--loss', 'ce',
                                        '--reweight', 'drw', '--drw-epoch', '1', '--no-drop-last', '--sched-on-updates'],
    'bbn': ['--model', 'bbn_resnet32_cifar', '--loss', 'bbn'],
    'bbn-cmo-elem-smoothing-keep-last-ema-balanced': [
        '--model', 'bbn_resnet32_cifar', '--loss', 'bbn', '--bbn-r', '1', '--bbn-alpha-epochs', '3', '--cmo',
        '--cmo-mode', 'elem', '--cmo-start-epoch', '-1', '--cmo-end-epochs', '0', '--smoothing', '0.1',
        '--no-drop-last', '--model-ema', '--model-ema-decay', '0.9'],
    'cmo-lade-drw': ['--cmo', '--cmo-start-epoch', '-1', '--cmo-end-epochs', '0', '--loss', 'lade', '--reweight',
                     'drw', '--drw-epoch', '1', '--lade-remine-lambda', '0.01'],
    # IB from epoch 1: epoch 0 trains with CE, epoch 1 with IB and the features of the model's split
    'cmo-elem-smoothing-ib': ['--cmo', '--cmo-mode', 'elem', '--cmo-start-epoch', '-1', '--cmo-end-epochs', '0',
                              '--loss', 'ib', '--ib-start-epoch', '1', '--smoothing', '0.1'],
}


@pytest.mark.parametrize('case', list(PATH_CASES))
def test_data_on_device_run_equals_ordinary_run(small_cifar, tmp_path, case):
    """With the random crop and flip off, ``--data-on-device`` and the ordinary loader train the same model to the
    bit: same losses, same evaluation, same weights. (With them on, the two paths draw crops from different
    generators; their statistics are tested in tests/data/test_device_loader.py.)"""
    summaries, weights = {}, {}
    for path, extra in (('ordinary', []), ('device', ['--data-on-device'])):
        train_cmo.main(base_argv(small_cifar, tmp_path, path, 2, '--crop-padding', '0', '--hflip', '0', '--device',
                                 'cpu', *PATH_CASES[case], *extra))
        rows = [row.split(',') for row in (tmp_path / path / 'summary.csv').read_text().strip().splitlines()]
        timed = rows[0].index('epoch_time_s')
        summaries[path] = [row[:timed] + row[timed + 1:] for row in rows]
        weights[path] = torch.load(tmp_path / path / 'last.pth.tar', map_location='cpu',
                                   weights_only=True)['state_dict']
    assert summaries['ordinary'] == summaries['device']
    if '--mixup-off-epoch' in PATH_CASES[case]:  # recorded: Mixup / CutMix in epoch 0 only
        method = json.loads((tmp_path / 'device' / 'results.json').read_text())['method']
        assert method['mixup_epochs'] == 1 and method['cutmix'] == 1.0 and method['mixup_prob'] == 0.5
    ordinary, device = weights['ordinary'], weights['device']
    assert ordinary.keys() == device.keys()
    for k in ordinary:
        assert torch.equal(ordinary[k], device[k]), k


def test_grad_accum_run_equals_the_larger_batch_and_resumes(small_cifar, tmp_path):
    """-b 64 --grad-accum-steps 2 trains the model -b 128 trains (a GroupNorm model: no batch statistics), under class
    weights and label smoothing, with per-update scheduling and EMA: the same epoch losses and weights to float32
    round-off; resumed from its epoch-0 checkpoint it ends on its own weights bit for bit."""
    common = ['--model', 'test_efficientnet_gn', '--input-size', '3', '32', '32', '--crop-padding', '0', '--hflip', '0',
              '--no-drop-last', '--reweight', 'cb', '--smoothing', '0.1', '--sched-on-updates', '--lr', '0.05',
              '--model-ema', '--model-ema-decay', '0.5', '--device', 'cpu']
    train_cmo.main(base_argv(small_cifar, tmp_path, 'big', 2, *common, '-b', '128'))
    proc = run_script(base_argv(small_cifar, tmp_path, 'accum', 2, *common, '-b', '64', '--grad-accum-steps', '2'))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert '2 steps each (4 batches of 64, 2 accumulated per step)' in proc.stderr  # 240 images: 64, 64 | 64, 48
    assert 'Train: 1 [   1/2 (100%)]' in proc.stderr  # the log counts optimizer steps

    def rows(run):
        lines = (tmp_path / run / 'summary.csv').read_text().strip().splitlines()
        return [dict(zip(lines[0].split(','), line.split(','))) for line in lines[1:]]

    for a, b in zip(rows('big'), rows('accum')):
        assert float(a['train_loss']) == pytest.approx(float(b['train_loss']), rel=1e-4) and a['lr'] == b['lr']
    big, accum = (torch.load(tmp_path / r / 'last.pth.tar', map_location='cpu', weights_only=True) for r in ('big', 'accum'))
    for key in ('state_dict', 'state_dict_ema'):
        for k, v in big[key].items():
            torch.testing.assert_close(accum[key][k], v, rtol=1e-4, atol=1e-5, msg=f'{key} {k}')

    first = tmp_path / 'accum' / 'checkpoint-0.pth.tar'
    assert torch.load(first, map_location='cpu', weights_only=True)['epoch'] == 0
    # a process like the one it resumes (one thread: another thread count sums the convolutions in another order)
    proc = run_script(base_argv(small_cifar, tmp_path, 'resumed', 2, *common, '-b', '64', '--grad-accum-steps', '2',
                                '--resume', str(first)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = torch.load(tmp_path / 'resumed' / 'last.pth.tar', map_location='cpu', weights_only=True)
    for key in ('state_dict', 'state_dict_ema'):
        for k, v in accum[key].items():
            assert torch.equal(resumed[key][k], v), f'{key} {k}'


def test_run_logs_to_tensorboard_and_wandb_offline(small_cifar, tmp_path, monkeypatch, capsys, read_tensorboard,
                                                   read_wandb_run):
    """--log-tensorboard and --log-wandb (WANDB_MODE=offline): every epoch's loss and lr and every evaluation's metrics,
    read back from the event file and the wandb run, equal summary.csv's; a missing package stops the run at start
    with exit 2 and no run folder. (--plot-format svg: the plots are SVG files.)"""
    env = dict(ENV, WANDB_MODE='offline', WANDB_SILENT='true')
    proc = run_script(base_argv(small_cifar, tmp_path, 'logged', 3, '--loss', 'ce', '--eval-interval', '2',
                                '--log-tensorboard', '--log-wandb', '--wandb-project', 'timm-cmo-test',
                                '--wandb-tags', 'ce', 'test', '--plot-format', 'svg'), env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / 'logged'
    assert (run / 'per_class_accuracy.svg').is_file() and (run / 'reliability.svg').is_file()
    assert not list(run.glob('*.png'))
    lines = (run / 'summary.csv').read_text().strip().splitlines()
    rows = [dict(zip(lines[0].split(','), line.split(','))) for line in lines[1:]]
    scalars = read_tensorboard(run / 'tensorboard')
    info, history = read_wandb_run(run)
    history = [h for h in history if 'train/loss' in h]
    assert info.display_name == 'logged' and list(info.tags) == ['ce', 'test']
    assert [s for s, _ in scalars['train/loss']] == [h['epoch'] for h in history] == [0, 1, 2]
    assert [s for s, _ in scalars['eval/top1']] == [1, 2]  # evaluated every 2 epochs and after the last
    for row, (_, tb_loss), (_, tb_lr), wb in zip(rows, scalars['train/loss'], scalars['train/lr'], history):
        assert float(row['train_loss']) == pytest.approx(tb_loss, rel=1e-5) == pytest.approx(wb['train/loss'])
        assert float(row['lr']) == pytest.approx(tb_lr, rel=1e-5) == pytest.approx(wb['train/lr'])
        for key in ('top1', 'many', 'medium', 'few', 'head', 'middle', 'tail', 'ece'):
            if row[f'eval_{key}']:
                tb = dict(scalars[f'eval/{key}'])[int(row['epoch'])]
                assert float(row[f'eval_{key}']) == pytest.approx(tb, abs=1e-4) == pytest.approx(wb[f'eval/{key}'],
                                                                                              abs=1e-4), key
            else:
                assert f'eval/{key}' not in wb

    monkeypatch.setitem(sys.modules, 'wandb', None)
    code, err = main_exit(base_argv(small_cifar, tmp_path, 'no_wandb', 1, '--log-wandb'), capsys)
    assert code == 2 and "--log-wandb needs the 'wandb' package" in err and 'pip install wandb' in err
    assert not (tmp_path / 'no_wandb').exists()
    monkeypatch.delitem(sys.modules, 'wandb')
    (tmp_path / 'blocked').write_text('a file where the run folder would go')
    code, err = main_exit(base_argv(small_cifar, tmp_path / 'blocked', 'run', 1, '--log-tensorboard'), capsys)
    assert code == 2 and '--log-tensorboard: cannot write event files' in err


def test_torchcompile_eager_backend(small_cifar, tmp_path):
    proc = run_script(base_argv(small_cifar, tmp_path, 'compiled', 1, '--data-on-device', '--device', 'cpu',
                                '--torchcompile', 'eager', '--torchcompile-mode', 'max-autotune', '--loss', 'ce'))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 'unavailable here' not in proc.stderr
    # the mode reaches torch.compile: the eager backend says it ignores it (inductor would use it)
    assert "eager backend ignoring extra kwargs {'mode': 'max-autotune'}" in proc.stderr
    ckpt = torch.load(tmp_path / 'compiled' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert not any(k.startswith('_orig_mod.') for k in ckpt['state_dict'])  # saved unwrapped


@pytest.mark.parametrize('name', ['resnet20_cifar', 'ride_resnet20_cifar'])
def test_layer_decay_is_timms_param_groups(name):
    """--layer-decay 0.5 on the plugin's models: the stem gets 0.5^10 of the lr, block j of the 9 0.5^(9 - j), the
    classifier(s) the full lr (RIDE's experts share the scale of their depth); timm's scheduler applies the scales
    and schedule_lr reads the schedule's lr back."""
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    args, _ = train_cmo.parse_args(['--data-dir', 'x', '--model', name, '--layer-decay', '0.5', '--stage2', 'las',
                                    '--loss', 'las', '--initial-checkpoint', 'x.pth'][:6])
    model = timm.create_model(name, num_classes=10)
    optimizer = train_cmo.create_run_optimizer(model, args)
    scale = {id(p): g['lr_scale'] for g in optimizer.param_groups for p in g['params']}
    assert all(g['weight_decay'] == 2e-4 for g in optimizer.param_groups)  # the paper's decay on every parameter
    for pname, p in model.named_parameters():
        if pname.startswith(('conv1', 'bn1')):
            expected = 0.5 ** 10
        elif pname.startswith(('fc.', 'heads.')):
            expected = 1.
        else:
            parts = pname.split('.')
            stage, block = (int(parts[0][-1]), int(parts[1])) if parts[0].startswith('layer') else \
                (int(parts[2][-1]), int(parts[3]))
            expected = 0.5 ** (9 - (3 * (stage - 1) + block))
        assert scale[id(p)] == pytest.approx(expected), pname
    sched_args = type(args)(**vars(args))
    sched_args.warmup_lr = args.lr / 5
    sched, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(sched_args), updates_per_epoch=10)
    for epoch in (0, 3, 170):
        sched.step(epoch)
        assert train_cmo.schedule_lr(optimizer) == pytest.approx(paper_lr(epoch))
        assert all(g['lr'] == pytest.approx(paper_lr(epoch) * g['lr_scale']) for g in optimizer.param_groups)
    code = pytest.raises(SystemExit, train_cmo.parse_args, ['--data-dir', 'x', '--layer-decay', '0.5', '--stage2',
                                                            'las', '--loss', 'las', '--initial-checkpoint', 'x'])
    assert code.value.code == 2


LOOP_CASES = {
    'cmo-batch-ce-drw': (dict(cmo=True, cmo_prob=0.7), ('ce', 'drw')),
    'cmo-elem-ldam-drw': (dict(cmo=True, cmo_mode='elem'), ('ldam', 'drw')),
    'cmo-smoothing-bs-cb': (dict(cmo=True, label_smoothing=0.1), ('bs', 'cb')),
    'smoothing-only-ce-drw': (dict(label_smoothing=0.1), ('ce', 'drw')),
    'ros-focal': (dict(ros_r=1.0), ('focal', 'none')),
    'cmo-back-keep-last-la-drw': (dict(cmo=True, cmo_variant='back', drop_last=False), ('la', 'drw')),
    'remix-ce-drw': (dict(remix=True), ('ce', 'drw')),
    'remix-cutmix-ros-smoothing-ldam': (dict(remix=True, remix_mode='cutmix', ros_r=1.0, label_smoothing=0.1),
                                        ('ldam', 'drw')),
    'remix-ride-drw': (dict(remix=True), ('ride', 'drw')),
    'ros-ride-drw': (dict(ros_r=1.0), ('ride', 'drw')),
    'mixup-pair-ce-drw': (dict(mixup=1.0, mixup_mode='pair'), ('ce', 'drw')),
    'cutmix-minmax-elem-smoothing-bs': (dict(cutmix_minmax=(0.2, 0.8), mixup_mode='elem', label_smoothing=0.1),
                                        ('bs', 'none')),
    'cmo-jitter-la-drw': (dict(cmo=True, cmo_variant='jitter'), ('la', 'drw')),
    'causal-norm-cmo-ce': (dict(cmo=True), ('ce', 'none')),
    'causal-norm-ros-bs-drw': (dict(ros_r=1.0), ('bs', 'drw')),
    'cmo-lade': (dict(cmo=True), ('lade', 'none')),
    'cmo-elem-smoothing-lade-drw': (dict(cmo=True, cmo_mode='elem', label_smoothing=0.1), ('lade', 'drw')),
    # IB from epoch 1: epoch 0 is its CE phase, epoch 2 its IB phase (features through the model's split)
    'cmo-ib': (dict(cmo=True), ('ib', 'none'), dict(start_epoch=1)),
    'cmo-elem-smoothing-ib-cb': (dict(cmo=True, cmo_mode='elem', label_smoothing=0.1), ('ib', 'cb'),
                                 dict(start_epoch=1, weighting='none')),
    'remix-ros-ib-focal-drw': (dict(remix=True, ros_r=1.0), ('ib_focal', 'drw'), dict(start_epoch=1, weighting='none')),
}
LOOP_MODEL_KWARGS = {  # cases whose model is not the loss's default one
    'causal-norm-cmo-ce': dict(causal_norm=True, causal_alpha=1.0),
    'causal-norm-ros-bs-drw': dict(causal_norm=True, causal_heads=4),
}


@pytest.fixture(scope='module')
def tiny_lt(cifar10_dir):
    from timm_cmo.data import create_lt_dataset
    return create_lt_dataset('', str(cifar10_dir / 'train.tar'), imb_ratio=10, imb_max=24)


@pytest.mark.parametrize('case', list(LOOP_CASES))
@pytest.mark.parametrize('epoch', [0, 2])
def test_library_loop_equals_train_one_epoch(tiny_lt, case, epoch):
    """The README's loop (``loss_fn(model(x), target, mix=loader.mix_info)``) and train_cmo.py's epoch give the
    same weights, before (epoch 0) and after (epoch 2) the DRW switch, on every loader and loss option."""
    import argparse
    import timm
    from timm_cmo.data import create_cmo_loader
    from timm_cmo.losses import create_loss
    from timm_cmo.models import WithFeatures, logits_and_features
    loader_opts, (loss_name, reweight), *loss_kwargs = LOOP_CASES[case]
    loss_kwargs = loss_kwargs[0] if loss_kwargs else {}
    states = []
    for path in ('library', 'script'):
        torch.manual_seed(0)
        if loss_name == 'ride':  # RIDE's loss takes every expert's logits (cosine heads)
            model = timm.create_model('ride_resnet20_cifar', num_classes=10)
        else:
            model = timm.create_model('resnet20_cifar', num_classes=10, head_norm=loss_name == 'ldam',
                                      **LOOP_MODEL_KWARGS.get(case, {}))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        loader = create_cmo_loader(tiny_lt, (3, 32, 32), 16, is_training=True, device='cpu', num_workers=0,
                                   num_classes=10, train_crop_mode='pad', color_jitter=None, seed=1, epochs=4,
                                   cmo_start_epoch=-1, **loader_opts)
        loss_fn = create_loss(loss_name, tiny_lt.class_counts, reweight=reweight,
                              drw_epoch=1 if reweight == 'drw' else None, **loss_kwargs)
        if loss_fn.needs_experts:  # as the README's loop and train_cmo.py's _main
            model.set_expert_training(True)
        loader.set_epoch(epoch)
        loss_fn.set_epoch(epoch)
        features = getattr(loss_fn, 'needs_features', False)
        if path == 'library':
            model.train()
            for x, target in loader:
                if features:  # the README's IB loop: the logits and the penultimate features
                    logits, h = logits_and_features(model, x)
                    loss = loss_fn(logits, target, mix=loader.mix_info, features=h)
                else:
                    loss = loss_fn(model(x), target, mix=loader.mix_info)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        else:
            args = argparse.Namespace(channels_last=False, clip_grad=None, clip_mode='norm', log_interval=50, rank=0,
                                      world_size=1, distributed=False)
            train_cmo.train_one_epoch(epoch, WithFeatures(model) if features else model, loader, optimizer, loss_fn,
                                      args, torch.device('cpu'))
        states.append(model.state_dict())
    for k, v in states[0].items():
        torch.testing.assert_close(states[1][k], v, rtol=0, atol=0, msg=k)


class _ListLoader:
    """Yields fixed (input, target) batches, setting ``mix_info`` as the plugin's loaders do."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for x, target, mix, *dual in self.batches:
            self.mix_info = mix
            self.dual = dual[0] if dual else None
            yield x, target


class _TwoExperts(torch.nn.Module):
    """A BatchNorm-free multi-expert model: train-mode output (ensemble logits, (B, 2, C) expert logits)."""

    num_experts = 2

    def __init__(self, dim, num_classes):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(dim, num_classes) for _ in range(2))

    def forward(self, x):
        experts = torch.stack([h(x.flatten(1)) for h in self.heads], dim=1)
        return experts.mean(1), experts


class _LinearWithFeatures(torch.nn.Linear):
    """A BatchNorm-free model whose training output carries its input as the penultimate feature (the IB loss's)."""

    def forward(self, x):
        from timm_cmo.models import LogitsAndFeatures
        return LogitsAndFeatures(super().forward(x), x)


@pytest.mark.parametrize('loss_name', ['ce-cb', 'ldam-drw', 'ride-drw', 'torch-ce', 'ce-cb-scaler', 'ib-none'])
def test_grad_accumulation_steps_are_the_concatenated_batch_steps(loss_name):
    """--grad-accum-steps 3 over 5 batches (mixed with different lams, per-sample lams, unmixed; sizes 8, 8, 8, 8, 5):
    2 optimizer steps, each the step of the loss of its batches' concatenation (the last step of 2 batches), also
    under class weights, whose denominators differ from batch to batch; the scheduler counts optimizer steps."""
    import argparse
    from timm_cmo.data import MixInfo
    from timm_cmo.losses import create_loss
    counts, dim = [50, 20, 8, 3], 12
    name, reweight = (loss_name.split('-') + ['none'])[:2]
    from timm.utils import NativeScaler
    scaler = NativeScaler(device='cpu') if loss_name.endswith('scaler') else None  # AMP's path: step on the last
    loss_fn = torch.nn.CrossEntropyLoss() if name == 'torch' else create_loss(
        name, counts, reweight=reweight, drw_epoch=0 if reweight == 'drw' else None,
        **(dict(start_epoch=0) if name == 'ib' else {}))  # IB: a batch mean over B, scaled by each batch's share
    g = torch.Generator().manual_seed(0)
    batches = []
    for j, b in enumerate((8, 8, 8, 8, 5)):
        x = torch.randn(b, dim, generator=g)
        y_b, y_f = torch.randint(0, 4, (b,), generator=g), torch.randint(0, 4, (b,), generator=g)
        lam = [0.3, 1.0, torch.rand(b, generator=g), 0.6, 0.9][j]
        mix = None if name == 'torch' else MixInfo(y_b, y_b if j == 1 else y_f, lam)
        batches.append((x, y_b if mix is None else mix.target(4), mix))

    def build():
        torch.manual_seed(1)
        model = _TwoExperts(dim, 4) if name == 'ride' else _LinearWithFeatures(dim, 4) if name == 'ib' else \
            torch.nn.Linear(dim, 4)
        return model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)

    model, optimizer = build()

    class Steps:
        calls = []

        def step_update(self, num_updates):
            self.calls.append(num_updates)

    sched = Steps()
    args = argparse.Namespace(channels_last=False, clip_grad=None, clip_mode='norm', log_interval=1, rank=0,
                              world_size=1, distributed=False, grad_accum_steps=3)
    train_cmo.train_one_epoch(1, model, _ListLoader(batches), optimizer, loss_fn, args, torch.device('cpu'),
                              lr_scheduler=sched, loss_scaler=scaler)
    assert sched.calls == [3, 4]  # epoch 1 of 2 optimizer steps each
    if scaler is not None:
        assert scaler._scaler.get_scale() == 2. ** 16  # no inf/nan step skipped

    ref, ref_opt = build()
    for group in (batches[:3], batches[3:]):
        x = torch.cat([b[0] for b in group])
        if name == 'torch':
            target, mix = torch.cat([b[1] for b in group]), None
        else:
            lam = torch.cat([torch.as_tensor(m.lam, dtype=torch.float32).expand(len(m.y_b)) for *_, m in group])
            mix = MixInfo(torch.cat([m.y_b for *_, m in group]), torch.cat([m.y_f for *_, m in group]), lam)
            target = None
        ref_opt.zero_grad()
        train_cmo.compute_loss(loss_fn, ref(x), target, mix).backward()
        ref_opt.step()
    # IB's influence weights (alpha 1000) make losses ~100x CE's: float32 rounding of its sums grows with them
    tol = dict(rtol=1e-4, atol=1e-5) if name == 'ib' else dict(rtol=1e-5, atol=1e-6)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, msg=k, **tol)


class _TwoBranch(torch.nn.Module):
    """A BatchNorm-free stand-in for a BBN model: ``forward(x, x_r, alpha) = fc(2 cat(alpha f(x), (1 - alpha) g(x_r)))``
    (the one-batch forward, both on ``x`` at alpha 0.5)."""

    needs_dual = True

    def __init__(self, dim, num_classes):
        super().__init__()
        self.f, self.g, self.fc = torch.nn.Linear(dim, 5), torch.nn.Linear(dim, 5), torch.nn.Linear(10, num_classes)

    def forward(self, x, x_rebalancing=None, alpha=0.5):
        x_r = x if x_rebalancing is None else x_rebalancing
        return self.fc(2 * torch.cat([alpha * self.f(x), (1 - alpha) * self.g(x_r)], dim=1))


def test_grad_accumulation_with_dual_batches():
    """--grad-accum-steps 2 with BBN's loss over 3 batches (mixed, unmixed, per-sample lams; sizes 6, 6, 4, smoothing):
    the steps are those of the concatenated batches, the dual batches' term normalised over the group too, and the
    model gets the dual images with the loss's alpha."""
    import argparse
    from timm_cmo.data import DualBatch, MixInfo
    from timm_cmo.losses import create_loss
    counts, dim = [40, 20, 8, 3], 7
    loss_fn = create_loss('bbn', counts, epochs=5)
    loss_fn.set_epoch(3)  # alpha 1 - 9/25
    g = torch.Generator().manual_seed(0)
    batches = []
    for j, b in enumerate((6, 6, 4)):
        x, x_r = torch.randn(b, dim, generator=g), torch.randn(b, dim, generator=g)
        y_b, y_f, y_r = (torch.randint(0, 4, (b,), generator=g) for _ in range(3))
        lam = [0.3, 1.0, torch.rand(b, generator=g)][j]
        mix = MixInfo(y_b, y_b if j == 1 else y_f, lam, 0.1)
        batches.append((x, mix.target(4), mix, DualBatch(x_r, y_r, 0.1)))

    def build():
        torch.manual_seed(1)
        model = _TwoBranch(dim, 4)
        return model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)

    model, optimizer = build()
    args = argparse.Namespace(channels_last=False, clip_grad=None, clip_mode='norm', log_interval=1, rank=0,
                              world_size=1, distributed=False, grad_accum_steps=2)
    train_cmo.train_one_epoch(3, model, _ListLoader(batches), optimizer, loss_fn, args, torch.device('cpu'))
    ref, ref_opt = build()
    for group in (batches[:2], batches[2:]):
        x, x_r = torch.cat([b[0] for b in group]), torch.cat([b[3].x for b in group])
        lam = torch.cat([torch.as_tensor(m.lam, dtype=torch.float32).expand(len(m.y_b)) for _, _, m, _ in group])
        mix = MixInfo(torch.cat([m.y_b for _, _, m, _ in group]), torch.cat([m.y_f for _, _, m, _ in group]), lam, 0.1)
        dual = DualBatch(x_r, torch.cat([b[3].y for b in group]), 0.1)
        ref_opt.zero_grad()
        loss_fn(ref(x, x_r, 1 - 9 / 25), mix.target(4), mix=mix, dual=dual).backward()
        ref_opt.step()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_compute_loss_is_the_papers_cmo_form():
    """Batch-mode CMO with DRW weights: lam * L(y_b) + (1 - lam) * L(y_f), each term normalised by its own weights."""
    import torch.nn.functional as F
    from timm_cmo.data import MixInfo
    from timm_cmo.losses import class_balanced_weights, create_loss
    counts = [500, 120, 30, 6]
    loss_fn = create_loss('ce', counts, reweight='drw', drw_epoch=0)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 4, generator=g)
    y_b, y_f = torch.randint(0, 4, (16,), generator=g), torch.randint(0, 4, (16,), generator=g)
    w = class_balanced_weights(counts)
    expected = 0.3 * F.cross_entropy(logits, y_b, weight=w) + 0.7 * F.cross_entropy(logits, y_f, weight=w)
    soft = 0.3 * F.one_hot(y_b, 4).float() + 0.7 * F.one_hot(y_f, 4).float()
    torch.testing.assert_close(train_cmo.compute_loss(loss_fn, logits, soft, MixInfo(y_b, y_f, 0.3)), expected)
    torch.testing.assert_close(train_cmo.compute_loss(loss_fn, logits, y_b, None), F.cross_entropy(logits, y_b, weight=w))


def test_compute_loss_hands_the_features_to_losses_that_need_them():
    from timm_cmo.data import MixInfo
    from timm_cmo.losses import create_loss
    from timm_cmo.models import LogitsAndFeatures
    g = torch.Generator().manual_seed(1)
    logits, h = torch.randn(8, 4, generator=g), torch.rand(8, 5, generator=g)
    y_b, y_f = torch.randint(0, 4, (8,), generator=g), torch.randint(0, 4, (8,), generator=g)
    mix = MixInfo(y_b, y_f, 0.4)
    ib = create_loss('ib', [50, 20, 8, 3], start_epoch=0)
    out = LogitsAndFeatures(logits, h)
    torch.testing.assert_close(train_cmo.compute_loss(ib, out, None, mix), ib(logits, y_b, mix=mix, features=h))
    torch.testing.assert_close(train_cmo.compute_loss(ib, out, y_b, None), ib(logits, y_b, features=h))
    ce = create_loss('ce', [50, 20, 8, 3])  # a loss on logits alone gets the logits of the pair
    torch.testing.assert_close(train_cmo.compute_loss(ce, out, y_b, None), ce(logits, y_b))
    with pytest.raises(ValueError, match='needs the penultimate features: train the model through'):
        train_cmo.compute_loss(ib, logits, y_b, None)


# --- faults lose nothing: resume, bad input, full disk, non-finite state, corrupt images -------------------------

def main_exit(argv, capsys):
    """Run train_cmo.main in this process; return (exit code, stderr) of a refused start."""
    with pytest.raises(SystemExit) as e:
        train_cmo.main(argv)
    return e.value.code, capsys.readouterr().err


def folder_state(folder):
    return {p.name: p.read_bytes() if p.is_file() else None for p in sorted(Path(folder).iterdir())}


@pytest.mark.parametrize('bad', ['truncated', 'other_model', 'no_epoch', 'not_a_dict', 'other_classes'])
def test_failed_resume_writes_nothing(ldam_cmo_run, small_cifar, tmp_path, capsys, bad):
    """A --resume that cannot work fails before anything is written, naming the file and the mismatch."""
    ref_run, _ = ldam_cmo_run
    run = tmp_path / 'killed'
    run.mkdir()
    (run / 'args.yaml').write_text('the only record of a killed run\n')
    good = torch.load(ref_run / 'last.pth.tar', map_location='cpu', weights_only=True)
    path = run / 'last.pth.tar'
    if bad == 'truncated':
        data = (ref_run / 'last.pth.tar').read_bytes()
        path.write_bytes(data[:len(data) // 3])
    elif bad == 'no_epoch':
        torch.save({'state_dict': good['state_dict']}, path)
    elif bad == 'not_a_dict':
        torch.save([1, 2, 3], path)
    elif bad == 'other_classes':  # a 5-class head (NormedLinear weight: (in_features, classes))
        good['state_dict']['fc.weight'] = good['state_dict']['fc.weight'][:, :5].clone()
        torch.save(good, path)
    else:
        torch.save(good, path)
    before = folder_state(run)
    model = ['--model', 'resnet32_cifar', '--allow-config-change'] if bad == 'other_model' else []
    argv = base_argv(small_cifar, tmp_path, 'killed', 3, *LDAM_CMO) + ['--resume', str(path)] + model
    code, err = main_exit(argv, capsys)
    assert code == 2 and str(path) in err
    expected = {'truncated': 'is not a checkpoint or is truncated', 'other_model': 'does not fit',
                'no_epoch': 'records no epoch', 'not_a_dict': 'is not a training checkpoint',
                'other_classes': 'shape mismatch: fc.weight (64, 5) in the checkpoint, (64, 10) in the model'}[bad]
    assert expected in err
    if bad == 'other_model':
        assert 'missing keys' in err and 'layer1.3' in err  # resnet32 has more blocks than resnet20
    assert folder_state(run) == before  # args.yaml kept, no train.log, nothing new


def test_resume_with_other_settings_is_refused_then_allowed(ldam_cmo_run, small_cifar, tmp_path, capsys):
    ref_run, _ = ldam_cmo_run
    ckpt = tmp_path / 'from' / 'last.pth.tar'
    ckpt.parent.mkdir()
    ckpt.write_bytes((ref_run / 'last.pth.tar').read_bytes())
    argv = base_argv(small_cifar, tmp_path, 'changed', 4, *LDAM_CMO) + ['--resume', str(ckpt)]
    argv[argv.index('--imb-ratio') + 1] = '5'
    code, err = main_exit(argv + ['--loss', 'bs', '--lr', '0.5'], capsys)
    assert code == 2
    for text in ("--imb-ratio 10.0 -> 5.0", "--loss 'ldam' -> 'bs'", '--lr 0.1 -> 0.5', 'training images per class',
                 '--allow-config-change'):
        assert text in err, text
    assert not (tmp_path / 'changed').exists()
    # allowed: the new lr applies (epoch 3 of the warm-up at base lr 0.5: 0.1 + 0.4 * 3 / 4)
    same_data = base_argv(small_cifar, tmp_path, 'changed', 4, *LDAM_CMO) + ['--resume', str(ckpt)]
    train_cmo.main(same_data + ['--lr', '0.5', '--warmup-lr', '0.1', '--allow-config-change'])
    rows = (tmp_path / 'changed' / 'summary.csv').read_text().strip().splitlines()
    assert [r.split(',')[0] for r in rows[1:]] == ['3']
    assert float(rows[1].split(',')[2]) == pytest.approx(0.4)


def test_existing_run_folder_is_refused(ldam_cmo_run, small_cifar, capsys):
    ref_run, _ = ldam_cmo_run
    before = folder_state(ref_run)
    code, err = main_exit(base_argv(small_cifar, ref_run.parent, ref_run.name, 1), capsys)
    assert code == 2 and 'already holds a run' in err and '--overwrite' in err and '--resume' in err
    assert folder_state(ref_run) == before


def test_bad_flags_fail_before_the_data_is_read(capsys, tmp_path):
    missing = str(tmp_path / 'no_such_data')
    code, err = main_exit(['--data-dir', missing, '--model', 'resnet32_cifr'], capsys)
    assert code == 2 and "--model 'resnet32_cifr': unknown model; did you mean resnet32_cifar" in err
    code, err = main_exit(['--data-dir', missing, '--data-on-device', '--color-jitter', '0'], capsys)
    assert code == 2 and '--data-on-device augments with' in err and '--train-crop-mode pad' in err
    code, err = main_exit(['--data-dir', missing, '--cmo', '--remix'], capsys)
    assert code == 2 and '--remix and --cmo' in err
    code, err = main_exit(['--data-dir', missing, '--remix', '--remix-kappa', '1'], capsys)
    assert code == 2 and '--remix-kappa 1.0: kappa must be > 1' in err
    code, err = main_exit(['--data-dir', missing, '--remix', '--remix-tau', '1.5'], capsys)
    assert code == 2 and '--remix-tau 1.5: tau must be in (0, 1)' in err
    code, err = main_exit(['--data-dir', missing, '--cmo', '--cutmix', '1'], capsys)
    assert code == 2 and '--mixup / --cutmix and --cmo are two ways of mixing' in err
    code, err = main_exit(['--data-dir', missing, '--remix', '--mixup', '0.2'], capsys)
    assert code == 2 and '--mixup / --cutmix and --remix' in err
    code, err = main_exit(['--data-dir', missing, '--mixup', '1', '--mixup-mode', 'half'], capsys)
    assert code == 2 and "--mixup-mode 'half': mode must be one of ('batch', 'pair', 'elem')" in err
    code, err = main_exit(['--data-dir', missing, '--cutmix-minmax', '0.8', '0.2'], capsys)
    assert code == 2 and '--cutmix-minmax [0.8, 0.2]: cutmix_minmax must be two fractions' in err
    code, err = main_exit(['--data-dir', missing, '--mixup', '-0.5'], capsys)
    assert code == 2 and '--mixup -0.5: mixup_alpha must be >= 0' in err
    code, err = main_exit(['--data-dir', missing, '--cutmix', '1', '--mixup-switch-prob', '2'], capsys)
    assert code == 2 and '--mixup-switch-prob 2.0: switch_prob must be in [0, 1]' in err
    code, err = main_exit(['--data-dir', missing, '--cmo', '--cmo-variant', 'sharpen'], capsys)
    assert code == 2 and "--cmo-variant 'sharpen'" in err and 'blur' in err and 'jitter' in err
    code, err = main_exit(['--data-dir', missing, '--stage2', 'las', '--loss', 'las'], capsys)
    assert code == 2 and '--stage2 las starts from a stage-1 model' in err
    code, err = main_exit(['--data-dir', missing, '--stage2', 'las', '--loss', 'ce', '--initial-checkpoint', 'x'], capsys)
    assert code == 2 and '--stage2 las trains with --loss las' in err
    code, err = main_exit(['--data-dir', missing, '-c', 'cifar10_lt_r100_ce_cmmo'], capsys)
    assert code == 2 and 'did you mean cifar10_lt_r100_ce_cmo' in err


def test_drop_last_with_no_full_batch_is_refused(small_cifar, tmp_path, capsys):
    """A subset smaller than one batch with the incomplete batch dropped (Causal Norm's recipes drop it) would
    train 0 steps an epoch: refused before the run folder, naming the flags."""
    code, err = main_exit(base_argv(small_cifar, tmp_path, 'empty', 1, '--loss', 'ce', '-b', '256'), capsys)
    assert code == 2 and '--batch-size 256: 240 training images make no full batch' in err and '--no-drop-last' in err
    assert not (tmp_path / 'empty').exists()


def test_fast_decode_flag(capsys, monkeypatch, tmp_path):
    args, _ = train_cmo.parse_args(['--data-dir', 'x'])
    assert args.fast_decode is None  # auto: simplejpeg when installed
    assert train_cmo.parse_args(['--data-dir', 'x', '--no-fast-decode'])[0].fast_decode is False
    from timm_cmo.data import decode
    monkeypatch.setattr(decode, 'simplejpeg', None)
    monkeypatch.setattr(train_cmo, 'fast_decode_available', decode.fast_decode_available)
    code, err = main_exit(['--data-dir', str(tmp_path / 'no_such_data'), '--fast-decode'], capsys)
    assert code == 2 and '--fast-decode True: needs simplejpeg' in err


def test_recipes_by_name():
    args, _ = train_cmo.parse_args(['-c', 'cifar10_lt_r100_ldam_drw_cmo', '--data-dir', 'x'])
    assert args.config.endswith(os.path.join('hparams', 'cifar10_lt_r100_ldam_drw_cmo.yaml'))
    assert args.loss == 'ldam' and args.cmo and not args.drop_last
    from timm_cmo.recipes import list_recipes
    assert {Path(r).stem for r in RECIPES} <= set(list_recipes())


def test_save_failure_stops_cleanly_and_the_run_resumes(small_cifar, tmp_path, monkeypatch, capsys):
    """A full disk at the epoch-1 save: 'cannot write <path>: <reason>', no temporary file, epoch 0 kept, resumable."""
    import errno
    from timm_cmo import checkpoint as checkpoint_mod
    real_save = torch.save
    calls = []

    def full_disk_on_second_save(obj, f, *args, **kwargs):
        calls.append(obj.get('epoch') if isinstance(obj, dict) else None)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_mod.torch, 'save', full_disk_on_second_save)
    argv = base_argv(small_cifar, tmp_path, 'full', 3, '--loss', 'ce')
    with pytest.raises(SystemExit) as e:
        train_cmo.main(argv)
    run = tmp_path / 'full'
    assert f'cannot write {run / "last.pth.tar"}: No space left on device' in str(e.value)
    assert f'--resume {run / "last.pth.tar"}' in str(e.value)
    assert not [p for p in run.iterdir() if p.name.endswith('.tmp')]
    monkeypatch.setattr(checkpoint_mod.torch, 'save', real_save)
    assert torch.load(run / 'last.pth.tar', map_location='cpu', weights_only=True)['epoch'] == 0
    train_cmo.main(argv + ['--resume', str(run / 'last.pth.tar')])
    assert json.loads((run / 'results.json').read_text())['epoch'] == 2


def test_non_finite_state_is_never_checkpointed(small_cifar, tmp_path):
    """A cosine-head LDAM run at lr 1e6 once finished at chance with infinite BN variances in every checkpoint."""
    with pytest.raises(SystemExit) as e:
        train_cmo.main(base_argv(small_cifar, tmp_path, 'diverge', 3, '--loss', 'ldam', '--head-norm', '--lr', '1e6'))
    assert 'non-finite' in str(e.value)
    last = tmp_path / 'diverge' / 'last.pth.tar'
    if last.exists():
        ckpt = torch.load(last, map_location='cpu', weights_only=True)
        assert all(torch.isfinite(v).all() for v in ckpt['state_dict'].values() if v.is_floating_point())
    assert not (tmp_path / 'diverge' / 'results.json').exists()


@pytest.mark.parametrize('case', ['no-folder', 'no-list', 'no-eval-split', 'empty-by-profile', 'empty-in-list'])
def test_bad_data_fails_before_the_run_folder(small_cifar, tmp_path, capsys, case):
    """Bad data arguments end like a bad flag (status 2, the value named), before anything is written."""
    argv = base_argv(small_cifar, tmp_path, 'bad', 1, '--loss', 'ce')
    if case == 'no-folder':
        argv += ['--data-dir', str(tmp_path / 'nowhere')]
        message = f"--data-dir {tmp_path / 'nowhere'}: Dataset root"
    elif case == 'no-list':
        argv += ['--train-list', 'missing.txt']
        message = "List file '" + str(small_cifar / 'missing.txt') + "' does not exist"
    elif case == 'no-eval-split':  # train/ only: evaluating on the folder above would mean the training images
        (tmp_path / 'data').mkdir()
        (tmp_path / 'data' / 'train').symlink_to(small_cifar / 'train')
        argv += ['--data-dir', str(tmp_path / 'data')]
        message = "holds per-split data (train) but no 'validation' split"
    elif case == 'empty-by-profile':
        argv += ['--imb-ratio', '100', '--imb-max', '20']
        message = 'classes [6, 7, 8, 9] without images'
    else:  # a list without class 1: a loss over class counts cannot take an empty class
        for split in ('train', 'test'):
            lines = [f'{p.relative_to(small_cifar)} {0 if p.parent.name == "airplane" else 2}'
                     for p in sorted((small_cifar / split).glob('*/*.jpg')) if p.parent.name in ('airplane', 'bird')]
            (tmp_path / f'{split}.txt').write_text('\n'.join(lines) + '\n')
        argv += ['--train-list', str(tmp_path / 'train.txt'), '--val-list', str(tmp_path / 'test.txt'),
                 '--imb-ratio', '1']
        message = '--loss ce: class_counts must be finite and positive; classes [1]'
    with pytest.raises(SystemExit) as e:
        train_cmo.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'bad').exists()


@pytest.mark.parametrize('path', ['ordinary', 'device'])
def test_corrupt_image_is_named_not_substituted(small_cifar, tmp_path, capsys, path):
    import shutil
    from timm_cmo.data import create_lt_dataset
    data = tmp_path / 'data'
    shutil.copytree(small_cifar, data)
    train = create_lt_dataset('', str(data / 'train'), imb_ratio=10)
    victim = train.filename(len(train) - 1, absolute=True)  # an image of the rarest class
    Path(victim).write_bytes(b'not a jpeg at all')
    name = str(Path(victim).relative_to(data / 'train'))
    extra = ['--data-on-device', '--device', 'cpu'] if path == 'device' else ['--workers', '2']
    argv = base_argv(data, tmp_path, f'corrupt-{path}', 2, '--loss', 'ce') + extra
    with pytest.raises(SystemExit) as e:
        train_cmo.main(argv)
    message = str(e.value) + capsys.readouterr().err
    assert 'cannot read image' in message and name in message


# --- RIDE and the second stages (LAS, expert assignment) through train_cmo.py ------------------------------------

@pytest.fixture(scope='module')
def ride_run(small_cifar, tmp_path_factory):
    out = tmp_path_factory.mktemp('ride')
    argv = base_argv(small_cifar, out, 'ride', 2, '--model', 'ride_resnet20_cifar', '--loss', 'ride', '--reweight',
                     'drw', '--drw-epoch', '1', '--cmo', '--cmo-start-epoch', '-1', '--cmo-end-epochs', '0',
                     '--ride-diversity-factor', '-0.45')
    train_cmo.main(argv)
    return out / 'ride'


def test_ride_with_cmo_and_the_router_stage(ride_run, small_cifar, tmp_path):
    results = json.loads((ride_run / 'results.json').read_text())
    assert results['model_build']['architecture'] == 'ride_resnet20_cifar'
    assert results['method']['cmo_epochs'] == 2 and results['method']['drw_epochs'] == 1
    ckpt = torch.load(ride_run / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert any(k.startswith('experts.2.') for k in ckpt['state_dict'])
    # stage 2: only the router trains; experts and BN statistics are those of stage 1
    train_cmo.main(base_argv(small_cifar, tmp_path, 'router', 1, '--model', 'ride_resnet20_cifar', '--stage2', 'router',
                             '--loss', 'ride_ea', '--ros', '--lr', '0.01', '--initial-checkpoint',
                             str(ride_run / 'last.pth.tar')))
    routed = torch.load(tmp_path / 'router' / 'last.pth.tar', map_location='cpu', weights_only=True)['state_dict']
    for k, v in ckpt['state_dict'].items():
        assert torch.equal(routed[k], v), k
    assert any(k.startswith('router.') for k in routed)
    results = json.loads((tmp_path / 'router' / 'results.json').read_text())
    assert 1.0 <= results['metrics']['experts_used'] <= 3.0
    header = (tmp_path / 'router' / 'summary.csv').read_text().splitlines()[0]
    assert header.endswith('eval_experts_used')
    # the exported model keeps the router and routes in eval
    from timm_cmo import hub
    export = hub.export(tmp_path / 'router', tmp_path / 'export')
    import timm
    model = timm.create_model(f'local-dir:{export}', pretrained=True).eval()
    assert model.router is not None and model.num_experts == 3
    # --evaluate of the routed checkpoint builds the router from the checkpoint's record (no --model-kwargs)
    train_cmo.main(['--evaluate', '--resume', str(tmp_path / 'router' / 'last.pth.tar'), '--model',
                    'ride_resnet20_cifar', '--data-dir', str(small_cifar), '--imb-ratio', '10', '--workers', '0',
                    '-b', '32', '--output', str(tmp_path), '--experiment', 'router-eval'])
    evaluated = json.loads((tmp_path / 'router-eval' / 'results.json').read_text())
    assert evaluated['metrics']['top1'] == results['metrics']['top1']
    assert evaluated['metrics']['experts_used'] == pytest.approx(results['metrics']['experts_used'])


def test_ride_run_checkpoints_of_the_earlier_code(cifar10_dir, tmp_path):
    """Run checkpoints written before RIDE models returned one logits tensor (tests/models/fixtures/ride_run_a09f651,
    see tests/models/test_ride.py) still work in train_cmo.py: the stage-1 run resumes from its epoch 0 and
    finishes, its router stage is evaluated with the experts used, and a router stage starts from the stage-1
    checkpoint (the data: the same 6 training and 2 test images a class)."""
    import shutil
    fixtures = REPO / 'tests' / 'models' / 'fixtures' / 'ride_run_a09f651'
    data = cifar_subset(tmp_path / 'data', cifar10_dir, 6, 2)
    common = ['--data-dir', str(data), '--model', 'ride_resnet20_cifar', '--model-kwargs', 'num_experts=2',
              'expert_widths=(4,8)', '-b', '16', '--workers', '0', '--color-jitter', '0', '--train-crop-mode', 'pad',
              '--log-interval', '100', '--seed', '5', '--device', 'cpu']
    (tmp_path / 'stage1').mkdir()
    shutil.copyfile(fixtures / 'stage1_epoch0.pth', tmp_path / 'stage1' / 'last.pth.tar')  # resume writes beside it
    before = torch.load(tmp_path / 'stage1' / 'last.pth.tar', map_location='cpu', weights_only=True)
    train_cmo.main(common + ['--epochs', '2', '--loss', 'ride', '--reweight', 'drw', '--drw-epoch', '1', '--resume',
                             str(tmp_path / 'stage1' / 'last.pth.tar')])
    after = torch.load(tmp_path / 'stage1' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert before['epoch'] == 0 and after['epoch'] == 1
    assert after['state_dict'].keys() == before['state_dict'].keys()
    assert not torch.equal(after['state_dict']['heads.1.weight'], before['state_dict']['heads.1.weight'])
    assert json.loads((tmp_path / 'stage1' / 'results.json').read_text())['epoch'] == 1

    train_cmo.main(['--evaluate', '--resume', str(fixtures / 'router.pth'), '--data-dir', str(data), '--model',
                    'ride_resnet20_cifar', '--workers', '0', '-b', '16', '--output', str(tmp_path),
                    '--experiment', 'router-eval'])
    evaluated = json.loads((tmp_path / 'router-eval' / 'results.json').read_text())
    assert evaluated['metrics']['experts_used'] == 1.0 and evaluated['metrics']['samples'] == 20  # as that code's run

    train_cmo.main(common + ['--epochs', '1', '--stage2', 'router', '--loss', 'ride_ea', '--reweight', 'none', '--lr',
                             '0.01', '--initial-checkpoint', str(fixtures / 'stage1_epoch0.pth'), '--output',
                             str(tmp_path), '--experiment', 'router'])
    routed = torch.load(tmp_path / 'router' / 'last.pth.tar', map_location='cpu', weights_only=True)['state_dict']
    for k, v in before['state_dict'].items():
        assert torch.equal(routed[k], v), k  # only the router trains
    assert 1.0 <= json.loads((tmp_path / 'router' / 'results.json').read_text())['metrics']['experts_used'] <= 2.0


def test_run_eta_leaves_out_the_start_up_epoch():
    """The first epoch of a process (compilation, start-up) does not inflate the run's ETA once others are timed:
    a 190 s first epoch then 45 s epochs give 45 s per epoch left, not a mean of 93 s."""
    assert train_cmo.run_eta([190., 45., 45.], 100) == pytest.approx(4500.)
    assert train_cmo.run_eta([190.], 2) == pytest.approx(380.)
    assert train_cmo.run_eta([], 5) == 0.
    assert train_cmo.format_seconds(train_cmo.run_eta([190., 45., 45.], 100)) == '1:15:00'


def test_ride_errors(small_cifar, tmp_path, capsys):
    code, err = main_exit(base_argv(small_cifar, tmp_path, 'r1', 1, '--loss', 'ride'), capsys)
    assert code == 2 and '--loss ride needs a multi-expert model' in err and 'resnet20_cifar' in err
    code, err = main_exit(base_argv(small_cifar, tmp_path, 'r2', 1, '--model', 'ride_resnet20_cifar', '--loss', 'ride',
                                    '--model-kwargs', 'num_experts=0'), capsys)
    assert code == 2 and 'num_experts must be an integer >= 1, got 0' in err
    code, err = main_exit(base_argv(small_cifar, tmp_path, 'r3', 1, '--stage2', 'router', '--loss', 'ride_ea'), capsys)
    assert code == 2 and '--stage2 router starts from a stage-1 model' in err
    assert not any(tmp_path.iterdir())


def test_lade_and_ib_errors(small_cifar, tmp_path, capsys):
    """Bad LADE / IB flags and an IB loss on a model without one feature for its classifier: refused before
    anything is written, naming the flag or the model."""
    code, err = main_exit(base_argv(small_cifar, tmp_path, 'i1', 1, '--loss', 'ib', '--model', 'ride_resnet20_cifar'),
                          capsys)
    assert code == 2 and '--loss ib weighs each sample by its penultimate feature' in err
    assert '--model ride_resnet20_cifar: RIDEResNetCifar is a multi-expert model' in err
    for flags, message in [
        (['--loss', 'ib', '--reweight', 'cb'], '--reweight cb with --loss ib: the IB loss has its own'),
        (['--loss', 'ib_focal', '--ib-alpha', '0'], '--ib-alpha 0.0: must be > 0'),
        (['--loss', 'ib', '--ib-weighting', 'sqrt'], "--ib-weighting 'sqrt': choose from inverse, none"),
        (['--loss', 'ib', '--ib-start-epoch', '-2'], '--ib-start-epoch -2: must be >= 0'),
        (['--loss', 'lade', '--lade-alpha', '-1'], '--lade-alpha -1.0: must be >= 0'),
    ]:
        code, err = main_exit(base_argv(small_cifar, tmp_path, 'i2', 1, *flags), capsys)
        assert code == 2 and message in err, (flags, err)
    assert not any(tmp_path.iterdir())


def test_ib_epochs_recorded_and_a_late_start_warned(caplog):
    import logging
    caplog.set_level(logging.WARNING)
    args, _ = train_cmo.parse_args(['--data-dir', 'x', '--loss', 'ib', '--epochs', '200'])
    assert train_cmo.method_epochs(args)['ib_epochs'] == 100  # from epochs // 2
    args, _ = train_cmo.parse_args(['--data-dir', 'x', '--loss', 'ib_focal', '--epochs', '3', '--ib-start-epoch', '3'])
    assert train_cmo.method_epochs(args)['ib_epochs'] == 0
    train_cmo.warn_inactive_methods(args)
    assert '--loss ib_focal starts at epoch 3 (--ib-start-epoch), after the last epoch (2)' in caplog.text
    args, _ = train_cmo.parse_args(['--data-dir', 'x', '--loss', 'ce'])
    assert 'ib_epochs' not in train_cmo.method_epochs(args)


def test_las_stage_trains_the_classifier_only(ldam_cmo_run, small_cifar, tmp_path, capsys):
    """LAS from a stage-1 run: every non-BN backbone weight bit-identical, BN statistics shifted, classifier trained;
    a stage-1 checkpoint of another class count is refused by name."""
    ce_stage1 = tmp_path / 'stage1'
    train_cmo.main(base_argv(small_cifar, tmp_path, 'stage1', 1, '--loss', 'ce', '--reweight', 'drw', '--cmo',
                             '--cmo-start-epoch', '-1'))
    stage1 = torch.load(ce_stage1 / 'last.pth.tar', map_location='cpu', weights_only=True)['state_dict']
    train_cmo.main(base_argv(small_cifar, tmp_path, 'las', 2, '--stage2', 'las', '--loss', 'las', '--ros',
                             '--las-smooth-head', '0.3', '--las-smooth-tail', '0.0', '--initial-checkpoint',
                             str(ce_stage1 / 'last.pth.tar'), '--sched', 'cosine', '--warmup-epochs', '0'))
    las = torch.load(tmp_path / 'las' / 'last.pth.tar', map_location='cpu', weights_only=True)['state_dict']
    for k, v in stage1.items():
        if k.startswith('fc.'):
            assert not torch.equal(las[k], v), k
        elif 'running_' in k:
            assert not torch.equal(las[k], v), k  # BN shift learning
        elif not k.endswith('num_batches_tracked'):
            assert torch.equal(las[k], v), k  # conv weights and BN affine parameters untouched
    assert 'fc.lws_scale' in las
    # the exported model folds the weight scaling into the classifier
    from timm_cmo import hub
    import timm
    export = hub.export(tmp_path / 'las', tmp_path / 'export')
    assert timm.create_model(f'local-dir:{export}', pretrained=True).num_classes == 10
    # a stage-1 model of another class count: named, nothing written
    bad = dict(torch.load(ce_stage1 / 'last.pth.tar', map_location='cpu', weights_only=True))
    bad['state_dict'] = dict(bad['state_dict'], **{'fc.weight': bad['state_dict']['fc.weight'][:5],
                                                   'fc.bias': bad['state_dict']['fc.bias'][:5]})
    torch.save(bad, tmp_path / 'five.pth.tar')
    code, err = main_exit(base_argv(small_cifar, tmp_path, 'las5', 1, '--stage2', 'las', '--loss', 'las',
                                    '--initial-checkpoint', str(tmp_path / 'five.pth.tar')), capsys)
    assert code == 2 and 'fc.weight (5, 64) in the checkpoint, (10, 64) in the model' in err
    assert not (tmp_path / 'las5').exists()


# --- Causal Norm (--head causal) through train_cmo.py -------------------------------------------------------------

CAUSAL = ['--head', 'causal', '--causal-alpha', '1.5', '--loss', 'ce', '--cmo', '--cmo-start-epoch', '-1',
          '--cmo-end-epochs', '0', '--model-ema', '--model-ema-decay', '0.9']


def test_causal_norm_run_resumes_bit_for_bit_exports_and_evaluates(small_cifar, tmp_path, monkeypatch):
    """The moving-average feature is model state: a Causal Norm + CMO run stopped after epoch 0 (a failed save) and
    resumed ends bit for bit as the uninterrupted run, EMA included; the Hub export holds the same buffer and
    evaluates to the run's figures, as does its checkpoint; --causal-alpha changes only the evaluation."""
    import errno
    import timm
    from timm_cmo import checkpoint as checkpoint_mod
    from timm_cmo import hub
    train_cmo.main(base_argv(small_cifar, tmp_path, 'whole', 3, *CAUSAL))
    real_save = torch.save
    calls = []

    def full_disk_on_second_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_mod.torch, 'save', full_disk_on_second_save)
    argv = base_argv(small_cifar, tmp_path, 'cut', 3, *CAUSAL)
    with pytest.raises(SystemExit):
        train_cmo.main(argv)
    monkeypatch.setattr(checkpoint_mod.torch, 'save', real_save)
    last = tmp_path / 'cut' / 'last.pth.tar'
    assert torch.load(last, map_location='cpu', weights_only=True)['epoch'] == 0
    train_cmo.main(argv + ['--resume', str(last)])
    whole = torch.load(tmp_path / 'whole' / 'last.pth.tar', map_location='cpu', weights_only=True)
    cut = torch.load(last, map_location='cpu', weights_only=True)
    for key in ('state_dict', 'state_dict_ema'):
        assert whole[key].keys() == cut[key].keys()
        for k, v in whole[key].items():
            assert torch.equal(cut[key][k], v), f'{key} {k}'
    mean = whole['state_dict']['fc.embed_mean']
    assert mean.abs().sum() > 0 and not torch.equal(mean, whole['state_dict_ema']['fc.embed_mean'])
    results = json.loads((tmp_path / 'whole' / 'results.json').read_text())
    assert results['method']['head'] == 'causal' and results['method']['cmo_epochs'] == 3
    assert results['method']['causal'] == dict(heads=2, tau=16.0, gamma=1 / 32, alpha=1.5, momentum=0.9, lr_scale=0.0)
    assert results['model_build']['model_args']['causal_norm'] is True

    export = hub.export(tmp_path / 'whole', tmp_path / 'export')
    model = timm.create_model(f'local-dir:{export}', pretrained=True)
    assert torch.equal(model.fc.embed_mean, mean) and model.fc.alpha == 1.5
    card = (export / 'README.md').read_text()
    assert "Causal Norm's (Tang et al., NeurIPS 2020" in card and 'alpha = 1.5' in card and 'import timm_cmo' in card

    common = ['--evaluate', '--data-dir', str(small_cifar), '--imb-ratio', '10', '--workers', '0', '-b', '32',
              '--output', str(tmp_path)]
    ref = results['metrics']
    runs = {'export': ['--model', f'local-dir:{export}', '--pretrained'],
            'ckpt': ['--model', 'resnet20_cifar', '--head', 'causal', '--causal-alpha', '1.5', '--resume',
                     str(tmp_path / 'whole' / 'last.pth.tar')],
            'alpha0': ['--model', f'local-dir:{export}', '--pretrained', '--causal-alpha', '0']}
    got = {}
    for name, model_args in runs.items():
        train_cmo.main(common + model_args + ['--experiment', f'eval_{name}'])
        got[name] = json.loads((tmp_path / f'eval_{name}' / 'results.json').read_text())
    for name in ('export', 'ckpt'):
        assert got[name]['metrics']['top1'] == pytest.approx(ref['top1']), name
        assert got[name]['metrics']['nll'] == pytest.approx(ref['nll'], rel=1e-6), name
    assert got['alpha0']['method']['causal']['alpha'] == 0.0
    assert got['alpha0']['metrics']['nll'] != pytest.approx(ref['nll'], rel=1e-6)  # the TDE term is off
    # without --head causal the checkpoint does not fit a linear head: named, not loaded
    with pytest.raises(SystemExit) as e:
        train_cmo.main(common + ['--model', 'resnet20_cifar', '--resume', str(tmp_path / 'whole' / 'last.pth.tar'),
                                 '--experiment', 'eval_linear'])
    assert e.value.code == 2


@pytest.mark.parametrize('extra,message', [
    (['--head', 'causal', '--head-norm'], '--head causal and --head-norm are two classifier heads'),
    (['--head', 'causal', '--model', 'ride_resnet20_cifar'],
     '--head causal: --model ride_resnet20_cifar has no Causal Norm option'),
    (['--head', 'causal', '--model', 'vit_tiny_patch16_224'], 'split forward_features / forward_head(x, pre_logits)'),
    (['--head', 'causal', '--causal-heads', '3'], 'heads 3 must divide the feature size 64'),
    (['--head', 'causal', '--causal-heads', '0'], '--causal-heads 0: heads must be an integer >= 1'),
    (['--head', 'causal', '--causal-tau', '0'], '--causal-tau 0.0: tau must be > 0'),
    (['--head', 'causal', '--causal-momentum', '2'], '--causal-momentum 2.0: momentum must be in [0, 1]'),
    (['--head', 'causal', '--causal-lr-scale', '-1'], '--causal-lr-scale -1.0: lr_scale must be >= 0'),
    (['--causal-alpha', '1'], '--causal-alpha 1.0: sets the Causal Norm head: add --head causal'),
    (['--head', 'cosine'], "--head 'cosine': choose from linear, causal"),
    (['--head', 'causal', '--stage2', 'las', '--loss', 'las', '--initial-checkpoint', 'x'],
     'Causal Norm (--head causal) is trained in one stage'),
])
def test_causal_norm_errors(small_cifar, tmp_path, capsys, extra, message):
    code, err = main_exit(base_argv(small_cifar, tmp_path, 'bad', 1, '--loss', 'ce', *extra), capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / 'bad').exists()


def test_torchrun_causal_norm(small_cifar, tmp_path):
    """Two processes: the moving average takes both ranks' samples (all-reduced in the forward) without a hang."""
    argv = base_argv(small_cifar, tmp_path, 'ddp_causal', 1, '--head', 'causal', '--loss', 'ce', '--cmo',
                     '--cmo-start-epoch', '-1', '--cmo-end-epochs', '0')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(REPO / 'train_cmo.py')] + argv + ['--device', 'cpu'],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    mean = torch.load(tmp_path / 'ddp_causal' / 'last.pth.tar', map_location='cpu',
                      weights_only=True)['state_dict']['fc.embed_mean']
    assert torch.isfinite(mean).all() and mean.abs().sum() > 0


# --- BBN ---------------------------------------------------------------------------------------------------------

BBN = ['--model', 'bbn_resnet32_cifar', '--loss', 'bbn', '--cmo', '--cmo-start-epoch', '-1', '--cmo-end-epochs', '0',
       '--model-ema', '--model-ema-decay', '0.9']


def test_bbn_run_killed_and_resumed_equals_the_uninterrupted_run(small_cifar, tmp_path):
    """SIGKILL a BBN + CMO run (2 loader workers, EMA) after its first checkpoint and resume it: bit for bit the
    uninterrupted run read without workers (the dual batch is in the epoch plan); results.json and the model card
    record BBN; the export rebuilds the model and evaluates, as the checkpoint does, to the run's figures."""
    from timm_cmo import hub
    whole = run_script(base_argv(small_cifar, tmp_path, 'whole', 3, *BBN))
    assert whole.returncode == 0, whole.stderr[-4000:]
    assert 'dual batch r=2' in whole.stderr
    argv = base_argv(small_cifar, tmp_path, 'killed', 3, *BBN) + ['--workers', '2']
    last = kill_after_first_checkpoint(argv, tmp_path / 'killed')
    assert torch.load(last, map_location='cpu', weights_only=True)['epoch'] < 2
    done = run_script(argv + ['--resume', str(last)])
    assert done.returncode == 0, done.stderr[-4000:]
    reference = torch.load(tmp_path / 'whole' / 'last.pth.tar', map_location='cpu', weights_only=True)
    resumed = torch.load(last, map_location='cpu', weights_only=True)
    assert resumed['epoch'] == reference['epoch'] == 2
    assert_same_training_state(reference, resumed)
    results = json.loads((tmp_path / 'whole' / 'results.json').read_text())
    assert results['method']['loss'] == 'bbn' and results['method']['bbn'] == dict(r=2.0, alpha_epochs=3)
    assert results['method']['cmo_epochs'] == 3
    assert results['model'] == 'bbn_resnet32_cifar'

    export = hub.export(tmp_path / 'whole', tmp_path / 'export')
    card = (export / 'README.md').read_text()
    assert 'Bilateral-Branch Network (BBN, Zhou et al., CVPR 2020)' in card and 'alpha = 1 - (t / 3)^2' in card
    common = ['--evaluate', '--data-dir', str(small_cifar), '--imb-ratio', '10', '--workers', '0', '-b', '32',
              '--output', str(tmp_path)]
    for name, model_args in (('export', ['--model', f'local-dir:{export}', '--pretrained']),
                             ('ckpt', ['--model', 'bbn_resnet32_cifar', '--resume',
                                       str(tmp_path / 'whole' / 'last.pth.tar')])):
        proc = run_script(common + model_args + ['--experiment', f'eval_{name}'])
        assert proc.returncode == 0, proc.stderr[-4000:]
        got = json.loads((tmp_path / f'eval_{name}' / 'results.json').read_text())['metrics']
        assert got['top1'] == pytest.approx(results['metrics']['top1']), name
        assert got['nll'] == pytest.approx(results['metrics']['nll'], rel=1e-6), name


@pytest.mark.parametrize('cmo', [False, True])
@pytest.mark.parametrize('epoch', [0, 2])
def test_bbn_library_loop_equals_train_one_epoch(tiny_lt, cmo, epoch):
    """The README's BBN loop (``model(x, loader.dual.x, loss_fn.alpha)``, ``loss_fn(logits, target,
    mix=loader.mix_info, dual=loader.dual)``) and train_cmo.py's epoch give the same weights, at alpha 1 (epoch 0)
    and below it (epoch 2), with and without CMO."""
    import argparse
    import timm
    from timm_cmo.data import create_cmo_loader
    from timm_cmo.losses import create_loss
    states = []
    for path in ('library', 'script'):
        torch.manual_seed(0)
        model = timm.create_model('bbn_resnet32_cifar', num_classes=10)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        loader = create_cmo_loader(tiny_lt, (3, 32, 32), 16, is_training=True, device='cpu', num_workers=0,
                                   num_classes=10, train_crop_mode='pad', color_jitter=None, seed=1, epochs=4,
                                   cmo=cmo, cmo_start_epoch=-1, cmo_prob=1.0, dual_r=2.0)
        loss_fn = create_loss('bbn', tiny_lt.class_counts, epochs=4)
        loader.set_epoch(epoch)
        loss_fn.set_epoch(epoch)
        if path == 'library':
            model.train()
            for x, target in loader:
                dual = loader.dual  # the re-balancing batch: dual.x, dual.y
                loss = loss_fn(model(x, dual.x, loss_fn.alpha), target, mix=loader.mix_info, dual=dual)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        else:
            args = argparse.Namespace(channels_last=False, clip_grad=None, clip_mode='norm', log_interval=50, rank=0,
                                      world_size=1, distributed=False)
            train_cmo.train_one_epoch(epoch, model, loader, optimizer, loss_fn, args, torch.device('cpu'))
        states.append(model.state_dict())
    for k, v in states[0].items():
        torch.testing.assert_close(states[1][k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize('extra,message', [
    (['--loss', 'bbn'], '--loss bbn trains the two branches of a BBN model'),
    (['--model', 'bbn_resnet32_cifar', '--loss', 'ce'], '--model bbn_resnet32_cifar is a BBN model'),
    (['--model', 'bbn_resnet32_cifar', '--loss', 'bbn', '--cmo', '--cmo-variant', 'back'],
     "--cmo-variant 'back': draws the ordinary batch's backgrounds from Q"),
    (['--model', 'bbn_resnet32_cifar', '--loss', 'bbn', '--cmo', '--cmo-variant', 'minor'],
     "--cmo-variant 'minor': draws the ordinary batch's backgrounds from Q"),
    (['--model', 'bbn_resnet32_cifar', '--loss', 'bbn', '--remix'], '--remix with --loss bbn'),
    (['--model', 'bbn_resnet32_cifar', '--loss', 'bbn', '--cutmix', '1'], '--mixup / --cutmix with --loss bbn'),
    (['--model', 'bbn_resnet32_cifar', '--loss', 'bbn', '--ros'], '--ros with --loss bbn'),
    (['--model', 'bbn_resnet32_cifar', '--loss', 'bbn', '--reweight', 'drw'], "--reweight 'drw': BBN re-balances"),
    (['--model', 'bbn_resnet32_cifar', '--loss', 'bbn', '--bbn-r', '-1'], '--bbn-r -1.0: must be >= 0'),
    (['--model', 'bbn_resnet32_cifar', '--loss', 'bbn', '--bbn-alpha-epochs', '1'],
     '--bbn-alpha-epochs 1: must be >= --epochs 2'),
    (['--loss', 'ce', '--bbn-r', '2'], "--bbn-r 2.0: sets BBN's re-balancing branch: add --loss bbn"),
    (['--model', 'bbn_resnet32_cifar', '--loss', 'bbn', '--head-norm'], "unexpected keyword argument 'head_norm'"),
    (['--model', 'bbn_resnet32_cifar', '--loss', 'bbn', '--head', 'causal'],
     '--head causal: --model bbn_resnet32_cifar has no Causal Norm option'),
    (['--model', 'bbn_resnet32_cifar', '--loss', 'bbn', '--stage2', 'crt', '--initial-checkpoint', 'x'],
     '--stage2 crt trains with --loss ce'),
])
def test_bbn_errors(small_cifar, tmp_path, capsys, extra, message):
    code, err = main_exit(base_argv(small_cifar, tmp_path, 'bad', 2, *extra), capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / 'bad').exists()


def test_torchrun_bbn(small_cifar, tmp_path):
    """Two processes: BBN's two-batch forward goes through DistributedDataParallel (each rank its share of the
    ordinary and the re-balancing batches)."""
    argv = base_argv(small_cifar, tmp_path, 'ddp_bbn', 1, *BBN[:9])  # without EMA
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(REPO / 'train_cmo.py')] + argv + ['--device', 'cpu'],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 'Process 1 of 2' in proc.stderr and 'dual batch r=2' in proc.stderr
    assert json.loads((tmp_path / 'ddp_bbn' / 'results.json').read_text())['method']['bbn']['r'] == 2.0


# --- run records that tell the truth ------------------------------------------------------------------------------

def test_short_run_records_and_evaluation_counts(small_cifar, tmp_path, caplog):
    """A run too short for the CMO window and the DRW switch says so; summary.csv has the same columns in every row
    and each epoch's own lr; --evaluate takes the training class counts from the checkpoint or the export."""
    import logging
    import re
    from timm_cmo import hub
    caplog.set_level(logging.INFO)
    run = tmp_path / 'short'
    train_cmo.main(base_argv(small_cifar, tmp_path, 'short', 2, '--cmo', '--loss', 'ce', '--reweight', 'drw', '--drw-epoch', '5',
                             '--eval-interval', '2', '--log-interval', '1'))
    assert '--cmo is on but no epoch of this run mixes' in caplog.text
    assert 'the class weights never apply' in caplog.text
    assert re.search(r'Final: top1 \d+\.\d\d  top5 \d+\.\d\d', caplog.text)  # rounded, not 28.639999999999997
    assert 'ETA: ' in caplog.text and 'Epoch 1 done in' in caplog.text and 'ETA of the run' in caplog.text
    assert re.search(r'Eval: \[ +0/\d+\]  ETA: ', caplog.text)  # progress during evaluation
    results = json.loads((run / 'results.json').read_text())
    assert results['method']['cmo_epochs'] == 0 and results['method']['drw_epochs'] == 0
    rows = [r.split(',') for r in (run / 'summary.csv').read_text().strip().splitlines()]
    header, e0, e1 = rows
    assert len(e0) == len(e1) == len(header) and header[:4] == ['epoch', 'train_loss', 'lr', 'epoch_time_s']
    assert float(e0[2]) == pytest.approx(0.02) and float(e1[2]) == pytest.approx(0.04)  # warm-up lr*(e+1)/5
    assert e0[header.index('eval_top1')] == '' and float(e1[header.index('eval_top1')]) == pytest.approx(
        results['metrics']['top1'], abs=1e-3)
    card = hub.model_card(hub.load_run_args(run), results)
    assert 'never mixing: 0 of 2 epochs' in card and 'never applied: 0 of 2 epochs' in card
    assert f'expected calibration error {results["metrics"]["ece"]:.2f} %' in card
    assert (run / 'reliability.png').is_file() and len(results['calibration']['count']) == 15
    # every file a run writes has the permissions open() gives
    umask = os.umask(0)
    os.umask(umask)
    for path in run.iterdir():
        if path.is_file():
            assert (path.stat().st_mode & 0o777) == 0o666 & ~umask, path.name

    # --evaluate without the imbalance flags: the checkpoint's counts, not "every class many-shot"
    plain = ['--data-dir', str(small_cifar), '--model', 'resnet20_cifar', '--workers', '0', '--output', str(tmp_path)]
    train_cmo.main(plain + ['--evaluate', '--resume', str(run / 'last.pth.tar'), '--experiment', 'eval_ckpt'])
    got = json.loads((tmp_path / 'eval_ckpt' / 'results.json').read_text())
    assert got['dataset']['class_counts'] == results['dataset']['class_counts'] == [60, 46, 35, 27, 21, 16, 12, 10, 7, 6]
    assert 'checkpoint' in got['dataset']['class_counts_from']
    assert got['metrics']['many'] is None and got['metrics']['top1'] == pytest.approx(results['metrics']['top1'])
    export = hub.export(run, tmp_path / 'export')
    train_cmo.main(['--data-dir', str(small_cifar), '--model', f'local-dir:{export}', '--pretrained', '--workers', '0',
                    '--output', str(tmp_path), '--evaluate', '--experiment', 'eval_export'])
    got = json.loads((tmp_path / 'eval_export' / 'results.json').read_text())
    assert got['dataset']['class_counts'] == results['dataset']['class_counts']
    assert got['metrics']['top1'] == pytest.approx(results['metrics']['top1'])

    # a run started from a local-dir model exports (it once failed with a KeyError)
    train_cmo.main(base_argv(small_cifar, tmp_path, 'from_export', 1, '--loss', 'ce') + [
        '--model', f'local-dir:{export}', '--pretrained'])
    again = hub.export(tmp_path / 'from_export', tmp_path / 'export2')
    assert json.loads((again / 'config.json').read_text())['architecture'] == 'resnet20_cifar'


def test_console_scripts_exit_zero(small_cifar, tmp_path):
    from importlib.metadata import entry_points
    scripts = {ep.name: ep for ep in entry_points(group='console_scripts') if ep.name.startswith('timm-cmo')}
    assert {'timm-cmo-train', 'timm-cmo-convert', 'timm-cmo-preview', 'timm-cmo-hub'} <= set(scripts)
    train = scripts['timm-cmo-train'].load()
    assert train(base_argv(small_cifar, tmp_path, 'cli', 1, '--loss', 'ce')) == 0
    preview = scripts['timm-cmo-preview'].load()
    # 60 images a class: rho 10 (the default 100 would leave the last class empty, an error since 3b6955e)
    assert preview(['--data-dir', str(small_cifar / 'train'), '--imb-ratio', '10', '--num', '4',
                    '--out', str(tmp_path / 'p.png')]) == 0


# --- decoupled classifiers (cRT, LWS), post-hoc adjustments, shifted test priors -------------------------------------

DECOUPLE = ['--imb-max', '40']  # classes 40 ... 4 of the 60 images a class: 20 or more left out of every class
STAGE2_ARGS = ['--ros', '--sched', 'cosine', '--warmup-epochs', '0', '--loss', 'ce']


@pytest.fixture(scope='module')
def ce_cmo_stage1(small_cifar, tmp_path_factory):
    """A stage-1 CE + CMO run on the long-tailed subset 40 ... 4 (2 epochs)."""
    out = tmp_path_factory.mktemp('stage1')
    train_cmo.main(base_argv(small_cifar, out, 'ce_cmo', 2, *DECOUPLE, '--loss', 'ce', '--cmo', '--cmo-start-epoch',
                             '-1', '--cmo-end-epochs', '0'))
    return out / 'ce_cmo'


def _state(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.mark.parametrize('kind', ['crt', 'lws'])
def test_decoupled_stage_freezes_all_but_its_part(ce_cmo_stage1, small_cifar, tmp_path, kind, monkeypatch):
    """After CE + CMO: cRT re-trains the classifier, LWS a per-class scale; every other tensor of the stage-2
    checkpoint (BatchNorm statistics and num_batches_tracked included) is the stage-1 one bit for bit. Killed after
    its first epoch and resumed, the run ends where the uninterrupted one does."""
    stage1 = _state(ce_cmo_stage1 / 'last.pth.tar')['state_dict']
    argv = base_argv(small_cifar, tmp_path, kind, 2, *DECOUPLE, '--stage2', kind, *STAGE2_ARGS,
                     '--initial-checkpoint', str(ce_cmo_stage1 / 'last.pth.tar'))
    train_cmo.main(argv)
    stage2 = _state(tmp_path / kind / 'last.pth.tar')['state_dict']
    for k, v in stage1.items():
        if k.startswith('fc.') and kind == 'crt':
            assert not torch.equal(stage2[k], v), k
        else:
            assert torch.equal(stage2[k], v), k
    assert set(stage2) - set(stage1) == ({'fc.lws_scale'} if kind == 'lws' else set())
    if kind == 'lws':
        assert not torch.equal(stage2['fc.lws_scale'], torch.ones(10))
    results = json.loads((tmp_path / kind / 'results.json').read_text())
    assert results['method']['stage2'] == kind and results['dataset']['class_counts'][0] == 40
    assert results['metrics']['samples'] == 200

    # interrupted after epoch 0 (the second epoch never starts), then resumed: the same weights and records
    real = train_cmo.train_one_epoch

    def interrupt(epoch, *a, **kw):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(epoch, *a, **kw)
    monkeypatch.setattr(train_cmo, 'train_one_epoch', interrupt)
    part = list(argv)
    part[part.index('--experiment') + 1] = f'{kind}_part'
    with pytest.raises(KeyboardInterrupt):
        train_cmo.main(part)
    monkeypatch.setattr(train_cmo, 'train_one_epoch', real)
    resume = [a for a in part if a not in ('--initial-checkpoint', str(ce_cmo_stage1 / 'last.pth.tar'))]
    train_cmo.main(resume + ['--resume', str(tmp_path / f'{kind}_part' / 'last.pth.tar')])
    resumed = _state(tmp_path / f'{kind}_part' / 'last.pth.tar')['state_dict']
    assert resumed.keys() == stage2.keys() and all(torch.equal(resumed[k], stage2[k]) for k in stage2)
    assert json.loads((tmp_path / f'{kind}_part' / 'results.json').read_text())['metrics']['top1'] == \
        results['metrics']['top1']


@pytest.mark.parametrize('kind', ['crt', 'lws'])
def test_decoupled_stage_data_on_device_equals_ordinary(ce_cmo_stage1, small_cifar, tmp_path, kind):
    """With the random crop and flip off, the second stage trains the same model on both loader paths."""
    weights = {}
    for path, extra in (('ordinary', []), ('device', ['--data-on-device'])):
        train_cmo.main(base_argv(small_cifar, tmp_path, path, 2, *DECOUPLE, '--stage2', kind, *STAGE2_ARGS,
                                 '--crop-padding', '0', '--hflip', '0', '--device', 'cpu', '--initial-checkpoint',
                                 str(ce_cmo_stage1 / 'last.pth.tar'), *extra))
        weights[path] = _state(tmp_path / path / 'last.pth.tar')['state_dict']
    assert weights['ordinary'].keys() == weights['device'].keys()
    for k, v in weights['ordinary'].items():
        assert torch.equal(v, weights['device'][k]), k


def test_lws_on_a_cosine_head_evaluates_and_exports(small_cifar, tmp_path, capsys):
    """LDAM-DRW (cosine head) -> LWS: the scale is the head's own parameter; --evaluate of the checkpoint and of the
    export give the run's figures, the export reloads with timm; a stage 2 on a 5-class checkpoint is refused."""
    from timm_cmo import hub
    import timm
    train_cmo.main(base_argv(small_cifar, tmp_path, 'ldam', 1, *DECOUPLE, '--loss', 'ldam', '--head-norm'))
    train_cmo.main(base_argv(small_cifar, tmp_path, 'lws', 1, *DECOUPLE, '--head-norm', '--stage2', 'lws', *STAGE2_ARGS,
                             '--initial-checkpoint', str(tmp_path / 'ldam' / 'last.pth.tar')))
    ckpt = _state(tmp_path / 'lws' / 'last.pth.tar')['state_dict']
    assert 'fc.lws_scale' in ckpt and ckpt['fc.weight'].shape == (64, 10)
    assert torch.equal(ckpt['fc.weight'], _state(tmp_path / 'ldam' / 'last.pth.tar')['state_dict']['fc.weight'])
    results = json.loads((tmp_path / 'lws' / 'results.json').read_text())
    assert results['model_build']['model_args'].get('head_lws') is True
    train_cmo.main(['--evaluate', '--resume', str(tmp_path / 'lws' / 'last.pth.tar'), '--model', 'resnet20_cifar',
                    '--head-norm', '--data-dir', str(small_cifar), '--workers', '0', '--output', str(tmp_path),
                    '--experiment', 'eval'])
    assert json.loads((tmp_path / 'eval' / 'results.json').read_text())['metrics']['top1'] == results['metrics']['top1']
    export = hub.export(tmp_path / 'lws', tmp_path / 'export')
    model = timm.create_model(f'local-dir:{export}', pretrained=True)
    assert model.fc.lws_scale is not None and torch.equal(model.fc.lws_scale.detach(), ckpt['fc.lws_scale'])

    bad = _state(tmp_path / 'ldam' / 'last.pth.tar')
    bad['state_dict'] = dict(bad['state_dict'], **{'fc.weight': bad['state_dict']['fc.weight'][:, :5].clone()})
    torch.save(bad, tmp_path / 'five.pth.tar')
    code, err = main_exit(base_argv(small_cifar, tmp_path, 'crt5', 1, *DECOUPLE, '--head-norm', '--stage2', 'crt',
                                    *STAGE2_ARGS, '--initial-checkpoint', str(tmp_path / 'five.pth.tar')), capsys)
    assert code == 2 and 'fc.weight (64, 5) in the checkpoint, (64, 10) in the model' in err
    assert not (tmp_path / 'crt5').exists()
    code, err = main_exit(base_argv(small_cifar, tmp_path, 'crt6', 1, '--stage2', 'crt', '--initial-checkpoint', 'x',
                                    '--loss', 'las'), capsys)
    assert code == 2 and '--stage2 crt trains with --loss ce' in err
    code, err = main_exit(base_argv(small_cifar, tmp_path, 'crt7', 1, '--stage2', 'lws', '--initial-checkpoint', 'x',
                                    '--cmo'), capsys)
    assert code == 2 and '--stage2 lws re-trains the weight scaling without mixing' in err


def _eval_argv(run, data_dir, out, exp, *extra):
    return ['--evaluate', '--resume', str(run / 'last.pth.tar'), '--model', 'resnet20_cifar', '--data-dir',
            str(data_dir), '--imb-ratio', '10', *DECOUPLE, '--workers', '0', '-b', '50', '--output', str(out),
            '--experiment', exp, *extra]


def test_tau_is_chosen_on_held_out_training_images_never_on_the_test_split(ce_cmo_stage1, small_cifar, tmp_path,
                                                                          monkeypatch):
    """--post-hoc tau_norm with --tune-holdout-per-class: every image read before tau is chosen is a training-split
    image the long-tailed subset left out (fails if the test split, or a training image, is read to choose tau);
    results.json records the grid, the validation scores and the choice; the export with the chosen tau, evaluated
    as a plain timm model, gives the same figures."""
    from timm_cmo import hub, posthoc
    from timm_cmo.data import LongTailDataset
    reads = []
    real_getitem = LongTailDataset.__getitem__

    def logged(self, index):
        reads.append(self.filename(index, absolute=True))
        return real_getitem(self, index)
    real_select = posthoc.select_tau

    def select(*a, **kw):
        reads.append('<tau chosen>')
        return real_select(*a, **kw)
    monkeypatch.setattr(LongTailDataset, '__getitem__', logged)
    monkeypatch.setattr(posthoc, 'select_tau', select)
    train_cmo.main(_eval_argv(ce_cmo_stage1, small_cifar, tmp_path, 'tau', '--post-hoc', 'tau_norm',
                              '--tune-holdout-per-class', '10', '--tune-seed', '1'))
    monkeypatch.undo()
    chosen_at = reads.index('<tau chosen>')
    before, after = reads[:chosen_at], reads[chosen_at + 1:]
    train_ds = train_cmo.build_datasets(train_cmo.parse_args(base_argv(small_cifar, tmp_path, 'x', 1, *DECOUPLE))[0])[0]
    trained = {train_ds.filename(i, absolute=True) for i in range(len(train_ds))}
    assert len(trained) == sum(json.loads((ce_cmo_stage1 / 'results.json').read_text())['dataset']['class_counts'])
    assert len(before) == 100 and all(f'{os.sep}train{os.sep}' in f for f in before)
    assert not set(before) & trained  # not one of the images the model trained on
    assert len(after) == 200 and all(f'{os.sep}test{os.sep}' in f for f in after)

    results = json.loads((tmp_path / 'tau' / 'results.json').read_text())
    record = results['post_hoc']
    assert record['kind'] == 'tau_norm' and record['grid'] == [round(0.1 * i, 1) for i in range(21)]
    validation = record['validation']
    assert validation['images'] == 100 and validation['class_counts'] == [10] * 10
    assert record['tau'] == record['grid'][max(range(21), key=lambda i: (round(validation['scores'][i], 9), -i))]
    assert validation['score'] == max(validation['scores'])
    assert 'outside the long-tailed subset' in validation['source']

    # the export with the chosen tau is a plain timm model giving the same evaluation
    export = tmp_path / 'export'
    assert hub.main(['export', str(ce_cmo_stage1), str(export), '--post-hoc-from', str(tmp_path / 'tau')]) == 0
    config = json.loads((export / 'config.json').read_text())
    assert config['timm_cmo']['post_hoc'] == dict(kind='tau_norm', tau=record['tau'])
    assert 'not on the test set' in (export / 'README.md').read_text()
    train_cmo.main(['--evaluate', '--model', f'local-dir:{export}', '--pretrained', '--data-dir', str(small_cifar),
                    '--workers', '0', '--output', str(tmp_path), '--experiment', 'exported'])
    exported = json.loads((tmp_path / 'exported' / 'results.json').read_text())['metrics']
    assert exported['top1'] == results['metrics']['top1']
    assert exported['nll'] == pytest.approx(results['metrics']['nll'])
    with pytest.raises(SystemExit):  # adjusted once already: not twice
        train_cmo.main(['--evaluate', '--model', f'local-dir:{export}', '--pretrained', '--data-dir', str(small_cifar),
                        '--workers', '0', '--output', str(tmp_path), '--experiment', 'twice', '--post-hoc', 'tau_norm',
                        '--post-hoc-tau', '1'])
    assert not (tmp_path / 'twice').exists()


@pytest.mark.parametrize('best', [0, 1, 2])
def test_tau_chosen_at_the_edge_of_the_grid_is_warned(ce_cmo_stage1, small_cifar, tmp_path, monkeypatch, caplog, best):
    """A tau at either end of the grid, better than the worst value, may be short of the best one: a warning names
    --post-hoc-tau; one inside the grid gives none (the validation scores are set, the search is tested above)."""
    import logging
    from timm_cmo import posthoc

    def select(kind, classifier, features, targets, counts, grid, logit_scale=1.):
        scores = [50. - abs(i - best) for i in range(len(grid))]
        return dict(tau=grid[best], score=scores[best], grid=grid, scores=scores, criterion='mean per-class top-1 (%)')
    monkeypatch.setattr(posthoc, 'select_tau', select)
    caplog.set_level(logging.WARNING)
    train_cmo.main(_eval_argv(ce_cmo_stage1, small_cifar, tmp_path, 'edge', '--post-hoc', 'logit_adjust',
                              '--post-hoc-tau', '0.5', '1', '1.5', '--tune-holdout-per-class', '2'))
    warned = [r.getMessage() for r in caplog.records if 'edge of the grid' in r.getMessage()]
    tau = json.loads((tmp_path / 'edge' / 'results.json').read_text())['post_hoc']['tau']
    assert tau == [0.5, 1., 1.5][best]
    assert len(warned) == (best != 1) and all('0.5 to 1.5' in w and '--post-hoc-tau' in w for w in warned)


def test_post_hoc_and_test_prior_bad_input_writes_nothing(ce_cmo_stage1, small_cifar, tmp_path, capsys):
    prior = tmp_path / 'prior.txt'
    cases = [
        (['--post-hoc', 'tau_norm'], 'tau is chosen on validation data held out of training, never on the test set'),
        (['--post-hoc', 'logit_adjust', '--post-hoc-tau', '0.5', '1'], '--tune-holdout-per-class N'),
        (['--post-hoc', 'median'], "--post-hoc 'median': choose from tau_norm, logit_adjust"),
        (['--post-hoc', 'tau_norm', '--post-hoc-tau', '-1'], "--post-hoc-tau -1.0: tau must be a finite number >= 0"),
        (['--tune-holdout-per-class', '10'], 'the validation data is for choosing tau: add --post-hoc'),
        (['--post-hoc', 'tau_norm', '--tune-list', 'a.txt', '--tune-fraction', '0.1'], 'give one source'),
        (['--test-prior', 'forward'], '--test-prior forward needs --test-imb-ratio'),
        (['--test-prior', 'sideways'],
         "--test-prior 'sideways': choose from uniform, forward, backward or give a file"),
        (['--test-prior', 'uniform', '--test-imb-ratio', '5'], "is for --test-prior forward|backward, not 'uniform'"),
        (['--prior-correction', 'train'], 'use it with --evaluate and --test-prior'),
        (['--test-prior', 'uniform', '--prior-correction', 'train', '--post-hoc', 'tau_norm', '--post-hoc-tau', '1'],
         'would remove the training prior twice'),
        (['--test-prior', str(prior)], f'{prior}: 3 class weights for 10 classes'),
        (['--test-prior', str(prior) + '.neg'], 'line 2'),
        (['--test-prior', 'forward', '--test-imb-ratio', '50'], 'leaves classes without test images'),
        (['--post-hoc', 'tau_norm', '--tune-holdout-per-class', '10', '--imb-seed', '1'],
         '--imb-seed 0 in training, 1 here'),
        (['--post-hoc', 'tau_norm', '--tune-holdout-per-class', '25'], 'fewer than 25 training images outside'),
    ]
    prior.write_text('1\n2\n3\n')
    (tmp_path / 'prior.txt.neg').write_text('1\n-1\n' + '1\n' * 8)
    for extra, message in cases:
        code, err = main_exit(_eval_argv(ce_cmo_stage1, small_cifar, tmp_path, 'bad', *extra), capsys)
        assert code == 2 and message in err, (extra, err)
        assert not (tmp_path / 'bad').exists()
    code, err = main_exit(base_argv(small_cifar, tmp_path, 'bad', 1, '--post-hoc', 'tau_norm', '--post-hoc-tau', '1'),
                          capsys)
    assert code == 2 and 'use it with --evaluate' in err


def test_shifted_test_priors_and_the_prior_correction(ce_cmo_stage1, small_cifar, tmp_path):
    """forward / backward test sets have LADE's counts (n_max 20 test images a class); under the uniform prior the
    correction 'train' (logits - log p_train + log p_test) predicts exactly as logit adjustment with tau 1."""
    for profile, rho in (('forward', 5), ('backward', 5)):
        train_cmo.main(_eval_argv(ce_cmo_stage1, small_cifar, tmp_path, profile, '--test-prior', profile,
                                  '--test-imb-ratio', str(rho)))
        results = json.loads((tmp_path / profile / 'results.json').read_text())
        lade = [int(20 * (1 / rho) ** (i / 9)) for i in range(10)]
        expected = lade if profile == 'forward' else lade[::-1]
        assert results['test_prior']['class_counts'] == expected and results['test_prior']['profile'] == profile
        assert results['metrics']['samples'] == sum(expected)
        assert results['per_class']['test_images'] == expected
    train_cmo.main(_eval_argv(ce_cmo_stage1, small_cifar, tmp_path, 'corrected', '--test-prior', 'uniform',
                              '--prior-correction', 'train'))
    train_cmo.main(_eval_argv(ce_cmo_stage1, small_cifar, tmp_path, 'la1', '--post-hoc', 'logit_adjust',
                              '--post-hoc-tau', '1'))
    corrected = json.loads((tmp_path / 'corrected' / 'results.json').read_text())
    la1 = json.loads((tmp_path / 'la1' / 'results.json').read_text())
    assert corrected['per_class']['top1'] == la1['per_class']['top1']
    # the two logits differ by the constant log(1/C): the same softmax, so the same calibration too
    assert corrected['metrics']['nll'] == pytest.approx(la1['metrics']['nll'], rel=1e-5)
    assert corrected['metrics']['ece'] == pytest.approx(la1['metrics']['ece'], rel=1e-5, abs=1e-6)
    assert corrected['prior_correction']['mode'] == 'train' and la1['post_hoc']['validation'] is None
    counts = corrected['dataset']['class_counts']
    assert corrected['prior_correction']['p_train'] == pytest.approx([n / sum(counts) for n in counts])
    plain = json.loads((ce_cmo_stage1 / 'results.json').read_text())
    assert plain['metrics']['nll'] != pytest.approx(la1['metrics']['nll'], rel=1e-3)  # the adjustment acted


def test_tune_fraction_is_held_out_of_training(small_cifar, tmp_path, capsys):
    """--tune-fraction: the stratified fraction never trains (the recorded counts lack it), --evaluate holds out the
    same images to choose tau, and an evaluation with another fraction is refused."""
    from timm_cmo.data import long_tail_counts
    from timm_cmo.data.splits import stratified_holdout_counts
    train_cmo.main(base_argv(small_cifar, tmp_path, 'frac', 1, *DECOUPLE, '--loss', 'ce', '--tune-fraction', '0.25'))
    results = json.loads((tmp_path / 'frac' / 'results.json').read_text())
    lt = long_tail_counts(40, 10, 10)
    held = stratified_holdout_counts(lt, 0.25)
    assert results['dataset']['class_counts'] == [n - h for n, h in zip(lt, held)]
    assert results['dataset']['tune_fraction'] == 0.25
    argv = ['--evaluate', '--resume', str(tmp_path / 'frac' / 'last.pth.tar'), '--model', 'resnet20_cifar',
            '--data-dir', str(small_cifar), '--imb-ratio', '10', *DECOUPLE, '--workers', '0', '--output', str(tmp_path),
            '--post-hoc', 'logit_adjust']
    train_cmo.main(argv + ['--tune-fraction', '0.25', '--experiment', 'frac_eval'])
    record = json.loads((tmp_path / 'frac_eval' / 'results.json').read_text())['post_hoc']
    assert record['validation']['class_counts'] == held and 'held out of training' in record['validation']['source']
    code, err = main_exit(argv + ['--tune-fraction', '0.3', '--experiment', 'frac_bad'], capsys)
    assert code == 2 and '--tune-fraction 0.25 in training, 0.3 here' in err and not (tmp_path / 'frac_bad').exists()


# --- --cuda-graph: the graph-safe step (its CPU stand-in here) trains the model the eager step trains ----------

CUDA_GRAPH_CASES = {
    'cmo-ldam-drw-head-norm-ema': LDAM_CMO,
    'remix-ros-ride-drw-keep-last': ['--model', 'ride_resnet20_cifar', '--loss', 'ride', '--reweight', 'drw',
                                     '--drw-epoch', '1', '--remix', '--ros', '--no-drop-last'],
    'mixup-cutmix-smoothing-ce-nesterov-clip': ['--mixup', '0.5', '--cutmix', '1.0', '--smoothing', '0.1',
                                                '--opt', 'sgd', '--clip-grad', '1.0', '--loss', 'ce'],
}


@pytest.mark.parametrize('case', list(CUDA_GRAPH_CASES))
def test_cuda_graph_run_equals_data_on_device_run(small_cifar, tmp_path, case, caplog):
    """``--data-on-device --cuda-graph`` (on the CPU the graph-safe step run eagerly: the epoch's draws made ahead,
    the device lr / DRW / EMA state, foreach SGD, fixed-size evaluation batches) and ``--data-on-device`` train
    the same model with crops and flips on: same losses, same evaluation, same weights to float round-off."""
    summaries, weights = {}, {}
    for path, extra in (('eager', []), ('graph', ['--cuda-graph'])):
        caplog.clear()
        with caplog.at_level('INFO'):
            train_cmo.main(base_argv(small_cifar, tmp_path, path, 2, '--device', 'cpu', '--data-on-device',
                                     '--validation-batch-size', '48', *CUDA_GRAPH_CASES[case], *extra))
        assert ('--cuda-graph: the graph-safe training step, run eagerly on cpu' in caplog.text) == (path == 'graph')
        rows = [row.split(',') for row in (tmp_path / path / 'summary.csv').read_text().strip().splitlines()]
        timed = rows[0].index('epoch_time_s')
        summaries[path] = [row[:timed] + row[timed + 1:] for row in rows]
        weights[path] = torch.load(tmp_path / path / 'last.pth.tar', map_location='cpu',
                                   weights_only=True)['state_dict']
    header, eager, graph = summaries['eager'][0], summaries['eager'][1:], summaries['graph'][1:]
    assert len(eager) == len(graph) == 2
    for a, b in zip(eager, graph):
        for name, u, v in zip(header, a, b):
            try:
                assert float(u) == pytest.approx(float(v), rel=1e-5, abs=1e-6), name
            except ValueError:
                assert u == v, name
    assert weights['eager'].keys() == weights['graph'].keys()
    for k, v in weights['eager'].items():
        torch.testing.assert_close(weights['graph'][k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize('extra, message', [
    ([], '--cuda-graph needs --data-on-device'),
    (['--data-on-device', '--grad-accum-steps', '2'], "--cuda-graph with --grad-accum-steps 2"),
    (['--data-on-device', '--reprob', '0.25'], "--cuda-graph with --reprob 0.25"),
    (['--data-on-device', '--opt', 'adamw'], "--cuda-graph with --opt 'adamw'"),
    (['--data-on-device', '--amp', '--amp-dtype', 'float16'], "--cuda-graph with --amp-dtype 'float16'"),
    (['--data-on-device', '--torchcompile'], '--cuda-graph with --torchcompile'),
    (['--data-on-device', '--loss', 'ib'], "--cuda-graph with --loss 'ib'"),
    (['--data-on-device', '--loss', 'bbn', '--model', 'bbn_resnet32_cifar'], "--cuda-graph with --loss 'bbn'"),
    (['--data-on-device', '--head', 'causal'], "--cuda-graph with --head 'causal'"),
    (['--data-on-device', '--clip-grad', '0.01', '--clip-mode', 'agc'], "--cuda-graph with --clip-mode 'agc'"),
])
def test_cuda_graph_refuses_what_it_cannot_graph(tmp_path, capsys, extra, message):
    """A path the graph-safe step cannot hold is refused before the data is read, the flag named."""
    code, err = main_exit(['--data-dir', str(tmp_path / 'no_such_data'), '--train-crop-mode', 'pad',
                           '--color-jitter', '0', '--cuda-graph', *extra], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / 'no_such_data').exists()


def test_cuda_graph_run_killed_and_resumed_equals_uninterrupted(small_cifar, tmp_path):
    """A --cuda-graph run (CMO, LDAM-DRW, EMA) SIGKILLed after its first checkpoint and resumed with --cuda-graph
    trains the uninterrupted run's weights, EMA weights and momentum buffers bit for bit (the graph-safe step
    takes over the checkpoint's momentum buffers; the DRW switch and the lr follow the resumed epoch)."""
    graph = ['--data-on-device', '--device', 'cpu', '--cuda-graph', *LDAM_CMO]
    train_cmo.main(base_argv(small_cifar, tmp_path, 'whole', 3, *graph))
    argv = base_argv(small_cifar, tmp_path, 'killed', 3, *graph)
    last = kill_after_first_checkpoint(argv, tmp_path / 'killed')
    assert torch.load(last, map_location='cpu', weights_only=True)['epoch'] < 2
    done = run_script(argv + ['--resume', str(last)])
    assert done.returncode == 0, done.stderr[-4000:]
    resumed = torch.load(last, map_location='cpu', weights_only=True)
    reference = torch.load(tmp_path / 'whole' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert resumed['epoch'] == reference['epoch'] == 2
    assert_same_training_state(reference, resumed)
