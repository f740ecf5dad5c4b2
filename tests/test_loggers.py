"""loggers.py: TensorBoard event files and wandb (offline) runs read back; failures at start and during a run."""
import argparse
import json
import logging
import sys

import pytest

from timm_cmo.loggers import LoggerStartError, RunLoggers, check_logger_packages, start_loggers

EVAL = dict(top1=41.5, top5=90.0, many=70.0, medium=40.0, few=None, head=80.0, middle=35.0, tail=float('nan'),
            ece=12.5, nll=1.7, samples=200)


def logger_args(**kwargs):
    base = dict(log_tensorboard=False, log_wandb=False, wandb_project=None, wandb_tags=[], wandb_resume_id='')
    return argparse.Namespace(**dict(base, **kwargs))


def test_tensorboard_event_files_read_back_and_a_resume_purges_redone_epochs(tmp_path, read_tensorboard):
    run = tmp_path / 'run'
    loggers = start_loggers(logger_args(log_tensorboard=True), str(run))
    loggers.log_epoch(0, 2.5, 0.02)
    loggers.log_epoch(1, 2.0, 0.04, EVAL)
    loggers.log_epoch(2, 1.5, 0.06, dict(EVAL, top1=50.0))
    loggers.close()
    scalars = read_tensorboard(run / 'tensorboard')
    assert scalars['train/loss'] == [(0, 2.5), (1, 2.0), (2, 1.5)]
    assert [s for s, _ in scalars['train/lr']] == [0, 1, 2] and scalars['train/lr'][2][1] == pytest.approx(0.06)
    assert scalars['eval/top1'] == [(1, 41.5), (2, 50.0)]
    for key in ('many', 'medium', 'head', 'middle', 'ece', 'top5', 'nll'):
        assert scalars[f'eval/{key}'][0] == (1, pytest.approx(EVAL[key])), key
    assert 'eval/few' not in scalars and 'eval/tail' not in scalars and 'eval/samples' not in scalars  # None, NaN

    resumed = start_loggers(logger_args(log_tensorboard=True), str(run), start_epoch=2)  # killed after epoch 1
    resumed.log_epoch(2, 1.25, 0.06, dict(EVAL, top1=55.0))
    resumed.close()
    scalars = read_tensorboard(run / 'tensorboard')
    assert scalars['train/loss'] == [(0, 2.5), (1, 2.0), (2, 1.25)] and scalars['eval/top1'][-1] == (2, 55.0)


def test_a_logger_failing_mid_run_is_dropped_with_a_warning(caplog):
    class Broken:
        name = 'broken'
        closed = False

        def log(self, epoch, metrics):
            raise OSError('disk full')

        def close(self):
            self.closed = True

    class Kept:
        name = 'kept'

        def __init__(self):
            self.seen = []

        def log(self, epoch, metrics):
            self.seen.append((epoch, metrics['train/loss']))

        def close(self):
            pass

    broken, kept = Broken(), Kept()
    loggers = RunLoggers([broken, kept])
    with caplog.at_level(logging.WARNING):
        loggers.log_epoch(0, 1.0, 0.1)
        loggers.log_epoch(1, 0.5, 0.1)
    assert kept.seen == [(0, 1.0), (1, 0.5)] and broken.closed and loggers.loggers == [kept]
    assert 'broken logging failed at epoch 0 (OSError: disk full); the run goes on' in caplog.text
    assert caplog.text.count('logging failed') == 1


def test_missing_package_and_unwritable_folder_fail_at_start(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'wandb', None)  # import wandb raises ImportError
    with pytest.raises(LoggerStartError, match=r'--log-wandb needs the .wandb. package .*pip install wandb'):
        check_logger_packages(False, True)
    monkeypatch.setitem(sys.modules, 'tensorboard', None)
    with pytest.raises(LoggerStartError, match=r'pip install -e "\.\[tensorboard\]"'):
        start_loggers(logger_args(log_tensorboard=True), str(tmp_path / 'run'))
    monkeypatch.delitem(sys.modules, 'tensorboard')
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    with pytest.raises(LoggerStartError, match='--log-tensorboard: cannot write event files to'):
        start_loggers(logger_args(log_tensorboard=True), str(blocker / 'run'))


def test_wandb_offline_run_reads_back(tmp_path, monkeypatch, read_wandb_run):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    run = tmp_path / 'exp-1'
    loggers = start_loggers(logger_args(log_wandb=True, wandb_project='lt', wandb_tags=['cmo', 'cifar'], lr=0.1),
                            str(run))
    loggers.log_epoch(0, 2.5, 0.02)
    loggers.log_epoch(1, 2.0, 0.04, EVAL)
    loggers.close()
    info, history = read_wandb_run(run)
    assert info.display_name == 'exp-1' and info.project == 'lt' and list(info.tags) == ['cmo', 'cifar']
    config = {item.key: json.loads(item.value_json) for item in info.config.update}
    assert config['lr'] == 0.1 or config['lr'] == {'value': 0.1}
    rows = [h for h in history if 'train/loss' in h]
    assert [(r['epoch'], r['train/loss']) for r in rows] == [(0, 2.5), (1, 2.0)]
    assert rows[1]['eval/top1'] == 41.5 and rows[1]['eval/many'] == 70.0 and rows[1]['eval/ece'] == 12.5
    assert 'eval/top1' not in rows[0] and 'eval/few' not in rows[1]
