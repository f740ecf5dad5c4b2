""" Shared pieces of the benchmark scripts: where the data is, what machine ran them, how figures are written. """
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def run_name(method: str, seed: int) -> str:
    """Folder name of one reproduction run: ``<method>-s<seed>``."""
    return f'{method}-s{seed}'


def default_data_dir() -> str:
    """$TIMM_CMO_CIFAR10, else ``shared/data/cifar10`` in a folder above the repository."""
    env = os.environ.get('TIMM_CMO_CIFAR10')
    if env:
        return env
    for p in REPO.parents:
        c = p / 'shared' / 'data' / 'cifar10'
        if (c / 'train.tar').is_file():
            return str(c)
    return str(REPO.parent / 'shared' / 'data' / 'cifar10')


# measured when a bench script starts (it imports this module first), before its own load adds to it
LOAD_AVG_AT_START = [round(v, 2) for v in os.getloadavg()]


def machine_info() -> Dict[str, Any]:
    """CPU model and cores (GPU name when there is one), versions, torch threads, load average."""
    import timm
    import torch

    import timm_cmo
    from timm_cmo.results import cpu_model
    info = dict(cpu=cpu_model(platform.processor() or platform.machine()), cores=os.cpu_count(), torch=torch.__version__, timm=timm.__version__,
                timm_cmo=timm_cmo.__version__, python=platform.python_version(), torch_threads=torch.get_num_threads(),
                load_avg_at_start=LOAD_AVG_AT_START)
    if torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name(0)
    return info


def report_header(script: str, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The command that produced a report, its date and the machine."""
    cli = sys.argv[1:] if argv is None else list(argv)
    command = ' '.join(['python', os.path.relpath(script, os.getcwd())] + [shlex.quote(a) for a in cli])
    return dict(command=command, date=datetime.date.today().isoformat(), machine=machine_info())


def write_json(path: str, results: Dict[str, Any]) -> None:
    """Write the figures atomically, with the load average at the end of the run."""
    from timm_cmo.files import write_text_atomic
    results['load_avg_at_end'] = [round(v, 2) for v in os.getloadavg()]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, json.dumps(results, indent=1))
