"""Shared fixtures: the real CIFAR-10 JPEG copy (train.tar / test.tar) kept beside the repository."""
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
