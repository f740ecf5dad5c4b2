"""Shared fixtures: the real CIFAR-10 JPEG copy (train.tar / test.tar) kept beside the repository."""
import glob
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def find_cifar10() -> Path:
    """The folder with CIFAR-10 ``train.tar``/``test.tar``: $TIMM_CMO_CIFAR10 or ``shared/data/cifar10``
    in a folder above the repository (``../shared/data/cifar10`` on the project machines)."""
    env = os.environ.get('TIMM_CMO_CIFAR10')
    candidates = [Path(env)] if env else [p / 'shared' / 'data' / 'cifar10' for p in REPO.parents]
    for c in candidates:
        if (c / 'train.tar').is_file() and (c / 'test.tar').is_file():
            return c
    raise FileNotFoundError(
        'The CIFAR-10 tars were not found: set TIMM_CMO_CIFAR10 to the folder holding train.tar and test.tar '
        f'(looked in {", ".join(str(c) for c in candidates)})')


@pytest.fixture(scope='session')
def cifar10_dir() -> Path:
    return find_cifar10()


@pytest.fixture(scope='session')
def cifar10_train_full(cifar10_dir):
    """The whole CIFAR-10 training tar as a LongTailDataset (no subsampling)."""
    from timm_cmo.data import create_lt_dataset
    return create_lt_dataset('', str(cifar10_dir / 'train.tar'))


# --- readers of the experiment loggers' files (tests/test_loggers.py, tests/test_train_cmo.py) ---------------------

def _read_tensorboard(log_dir):
    """{tag: [(step, value), ...]} of every event file under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


def _read_wandb_run(run_dir, timeout=120.):
    """The records of the offline run under ``<run_dir>/wandb``: (run record, [history dicts]).

    wandb's service may still be writing the file when ``finish()`` returns in this process: it is read again
    until it holds the run's exit record (or ``timeout`` seconds pass).
    """
    import time
    (path,) = glob.glob(str(run_dir / 'wandb' / 'offline-run-*' / 'run-*.wandb'))
    deadline = time.time() + timeout
    while True:
        run, history, exited = _read_wandb_records(path)
        if exited or time.time() > deadline:
            return run, history
        time.sleep(0.5)


def _read_wandb_records(path):
    """(run record, [history dicts], whether the exit record is there) of a ``.wandb`` file.

    The ``.wandb`` file is a LevelDB-style log (7-byte header ``:W&B`` + magic + version, 32 KiB blocks of chunks
    with a 7-byte header: crc32c, length, type FULL/FIRST/MIDDLE/LAST) of wandb's protobuf ``Record``s.
    """
    from wandb.proto import wandb_internal_pb2 as pb
    data = open(path, 'rb').read()
    assert data[:4] == b':W&B'
    pos, block, chunks, pending = 7, 32768, [], b''
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], 'little'), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
    run, history, exited = None, [], False
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        if record.WhichOneof('record_type') == 'run':
            run = record.run
        elif record.WhichOneof('record_type') == 'exit':
            exited = True
        elif record.WhichOneof('record_type') == 'history':
            history.append({item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    return run, history, exited



@pytest.fixture
def read_tensorboard():
    """``read_tensorboard(log_dir) -> {tag: [(step, value), ...]}``."""
    return _read_tensorboard


@pytest.fixture
def read_wandb_run():
    """``read_wandb_run(run_dir) -> (run record, [history dicts])`` of an offline wandb run."""
    return _read_wandb_run
