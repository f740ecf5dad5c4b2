"""bench/reproduce_cifar.py: recipes and commands of second stages, and the order runs start in."""
import argparse
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / 'bench'))
import reproduce_cifar  # noqa: E402


def driver_args(out, **kw):
    return argparse.Namespace(**dict(dict(rho=100, out=str(out), dataset='', data_dir='/data', imb_max=1000,
                                          extra=['--', '--device', 'cpu']), **kw))


def test_second_stage_commands(tmp_path):
    assert reproduce_cifar.stage1_of('ce_drw_cmo_las') == 'ce_drw_cmo'
    assert reproduce_cifar.stage1_of('ride_cmo_router') == 'ride_cmo'
    assert reproduce_cifar.stage1_of('ce_cmo_crt') == 'ce_cmo' and reproduce_cifar.stage1_of('ce_lws') == 'ce'
    cmd, _ = reproduce_cifar.command(driver_args(tmp_path), 'ce_cmo_crt', 0)
    assert cmd[cmd.index('-c') + 1].endswith('hparams/cifar10_lt_r100_ce_cmo_crt.yaml')
    assert cmd[cmd.index('--initial-checkpoint') + 1] == str(tmp_path / 'ce_cmo-s0' / 'last.pth.tar')
    assert reproduce_cifar.stage1_of('ce_drw_cmo') is None
    args = driver_args(tmp_path)
    cmd, run_dir = reproduce_cifar.command(args, 'ce_drw_cmo_las', 1)
    assert cmd[cmd.index('-c') + 1].endswith('hparams/cifar10_lt_r100_ce_drw_cmo_las.yaml')
    assert cmd[cmd.index('--initial-checkpoint') + 1] == str(tmp_path / 'ce_drw_cmo-s1' / 'last.pth.tar')
    assert run_dir == tmp_path / 'ce_drw_cmo_las-s1' and '--resume' not in cmd and cmd[-2:] == ['--device', 'cpu']
    cmd, _ = reproduce_cifar.command(driver_args(tmp_path, rho=50), 'ride_router', 0)
    assert cmd[cmd.index('-c') + 1].endswith('hparams/cifar10_lt_ride_router.yaml')
    assert cmd[cmd.index('--imb-ratio') + 1] == '50'
    assert cmd[cmd.index('--initial-checkpoint') + 1] == str(tmp_path / 'ride-s0' / 'last.pth.tar')
    with pytest.raises(SystemExit, match='No recipe .*cifar10_lt_r100_ldam_drw_cmo_las.yaml'):
        reproduce_cifar.command(args, 'ldam_drw_cmo_las', 0)


def fake_commands(monkeypatch, log: Path, fail=()):
    """Each 'run' appends its name to ``log`` and writes results.json, or exits 1 for the names in ``fail``."""
    def command(args, method, seed):
        run_dir = Path(args.out) / reproduce_cifar.run_name(method, seed)
        name = run_dir.name
        code = (f'import pathlib, sys; open({str(log)!r}, "a").write({name!r} + "\\n"); '
                + ('sys.exit(1)' if name in fail else
                   f'd = pathlib.Path({str(run_dir)!r}); d.mkdir(parents=True, exist_ok=True); '
                   f'(d / "results.json").write_text("{{}}")'))
        return [sys.executable, '-c', code], run_dir
    monkeypatch.setattr(reproduce_cifar, 'command', command)
    monkeypatch.setattr(reproduce_cifar, 'POLL_S', 0.05)


def test_second_stages_wait_for_their_stage1(tmp_path, monkeypatch, capsys):
    log = tmp_path / 'order.txt'
    fake_commands(monkeypatch, log, fail={'ride-s0'})
    out = tmp_path / 'runs'
    with pytest.raises(SystemExit) as e:
        reproduce_cifar.main(['--data-dir', '/data', '--out', str(out), '--methods', 'ce_drw_cmo_las', 'ride_router',
                              'ce_drw_cmo', 'ride', '--parallel', '2'])
    started = log.read_text().split()
    # LAS waits for its stage 1 even though it is listed first; the router of the failed RIDE run never starts
    assert started.index('ce_drw_cmo-s0') < started.index('ce_drw_cmo_las-s0')
    assert sorted(started) == ['ce_drw_cmo-s0', 'ce_drw_cmo_las-s0', 'ride-s0']
    assert (out / 'ce_drw_cmo_las-s0' / 'results.json').is_file()
    assert "'ride-s0'" in str(e.value) and "'ride_router-s0'" in str(e.value)
    assert 'not run: ride_router-s0 (its stage-1 run ride-s0 failed)' in capsys.readouterr().out
    # restarted: finished runs are skipped, a finished stage 1 lets its second stage start alone
    log.unlink()
    fake_commands(monkeypatch, log)
    reproduce_cifar.main(['--data-dir', '/data', '--out', str(out), '--methods', 'ce_drw_cmo', 'ce_drw_cmo_las',
                          'ride', 'ride_router', '--parallel', '1'])
    assert log.read_text().split() == ['ride-s0', 'ride_router-s0']


def test_second_stage_without_its_stage1_is_refused(tmp_path, monkeypatch):
    fake_commands(monkeypatch, tmp_path / 'order.txt')
    with pytest.raises(SystemExit, match='ce_drw_cmo_las-s0 starts from ce_drw_cmo-s0, which has not finished'):
        reproduce_cifar.main(['--data-dir', '/data', '--out', str(tmp_path / 'runs'), '--methods', 'ce_drw_cmo_las'])
    assert not (tmp_path / 'order.txt').exists()


def test_restart_after_a_run_stopped_before_its_first_checkpoint(tmp_path, monkeypatch, capsys):
    """Such a run leaves args.yaml and a log but no last.pth.tar; train_cmo.py would refuse that folder, so the driver
    keeps it aside and starts afresh, while a run with a checkpoint stays in place to resume."""
    out = tmp_path / 'runs'
    stopped, resumable = out / 'ce-s0', out / 'ce_cmo-s0'
    for run in (stopped, resumable):
        run.mkdir(parents=True)
        (run / 'args.yaml').write_text('seed: 0\n')
    (resumable / 'last.pth.tar').write_bytes(b'checkpoint')
    log = tmp_path / 'order.txt'
    fake_commands(monkeypatch, log)
    reproduce_cifar.main(['--data-dir', '/data', '--out', str(out), '--methods', 'ce', 'ce_cmo', '--parallel', '1'])
    assert sorted(log.read_text().split()) == ['ce-s0', 'ce_cmo-s0']
    kept = list(out.glob('ce-s0.stopped-*'))
    assert len(kept) == 1 and (kept[0] / 'args.yaml').read_text() == 'seed: 0\n'
    assert (stopped / 'results.json').is_file() and not (stopped / 'args.yaml').exists()
    assert (resumable / 'last.pth.tar').read_bytes() == b'checkpoint' and not list(out.glob('ce_cmo-s0.stopped-*'))
    assert f'its folder is kept as {kept[0].name}' in capsys.readouterr().out


def test_mixing_baselines_run_by_method_name(tmp_path):
    """The Table 9 / Table 12 rows (CE + CutMix, CE + Mixup, CE + CMO's variants) are methods of the driver: their
    recipes exist and their commands parse to the mixing they name; summarize_runs labels them as variants of CE."""
    import train_cmo
    import summarize_runs
    expected = {'ce_cutmix': dict(cutmix=1.0, mixup=0.0, mixup_prob=0.5, mixup_off_epoch=197, cmo=False),
                'ce_mixup': dict(mixup=1.0, cutmix=0.0, mixup_prob=1.0, mixup_off_epoch=0, cmo=False),
                'ce_cmo_mixup': dict(cmo=True, cmo_variant='mixup', mixup=0.0, cutmix=0.0),
                'ce_cmo_blur': dict(cmo=True, cmo_variant='blur', cmo_prob=0.5, cmo_r=1.0),
                'ce_cmo_jitter': dict(cmo=True, cmo_variant='jitter', cmo_prob=0.5, cmo_r=1.0)}
    labels = {'ce_cutmix': 'CE + CutMix', 'ce_mixup': 'CE + Mixup', 'ce_cmo_mixup': 'CE + CMO (mixup)',
              'ce_cmo_blur': 'CE + CMO (blur)', 'ce_cmo_jitter': 'CE + CMO (jitter)'}
    for method, flags in expected.items():
        cmd, run_dir = reproduce_cifar.command(driver_args(tmp_path), method, 0)
        assert cmd[cmd.index('-c') + 1].endswith(f'hparams/cifar10_lt_r100_{method}.yaml')
        args, _ = train_cmo.parse_args(cmd[2:])
        assert {k: getattr(args, k) for k in flags} == flags, method
        assert args.loss == 'ce' and args.reweight == 'none' and args.imb_max == 1000
        assert summarize_runs.split(method) == ('ce', method[2:]) and summarize_runs.label(method) == labels[method]
