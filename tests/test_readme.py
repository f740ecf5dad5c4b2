"""The README's "Use the pieces" snippet runs as written on a machine without CUDA (one epoch, a small subset)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_snippet(index: int = 0) -> str:
    """The ``index``-th Python block of the README's "Use the pieces" section."""
    text = (REPO / 'README.md').read_text()
    section = text[text.index('## Use the pieces'):text.index('## Checkpoints and the Hub')]
    return re.findall(r'```python\n(.*?)```', section, re.S)[index]


def run_snippet(code: str, cifar10_dir, tmp_path, replacements=(), tail: str = '', timeout: float = 600) -> str:
    """Run README code on a small subset for one epoch (the data path, ``imb_max=100`` and ``epochs = 1`` put in,
    then ``replacements``; each text replaced must be in the code: the snippet still reads as documented), with
    ``tail`` appended, in a one-thread CPU process; asserts it exits 0 and returns its stdout."""
    for old, new in (("'../shared/data/cifar10/train.tar'", repr(str(cifar10_dir / 'train.tar'))),
                     ('imb_ratio=100)', 'imb_ratio=100, imb_max=100)'), ('epochs = 200', 'epochs = 1'),
                     *replacements):
        assert old in code, old
        code = code.replace(old, new)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-c', code + tail], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# the snippet as written, and with a RIDE model and loss (its expert training output switched on by the snippet)
VARIANTS = {'as-written': (), 'ride': (("'resnet32_cifar'", "'ride_resnet20_cifar'"), ("'ldam'", "'ride'"))}


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_use_the_pieces_snippet_runs_on_cpu(cifar10_dir, tmp_path, variant):
    stdout = run_snippet(readme_snippet(), cifar10_dir, tmp_path, VARIANTS[variant],
                         "\nprint('experts', getattr(model, 'expert_training', None))"
                         "\nprint('device', loader.device, 'loss', float(loss), 'mixed', loader.mix_info is not None)\n")
    *_, experts, line = (row.split() for row in stdout.strip().splitlines())
    assert line[:2] == ['device', 'cpu'] and float(line[3]) == float(line[3]) and line[-1] == 'True'
    assert experts == ['experts', 'True' if variant == 'ride' else 'None']


def test_bbn_snippet_runs_on_cpu(cifar10_dir, tmp_path):
    """The README's BBN loop, after the first snippet's dataset (one epoch each, a small subset): the loader's dual
    batch has the batch's size, and alpha is 1 in epoch 0."""
    stdout = run_snippet(readme_snippet() + readme_snippet(1), cifar10_dir, tmp_path, (),
                         "\nprint('dual', len(dual.y) == len(x), tuple(dual.x.shape[1:]), 'alpha', loss_fn.alpha, "
                         "'loss', float(loss))\n", timeout=900)
    line = stdout.strip().splitlines()[-1]
    assert line.startswith('dual True (3, 32, 32) alpha 1.0 loss '), line
    assert float(line.split()[-1]) == float(line.split()[-1])  # finite, not NaN
