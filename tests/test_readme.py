"""The README's "Use the pieces" snippet runs as written on a machine without CUDA (one epoch, a small subset)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_snippet() -> str:
    text = (REPO / 'README.md').read_text()
    section = text[text.index('## Use the pieces'):]
    return re.search(r'```python\n(.*?)```', section, re.S).group(1)


# the snippet as written, and with a RIDE model and loss (its expert training output switched on by the snippet)
VARIANTS = {'as-written': (), 'ride': (("'resnet32_cifar'", "'ride_resnet20_cifar'"), ("'ldam'", "'ride'"))}


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_use_the_pieces_snippet_runs_on_cpu(cifar10_dir, tmp_path, variant):
    code = readme_snippet()
    for old, new in (("'../shared/data/cifar10/train.tar'", repr(str(cifar10_dir / 'train.tar'))),
                     ('imb_ratio=100)', 'imb_ratio=100, imb_max=100)'), ('epochs = 200', 'epochs = 1'),
                     *VARIANTS[variant]):
        assert old in code, old  # the snippet still reads as documented
        code = code.replace(old, new)
    code += ("\nprint('experts', getattr(model, 'expert_training', None))"
             "\nprint('device', loader.device, 'loss', float(loss), 'mixed', loader.mix_info is not None)\n")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *_, experts, line = (row.split() for row in proc.stdout.strip().splitlines())
    assert line[:2] == ['device', 'cpu'] and float(line[3]) == float(line[3]) and line[-1] == 'True'
    assert experts == ['experts', 'True' if variant == 'ride' else 'None']
