#!/usr/bin/env python3
""" One prepared GPU session: the GPU timings and the CIFAR-10-LT table in one command, inside a time budget.

A GPU machine is lent now and then, for about 15 minutes, and starts bare. This one entry point,
started in the repository root, does everything in order and never starts what the time left cannot
hold (each step is checked against the budget with its estimated seconds; measured ones once
step 1 has run):

  0  install  when a requirement of setup.py is missing (nothing otherwise): from ``shared/wheels`` if there
              is one (offline), else ``pip install -e ".[test]"``
     check    nvidia-smi and torch: the GPU, its memory, the versions
  1  timings  bench/mixing_cost.py; bench/train_speed.py: ordinary loader vs --data-on-device with CMO
              off/on (fp32), then --data-on-device + CMO with bf16 + channels-last, and also compiled;
              then several copies at once (is running several runs at once on the one GPU faster?)
  2  runs     train_cmo.py -c hparams/cifar10_lt_r<rho>_<method>.yaml --data-on-device ... for each method
              and seed (CE, CE + CMO first, then BS, LDAM-DRW with and without CMO, then second seeds),
              several at once when step 1 measured that to be faster in total
  3  summary  bench/summarize_runs.py (the RESULTS.md table rows) and the suite's summary table
  4  pack     gpu_suite.tar.gz, gpu_suite_summary.md, gpu_suite_log.txt (and gpu_suite_resume.tar.gz with
              the checkpoints of runs stopped at the deadline) under --out: the one thing to copy back

    python bench/gpu_suite.py --budget-s 540             # on the GPU machine; --out defaults to $OUT
    python bench/gpu_suite.py --plan-only                # what it would run, in order, with estimated seconds
    python bench/gpu_suite.py --device cpu --no-install --epochs 2 --imb-max 100 --methods ce ce_cmo \\
        --seeds 0 --timing-epochs 1                      # the dry mode (CI): every step, tiny, on the CPU

The full CIFAR-10 tars (92 MB) are larger than what travels to the GPU machine (64 MiB); make the
compact copy first (the rho=100 training images and the whole test set, 33 MiB; the runs on it see
the same images in the same order as on the full tars) and let ``shared/`` travel with the repository:

    python bench/gpu_suite.py --prepare-data shared/data/cifar10_lt_r100
"""
import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from common import REPO, run_name  # (also puts the repo on sys.path)

T0 = time.time()
# The paper's CIFAR-10-LT table (Park et al., CVPR 2022, Table 2), in its order: CE, CE-DRW, LDAM-DRW and RIDE, each
# as is, + ROS, + Remix and + CMO; BS and BS + CMO; then the second stages (CE-DRW + CMO + LAS, RIDE + EA: the
# expert-assignment router), which start from their stage-1 run of the same seed.
METHODS = ['ce', 'ce_ros', 'ce_remix', 'ce_cmo', 'ce_drw', 'ce_drw_ros', 'ce_drw_remix', 'ce_drw_cmo',
           'ldam_drw', 'ldam_drw_ros', 'ldam_drw_remix', 'ldam_drw_cmo', 'ride', 'ride_ros', 'ride_remix', 'ride_cmo',
           'bs', 'bs_cmo', 'ce_drw_cmo_las', 'ride_router']
VARIANTS = {  # name -> (train_cmo.py flags, train_speed.py flags)
    'fp32': ([], []),
    'bf16_cl': (['--amp', '--amp-dtype', 'bfloat16', '--channels-last'], ['--amp', '--channels-last']),
    'bf16_cl_compile': (['--amp', '--amp-dtype', 'bfloat16', '--channels-last', '--torchcompile'],
                        ['--amp', '--channels-last', '--compile', 'on']),
    # the graph-safe step (CUDA graphs on a GPU, its eager stand-in on the CPU), timed by bench/graph_step.py
    'bf16_cl_graph': (['--amp', '--amp-dtype', 'bfloat16', '--channels-last', '--cuda-graph'],
                      ['--amp', '--channels-last']),
    'fp32_graph': (['--cuda-graph'], []),
}
GRAPH_TWIN = {'bf16_cl_graph': 'bf16_cl', 'fp32_graph': 'fp32'}  # a graphed variant -> its eager step
BATCH = 128  # the recipes' batch size (train_speed.py's too)
COMPACT_NAME = 'cifar10_lt_r100'
WHEELS = REPO / 'shared' / 'wheels'  # wheels of requirements the GPU image may lack (it cannot download)
PER_CLASS, NUM_CLASSES, TEST_IMAGES = 5000, 10, 10000  # CIFAR-10
RESULT_FILES = ('results.json', 'summary.csv', 'args.yaml', 'per_class_accuracy.csv', 'per_class_accuracy.png',
                'train.log')
PACK_LIMIT = 15 * 2 ** 20  # each returned file stays under the device tool's 16 MiB

# A priori seconds, before anything is measured here (--estimates FILE gives a previous session's measurements).
GUESSES = {
    'cuda': dict(install_s=30., check_s=10., mixing_s=15., summary_s=15., pack_s=5., proc_start_s=8.,
                 decode_s_per_image=1e-4, ordinary_s_per_image=1e-4, compile_s=45., parallel_slope=0.4,
                 graph_check_s=40., graph_speed_s=60.,
                 s_per_image={'fp32': 4.5e-5, 'bf16_cl': 5e-5, 'bf16_cl_compile': 2.5e-5, 'bf16_cl_graph': 2.5e-5,
                              'fp32_graph': 4e-5}),
    'cpu': dict(install_s=60., check_s=10., mixing_s=20., summary_s=15., pack_s=3., proc_start_s=10.,
                decode_s_per_image=4e-4, ordinary_s_per_image=1e-2, compile_s=60., parallel_slope=1.0,
                graph_check_s=40., graph_speed_s=40.,
                s_per_image={'fp32': 8e-3, 'bf16_cl': 1e-2, 'bf16_cl_compile': 8e-3, 'bf16_cl_graph': 1e-2,
                             'fp32_graph': 8e-3}),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--budget-s', type=float, default=540., help='seconds for everything, install included')
    p.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    p.add_argument('--data-dir', default=None,
                   help='CIFAR-10 train.tar/test.tar (or train/test) folder; default: $TIMM_CMO_CIFAR10, else '
                        f'shared/data/{COMPACT_NAME} or shared/data/cifar10 in the repository or a folder above it')
    p.add_argument('--out', default=None, help='where the returned files go (default $OUT, else --work)')
    p.add_argument('--work', default=str(REPO / 'output' / 'gpu_suite'),
                   help='runs, checkpoints and results (the packed part is <work>/gpu_suite)')
    p.add_argument('--rho', type=int, default=100)
    p.add_argument('--imb-max', type=int, default=None, help='cap on the largest class (tiny dry mode)')
    p.add_argument('--epochs', type=int, default=200)
    p.add_argument('--methods', nargs='+', default=METHODS)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--eval-interval', type=int, default=10, help='evaluate every N epochs (and the last one)')
    p.add_argument('--variants', nargs='*', default=None, choices=list(VARIANTS),
                   help='speed settings timed in step 1 (default: all on cuda, fp32 on cpu)')
    p.add_argument('--run-variant', default='auto', choices=['auto'] + list(VARIANTS),
                   help='speed flags of the runs (auto: the fastest measured for a whole run)')
    p.add_argument('--parallel', type=int, default=0, help='runs at a time (0: chosen from step 1)')
    p.add_argument('--probe-parallel', type=int, default=None,
                   help='copies timed at once in step 1 (default 6 on cuda, 2 on cpu; <2: not measured)')
    p.add_argument('--timing-epochs', type=int, default=None, help='timed epochs per setting (default 2 cuda, 1 cpu)')
    p.add_argument('--workers', type=int, default=None, help='ordinary-loader workers timed (default 8 cuda, 0 cpu)')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads per process (default 2 cuda, 1 cpu)')
    p.add_argument('--margin', type=float, default=1.15, help='safety factor on every estimate')
    p.add_argument('--no-install', action='store_true', help='skip the install step')
    p.add_argument('--no-timings', action='store_true', help='skip step 1 (estimates from --estimates or guesses)')
    p.add_argument('--estimates', default=None, help="a previous session's measured.json (from gpu_suite.tar.gz)")
    p.add_argument('--resume-from', default=None, help="a previous session's gpu_suite_resume.tar.gz")
    p.add_argument('--plan-only', '--dry-run', action='store_true', dest='plan_only',
                   help='print the plan (steps, runs, estimated seconds) and stop')
    p.add_argument('--graph-steps', type=int, default=None,
                   help='steps timed per batch size by bench/graph_step.py (default 50 cuda, 2 cpu)')
    p.add_argument('--simulate-graph-mismatch', action='store_true',
                   help="make the graph-safe step's self-check fail (a test of the fallback to the eager step)")
    p.add_argument('--prepare-data', metavar='DEST', default=None,
                   help=f'write the compact data copy (e.g. shared/data/{COMPACT_NAME}) from --data-dir and stop')
    p.add_argument('--test-per-class', type=int, default=None, help='--prepare-data: keep N test images per class')
    p.add_argument('--imb-seed', type=int, default=0, help='--prepare-data: seed of the kept training images')
    args = p.parse_args(argv)
    cuda = args.device == 'cuda'
    if args.variants is None:
        args.variants = ['fp32', 'bf16_cl', 'bf16_cl_compile', 'bf16_cl_graph'] if cuda else ['fp32', 'fp32_graph']
    if args.graph_steps is None:
        args.graph_steps = 50 if cuda else 2
    if 'fp32' not in args.variants:
        args.variants = ['fp32'] + args.variants  # timed by the ordinary-vs-fast step anyway
    for name, default in (('probe_parallel', 6 if cuda else 2), ('timing_epochs', 2 if cuda else 1),
                          ('workers', 8 if cuda else 0), ('threads', 2 if cuda else 1)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.out is None:
        args.out = os.environ.get('OUT') or args.work
    return args


# --- data --------------------------------------------------------------------------------------

def find_data_dir(explicit: Optional[str] = None, full: bool = False) -> Optional[Path]:
    """--data-dir, else $TIMM_CMO_CIFAR10, else the compact copy or the full tars in ``shared/data`` of the
    repository (what travels to a GPU machine) or of a folder above it (``../shared`` here)."""
    if explicit:
        return Path(explicit)
    if os.environ.get('TIMM_CMO_CIFAR10'):
        return Path(os.environ['TIMM_CMO_CIFAR10'])
    names = ['cifar10'] if full else [COMPACT_NAME, 'cifar10']
    for base in [REPO] + list(REPO.parents):
        for name in names:
            c = base / 'shared' / 'data' / name
            if (c / 'train.tar').is_file() or (c / 'train').is_dir():
                return c
    return None


def show(path) -> str:
    """A path as the plan and the log print it: ``$OUT/...`` under the returned-files folder, relative to the
    repository when near it, else as given (no machine's home folder in the stored logs)."""
    path = os.path.abspath(path)
    if os.environ.get('OUT'):
        rel = os.path.relpath(path, os.path.abspath(os.environ['OUT']))
        if not rel.startswith('..'):
            return '$OUT' if rel == '.' else os.path.join('$OUT', rel)
    rel = os.path.relpath(path, REPO)
    return path if rel.startswith(os.path.join('..', '..')) else rel


def lt_counts(rho: float, imb_max: Optional[int], per_class: int = PER_CLASS, classes: int = NUM_CLASSES):
    """timm_cmo.data.long_tail_counts without importing torch (the plan needs no torch)."""
    n_max = min(per_class, imb_max) if imb_max else per_class
    return [int(n_max * (1. / rho) ** (i / (classes - 1.))) for i in range(classes)]


def read_manifest(data_dir: Optional[Path]) -> Dict[str, Any]:
    try:
        return json.loads((data_dir / 'manifest.json').read_text())
    except (OSError, TypeError, ValueError):
        return {}


def prepare_data(args) -> int:
    """Write the compact copy: train.tar with the long-tailed training images only, test.tar, manifest.json.

    The kept images are renamed ``<class>/<rank>_<original>.jpg`` so that the compact train.tar, made
    long-tailed again by train_cmo.py (same rho, seed and cap), yields the same images in the same order
    as the full train.tar: a seed trains on the same batches either way. Checked before it returns.
    """
    import hashlib

    import numpy as np

    from timm_cmo.data.dataset import create_lt_dataset, long_tail_indices
    src = find_data_dir(args.data_dir, full=True)
    if src is None or not (src / 'train.tar').is_file() or not (src / 'test.tar').is_file():
        raise SystemExit(f'--prepare-data needs the full CIFAR-10 train.tar and test.tar (--data-dir); got {src}')
    dest = Path(args.prepare_data)
    dest.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    full = create_lt_dataset('', str(src / 'train.tar'), imb_ratio=args.rho, imb_seed=args.imb_seed,
                             imb_max=args.imb_max)
    names = [full.filename(i) for i in range(len(full))]
    counts = [int(n) for n in full.class_counts]
    sub_targets = np.repeat(np.arange(len(counts)), counts)  # the compact tar sorts class by class
    order = long_tail_indices(sub_targets, counts, seed=args.imb_seed)  # its dataset index k -> sorted position
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    new_names = []
    for k, name in enumerate(names):
        c = int(full.targets[k])
        folder, base = os.path.split(name)
        new_names.append(f'{folder}/{int(order[k] - starts[c]):05d}_{base}')
    with tarfile.open(src / 'train.tar') as tf:
        members = {m.name: m for m in tf.getmembers() if m.isfile()}
        with tarfile.open(dest / 'train.tar.tmp', 'w', format=tarfile.USTAR_FORMAT) as out:
            for name, new in sorted(zip(names, new_names), key=lambda nn: nn[1]):
                info = tarfile.TarInfo(new)
                info.size, info.mtime, info.mode = members[name].size, members[name].mtime, 0o644
                out.addfile(info, tf.extractfile(members[name]))
    os.replace(dest / 'train.tar.tmp', dest / 'train.tar')
    test_counts = None
    if args.test_per_class:
        with tarfile.open(src / 'test.tar') as tf:
            files = sorted((m for m in tf.getmembers() if m.isfile()), key=lambda m: m.name)
            kept, seen = [], {}
            for m in files:
                cls = os.path.basename(os.path.dirname(m.name))
                if seen.get(cls, 0) < args.test_per_class:
                    seen[cls] = seen.get(cls, 0) + 1
                    kept.append(m)
            with tarfile.open(dest / 'test.tar.tmp', 'w', format=tarfile.USTAR_FORMAT) as out:
                for m in kept:
                    out.addfile(m, tf.extractfile(m))
        test_counts = [seen[c] for c in sorted(seen)]
        os.replace(dest / 'test.tar.tmp', dest / 'test.tar')
    else:
        shutil.copyfile(src / 'test.tar', dest / 'test.tar')
    # the check: the compact copy, made long-tailed as train_cmo.py does, is the same images in the same order
    again = create_lt_dataset('', str(dest / 'train.tar'), imb_ratio=args.rho, imb_seed=args.imb_seed,
                              imb_max=args.imb_max)
    got = [re.sub(r'/\d{5}_', '/', again.filename(i)) for i in range(len(again))]
    if got != names or list(again.targets) != list(full.targets):
        raise SystemExit(f'{dest}: the compact copy does not reproduce the long-tailed order of {src}')

    def sha(path):
        h = hashlib.sha256()
        with open(path, 'rb') as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                h.update(block)
        return h.hexdigest()

    manifest = dict(
        source=str(src), rho=args.rho, imb_seed=args.imb_seed, imb_max=args.imb_max, class_counts=counts,
        train_images=len(names), test_images=sum(test_counts) if test_counts else TEST_IMAGES,
        test_per_class=args.test_per_class, same_order_as_source=True,
        sha256={n: sha(dest / n) for n in ('train.tar', 'test.tar')},
        command=' '.join(['python', 'bench/gpu_suite.py'] + [shlex.quote(a) for a in sys.argv[1:]]))
    (dest / 'manifest.json').write_text(json.dumps(manifest, indent=1) + '\n')
    (dest / 'README.md').write_text(
        f'# CIFAR-10-LT rho={args.rho} (compact copy for bench/gpu_suite.py)\n\n'
        f'`train.tar`: the {len(names):,} training images that train_cmo.py keeps from the full CIFAR-10 '
        f'JPEG `train.tar` with `--imb-ratio {args.rho}{f" --imb-max {args.imb_max}" if args.imb_max else ""}` '
        f'(imb seed {args.imb_seed}), class counts {counts}, renamed `<class>/<rank>_<original>.jpg` so that '
        f'the same flags on this copy give the same images in the same order. `test.tar`: '
        f'{"the whole test set" if not test_counts else f"{args.test_per_class} test images per class"}. '
        f'Made by `{manifest["command"]}`; `manifest.json` records the rest.\n')
    size = sum((dest / n).stat().st_size for n in ('train.tar', 'test.tar'))
    print(f'wrote {dest}: {len(names)} training images {counts}, test {manifest["test_images"]}, '
          f'{size / 2 ** 20:.1f} MiB, order checked, {time.time() - t0:.0f}s')
    return 0


# --- the cost model ------------------------------------------------------------------------------

class CostModel:
    """Estimated seconds of each step: guesses, replaced by what step 1 (or --estimates) measured."""

    def __init__(self, device: str, n_train: int, n_test: int, measured: Optional[Dict[str, Any]] = None):
        self.device, self.n_train, self.n_test = device, n_train, n_test
        self.n_epoch = math.ceil(n_train / BATCH) * BATCH  # images a run's epoch trains (the last batch kept)
        self.n_speed = max(BATCH, n_train // BATCH * BATCH)  # train_speed.py drops the last batch
        self.g = json.loads(json.dumps(GUESSES[device]))
        self.m = measured or {}
        self.source = 'measured' if measured else 'guessed'

    # per-image figures: measured where there is a measurement
    def s_per_image(self, variant: str, p: int = 1) -> float:
        base = self.m.get('variants', {}).get(variant, {}).get('s_per_image') or self.g['s_per_image'][variant]
        return base * (1 + self.slope() * (max(1, p) - 1))

    def slope(self) -> float:
        par = self.m.get('parallel')
        return par['slope'] if par else self.g['parallel_slope']

    def startup_s(self, variant: str, p: int = 1) -> float:
        """Process start to the first training step of a run: imports, decoding train + test, compiling."""
        v = self.m.get('variants', {}).get(variant, {})
        start = self.m.get('proc_start_s', self.g['proc_start_s'])
        decode = self.m.get('decode_s_per_image', self.g['decode_s_per_image']) * (self.n_train + self.n_test)
        # train_cmo.py compiles the evaluation graph and the last, smaller batch too: 1.5x train_speed.py's
        compile_s = 1.5 * v['compile_s'] if 'compile_s' in v else (self.g['compile_s'] if 'compile' in variant else 0.)
        s = start + decode + compile_s
        par = self.m.get('parallel')
        if par and par.get('startup_factor') and p > 1:
            s *= 1 + (par['startup_factor'] - 1) * (p - 1) / max(1, par['p'] - 1)
        return s

    def step_s(self, name: str) -> Optional[float]:
        return self.m.get('step_s', {}).get(name)

    def fixed_s(self, name: str) -> float:
        got = self.step_s(name)
        return got if got is not None else self.g[f'{name}_s']

    def run_factor(self) -> float:
        """A run's seconds per epoch over train_speed.py's (train_cmo.py's own work around the same steps), the
        median over the finished runs of an earlier session (``runs.observed`` of its measured.json), each
        against its own variant; 1 without any. One factor for every variant: the variant that ran is not
        made to look slower than the ones that did not."""
        ratios = [o['s_per_epoch'] / (self.s_per_image(o['variant'], o['parallel']) * self.n_epoch)
                  for o in (self.m.get('runs') or {}).get('observed', [])
                  if o.get('variant') in VARIANTS and o.get('s_per_epoch')]
        return statistics.median(ratios) if ratios else 1.

    def run_s(self, variant: str, p: int, epochs: int, eval_interval: int) -> float:
        """One run of ``epochs`` epochs with ``p`` runs at once: start-up, training epochs, evaluations."""
        per_image = self.s_per_image(variant, p) * self.run_factor()
        evals = math.ceil(epochs / eval_interval) + 1
        return self.startup_s(variant, p) + epochs * self.n_epoch * per_image + evals * self.n_test * per_image / 3

    def timing_s(self, name: str, variant: str, epochs: int, probe: int = 1) -> float:
        got = self.step_s(name)
        if got is not None:
            return got
        start = self.g['proc_start_s'] + self.g['decode_s_per_image'] * self.n_train
        ep = (epochs + 1) * self.n_speed
        if name == 'speed_paths':
            return start + ep * 2 * (self.g['ordinary_s_per_image'] + 2 * self.s_per_image('fp32'))
        if name == 'probe':
            return (start + self.startup_s(variant) - self.g['proc_start_s']) * (1 + 0.1 * probe) \
                + ep * self.s_per_image(variant, probe)
        return start + (self.g['compile_s'] if 'compile' in variant else 0.) + ep * self.s_per_image(variant)


def simulate(n_runs: int, p: int, run_s, available: float, after: Optional[List[Optional[int]]] = None):
    """Start times of ``n_runs`` runs of ``run_s`` seconds each (one figure, or one per run), ``p`` at a time, in
    queue order; None where one would not finish. ``after[i]``: the index of the run that run i starts from (a
    second stage after its first stage: not before that one ends, never when that one does not run)."""
    durations = list(run_s) if isinstance(run_s, (list, tuple)) else [run_s] * n_runs
    slots = [0.] * p
    starts: List[Optional[float]] = []
    for k, d in enumerate(durations[:n_runs]):
        dep = after[k] if after else None
        if dep is not None and (dep >= len(starts) or starts[dep] is None):
            starts.append(None)
            continue
        i = min(range(p), key=lambda j: slots[j])
        start = max(slots[i], starts[dep] + durations[dep] if dep is not None else 0.)
        if start + d > available:
            starts.append(None)
            continue
        starts.append(start)
        slots[i] = start + d
    return starts


def choose_parallel(n_runs: int, p_max: int, cost_of_p, available: float,
                    after: Optional[List[Optional[int]]] = None) -> int:
    """The number of runs at a time that finishes the most runs inside ``available`` (then: sooner);
    ``cost_of_p(p)``: the seconds of one run, or of each run, with ``p`` at a time."""
    best = None
    for p in range(1, max(1, min(n_runs, p_max)) + 1):
        d = cost_of_p(p)
        durations = list(d) if isinstance(d, (list, tuple)) else [d] * n_runs
        starts = simulate(n_runs, p, durations, available, after)
        done = sum(s is not None for s in starts)
        end = max([s + e for s, e in zip(starts, durations) if s is not None] or [0.])
        key = (-done, end, p)
        if best is None or key < best[0]:
            best = (key, p)
    return best[1]


# --- processes ------------------------------------------------------------------------------------

ACTIVE: List[subprocess.Popen] = []  # the processes this suite started that may still run


def _die_with_parent() -> None:
    """In the child: get a Ctrl-C when the suite dies (Linux), so that no run outlives it on the GPU."""
    try:
        import ctypes
        ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def start_process(cmd: List[str], log_path: Path, env: Dict[str, str]) -> subprocess.Popen:
    """Start ``cmd`` in the repository root, in its own process group, output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, 'a')
    log.write(f'$ {" ".join(shlex.quote(c) for c in cmd)}\n')
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                            start_new_session=True, preexec_fn=_die_with_parent if sys.platform == 'linux' else None)
    proc.log_file = log
    ACTIVE.append(proc)
    return proc


def closed(proc: subprocess.Popen) -> Optional[int]:
    """The exit code of a finished process, its log closed."""
    proc.log_file.close()
    if proc in ACTIVE:
        ACTIVE.remove(proc)
    return proc.returncode


def stop_processes(procs: List[subprocess.Popen], grace: float = 15.) -> None:
    """Ctrl-C to each process's group (train_cmo.py keeps its last checkpoint), then kill what is left."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 5.)):
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        end = time.time() + wait
        while time.time() < end and any(p.poll() is None for p in procs):
            time.sleep(0.2)
    for proc in procs:
        closed(proc)


class Interrupted(Exception):
    """SIGTERM or Ctrl-C to the suite: stop the runs, summarise and pack what there is."""


def _interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def read_rows(path: Path) -> List[Dict[str, str]]:
    import csv
    try:
        with open(path) as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def tail(path: Path, n: int = 15) -> str:
    try:
        return '\n'.join(path.read_text(errors='replace').splitlines()[-n:])
    except OSError:
        return ''


# --- the suite ------------------------------------------------------------------------------------

class Suite:
    def __init__(self, args):
        self.args = args
        self.deadline = T0 + args.budget_s
        self.work = Path(args.work)
        self.pack_dir = self.work / 'gpu_suite'
        self.runs_dir = self.work / 'runs'
        self.data_dir = find_data_dir(args.data_dir)
        self.manifest = read_manifest(self.data_dir)
        counts = lt_counts(args.rho, args.imb_max)
        if self.manifest.get('class_counts') and self.manifest.get('rho') == args.rho and \
                self.manifest.get('imb_max') == args.imb_max:
            counts = self.manifest['class_counts']
        self.n_train = sum(counts)
        self.n_test = self.manifest.get('test_images', TEST_IMAGES)
        measured = None
        if args.estimates:
            measured = json.loads(Path(args.estimates).read_text())
        self.model = CostModel(args.device, self.n_train, self.n_test, measured)
        self.queue = [(m, s) for s in args.seeds for m in args.methods]  # CE, CE + CMO, ... then the next seed
        self.graph_ok: Optional[bool] = None  # the graph-safe step's self-check (None: not run)
        self.graph_note = ''
        self.steps: List[Dict[str, Any]] = []
        self.runs: Dict[str, Dict[str, Any]] = {}
        self.timings: Dict[str, Any] = {}
        self.measured: Dict[str, Any] = dict(device=args.device, n_train=self.n_train, n_test=self.n_test,
                                             step_s={}, variants={})
        self.machine: Dict[str, Any] = {}
        self.running: Dict[str, Dict[str, Any]] = {}  # the runs under way
        self.lines: List[str] = []
        self.failed = False
        self.env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                        PYTHONUNBUFFERED='1', PYTHONPATH=os.pathsep.join(
                            [str(REPO)] + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else [])))

    # -- bookkeeping
    def left(self) -> float:
        return self.deadline - time.time()

    def reserve(self) -> float:
        return self.model.fixed_s('summary') + self.model.fixed_s('pack')

    def log(self, msg: str = '') -> None:
        stamp = f'[{time.time() - T0:6.1f}s]'
        for line in msg.splitlines() or ['']:
            self.lines.append(f'{stamp} {line}')
            print(f'{stamp} {line}', flush=True)
        text = '\n'.join(f'{stamp} {line}' for line in msg.splitlines() or ['']) + '\n'
        for path in (self.pack_dir / 'log.txt', Path(self.args.out) / 'gpu_suite_log.txt'):  # as it goes: a
            try:  # suite killed from outside still leaves its log
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, 'a') as f:
                    f.write(text)
            except OSError:
                pass

    def record(self, step: str, title: str, est: Optional[float], status: str, seconds: float = 0.,
               note: str = '') -> None:
        note = ' / '.join(line.strip() for line in note.splitlines() if line.strip())
        est = None if est is None else est * self.args.margin
        self.steps.append(dict(step=step, title=title, est_s=None if est is None else round(est, 1), status=status,
                               seconds=round(seconds, 1), note=note))
        self.log(f'{step} {title}: {status}{f" in {seconds:.1f}s" if seconds else ""}'
                 f'{f" (est. {est:.0f}s)" if est is not None else ""}{f"; {note}" if note else ""}')
        if status == 'failed':
            self.failed = True
        try:
            (Path(self.args.out) / 'gpu_suite_summary.md').write_text(self.summary_md())
        except OSError:
            pass

    def fits(self, est: float) -> bool:
        return self.left() - self.reserve() >= est * self.args.margin

    def skip_note(self, est: float) -> str:
        return (f'needs ~{est * self.args.margin:.0f}s, {max(0., self.left() - self.reserve()):.0f}s left '
                f'before the {self.reserve():.0f}s kept for the summary and packing')

    # -- the plan
    def graph_variants(self) -> List[str]:
        return [v for v in self.args.variants if v in GRAPH_TWIN]

    def timing_plan(self, run_variant: str):
        a = self.args
        items = []
        graphed = self.graph_variants()
        if graphed:
            items.append(('graph_check', f'bench/graph_step.py: self-check of the graph-safe step ({graphed[0]}) '
                                         f'against the eager one, a few steps, same numbers (else: eager runs)',
                          graphed[0]))
        items.append(('mixing', 'bench/mixing_cost.py: CMO mixing vs one ResNet-32 step (CPU and GPU)', None))
        items.append(('speed_paths', 'bench/train_speed.py: ordinary loader vs --data-on-device, CMO off/on, fp32',
                      'fp32'))
        for v in a.variants:
            if v != 'fp32' and v not in GRAPH_TWIN:
                items.append((f'speed_{v}', f'bench/train_speed.py: --data-on-device, CMO on, {v}', v))
        for v in graphed:
            items.append(('graph_speed' if len(graphed) == 1 else f'graph_speed_{v}', f'bench/graph_step.py: ms per step (batch {BATCH} and the last, '
                                              f'smaller one), kernels per step, graph-safe vs eager ({v})', v))
        if a.probe_parallel >= 2 and a.parallel != 1:
            items.append(('probe', f'{a.probe_parallel} x bench/train_speed.py at once (--data-on-device, CMO on, '
                                   f'best variant): runs at a time', run_variant))
        return items

    def usable(self, variant: str) -> bool:
        """A graphed variant only once its self-check passed (before the check: planned as if it will)."""
        return variant not in GRAPH_TWIN or self.graph_ok is not False

    def plan_variant(self) -> str:
        if self.args.run_variant != 'auto':
            return self.args.run_variant
        measured = [v for v in self.measured['variants'] or self.model.m.get('variants', {})
                    if v in VARIANTS and self.usable(v)]
        if measured:
            return min(measured, key=lambda v: self.model.run_s(v, 1, self.args.epochs, self.args.eval_interval))
        if self.args.device == 'cuda':
            return 'bf16_cl_graph' if 'bf16_cl_graph' in self.args.variants and self.usable('bf16_cl_graph') \
                else 'bf16_cl'
        return 'fp32_graph' if 'fp32_graph' in self.args.variants and self.usable('fp32_graph') else 'fp32'

    def epochs_of(self, method: str) -> int:
        """A first stage trains --epochs; a second stage its recipe's epochs (at most --epochs)."""
        import reproduce_cifar
        if reproduce_cifar.stage1_of(method) is None:
            return self.args.epochs
        rargs = argparse.Namespace(rho=self.args.rho, dataset='')
        import yaml
        recipe = yaml.safe_load(reproduce_cifar.recipe_of(rargs, method).read_text())
        return min(int(recipe.get('epochs', self.args.epochs)), self.args.epochs)

    def flags_of(self, method: str, variant: str) -> List[str]:
        """The variant's train_cmo.py flags; a second stage trains without --cuda-graph (refused there)."""
        import reproduce_cifar
        flags = VARIANTS[variant][0]
        return [f for f in flags if f != '--cuda-graph'] if reproduce_cifar.stage1_of(method) else flags

    def plan_parallel(self, variant: str, available: float) -> int:
        a = self.args
        if a.parallel:
            return a.parallel
        measured_p = (self.model.m.get('parallel') or {}).get('p')
        p_max = measured_p or max(1, a.probe_parallel)
        return choose_parallel(len(self.queue), p_max, lambda p: self.queue_costs(variant, p), available,
                               self.queue_after())

    def run_cost(self, variant: str, p: int, epochs: Optional[int] = None) -> float:
        return self.model.run_s(variant, p, self.args.epochs if epochs is None else epochs, self.args.eval_interval)

    def queue_after(self) -> List[Optional[int]]:
        """For each queued run, the index of its stage-1 run in the queue (None: a first stage)."""
        import reproduce_cifar
        index = {ms: i for i, ms in enumerate(self.queue)}
        after = []
        for method, seed in self.queue:
            stage1 = reproduce_cifar.stage1_of(method)
            after.append(None if stage1 is None else index.get((stage1, seed), len(self.queue)))
        return after

    def queue_costs(self, variant: str, p: int) -> List[float]:
        """Each queued run's estimated seconds (a second stage: its own epochs, the eager step)."""
        costs = []
        for method, _ in self.queue:
            v = GRAPH_TWIN.get(variant, variant) if self.flags_of(method, variant) != VARIANTS[variant][0] else variant
            costs.append(self.run_cost(v, p, self.epochs_of(method)))
        return costs

    def plan_text(self, replan: bool = False) -> str:
        """The plan: each step with its estimated seconds (margin included) and the running total; the runs
        with their planned start and end. ``replan``: the runs part only, from now on, with the measured figures."""
        a, m = self.args, self.model
        variant = self.plan_variant()
        lines = [f'gpu_suite plan: device {a.device}, budget {a.budget_s:.0f}s, estimates {m.source}'
                 f'{f" ({a.estimates})" if a.estimates else ""} (seconds below include the x{a.margin:g} margin)',
                 f'data: {show(self.data_dir) if self.data_dir else "NOT FOUND"}'
                 f'{" (compact copy)" if self.manifest else ""}; CIFAR-10-LT rho={a.rho}'
                 f'{f" imb-max {a.imb_max}" if a.imb_max else ""}: {self.n_train:,} training images, '
                 f'{self.n_test:,} test images; {a.epochs} epochs, evaluation every {a.eval_interval}',
                 f'{"step":<5}{"name":<22}{"est. s":>8}{"at s":>8}  what']
        rows = []
        if replan:
            t = time.time() - T0
            lines[0] = f're-plan at {t:.0f}s of {a.budget_s:.0f}s with the figures measured so far ' \
                       f'(seconds include the x{a.margin:g} margin)'
            lines[1:2] = []
        else:
            t = 0.
            missing = [] if a.no_install else missing_requirements()
            install = 0. if a.no_install else (m.fixed_s('install') if missing else 2.)
            pip = ' '.join(show(c) if os.path.isabs(c) else c for c in install_command(missing)[3:])
            why = f'missing: {", ".join(missing)}' if missing else 'only when a requirement is missing'
            rows.append(('0', 'install', f'pip {pip} ({why})' if not a.no_install else 'skipped (--no-install)',
                         install))
            rows.append(('0', 'check', f'{"nvidia-smi, " if a.device == "cuda" else ""}torch, timm, timm_cmo: '
                                       f'the {"GPU" if a.device == "cuda" else "CPU"} and the versions',
                         m.fixed_s('check')))
            for name, title, v in self.timing_plan(variant):
                if not a.no_timings or name == 'graph_check':  # the self-check runs even with --no-timings
                    rows.append(('1', name, title, self.timing_est(name, v)))
        for step, name, title, est in rows:
            t += est * a.margin
            lines.append(f'{step:<5}{name:<22}{est * a.margin:>8.0f}{t:>8.0f}  {title}')
        reserve = self.reserve() * a.margin
        available = a.budget_s - t - reserve
        p = self.plan_parallel(variant, available / a.margin)
        costs = [c * a.margin for c in self.queue_costs(variant, p)]
        starts = simulate(len(self.queue), p, costs, available, self.queue_after())
        n_fit = sum(s is not None for s in starts)
        span = max([s + d for s, d in zip(starts, costs) if s is not None] or [0.])
        checked = ' if its self-check passes' if variant in GRAPH_TWIN and self.graph_ok is None else ''
        lines.append(f'{"2":<5}{"runs":<22}{span:>8.0f}{t + span:>8.0f}  {len(self.queue)} runs of {a.epochs} '
                     f'epochs (second stages: their own), {p} at a time, '
                     f'{" ".join(["--data-on-device"] + VARIANTS[variant][0])} ({variant}{checked}): {n_fit} fit')
        import reproduce_cifar
        for (method, seed), s, d in zip(self.queue, starts, costs):
            when = f'{t + s + d:>8.0f}  start at ~{t + s:.0f}s' if s is not None else \
                f'{"":>8}  skipped: would not finish inside the budget'
            stage1 = reproduce_cifar.stage1_of(method)
            recipe = reproduce_cifar.recipe_of(argparse.Namespace(rho=a.rho, dataset=''), method).name
            lines.append(f'{"":<5}  {run_name(method, seed):<20}{d:>8.0f}{when}  '
                         f'(hparams/{recipe}, seed {seed}'
                         f'{f", {self.epochs_of(method)} epochs from {run_name(stage1, seed)}" if stage1 else ""})')
        t += span
        for step, name, title in (('3', 'summary', 'bench/summarize_runs.py --copy-to: the RESULTS.md rows, '
                                                   'per-class PNGs; the summary table'),
                                  ('4', 'pack', f'{show(a.out)}/gpu_suite.tar.gz, gpu_suite_summary.md, '
                                                f'gpu_suite_log.txt (+ gpu_suite_resume.tar.gz)')):
            t += m.fixed_s(name) * a.margin
            lines.append(f'{step:<5}{name:<22}{m.fixed_s(name) * a.margin:>8.0f}{t:>8.0f}  {title}')
        lines.append(f'one run: start-up ~{m.startup_s(variant, p):.0f}s + {a.epochs} epochs x '
                     f'{m.s_per_image(variant, p) * m.n_epoch:.2f}s with {p} at a time '
                     f'({m.s_per_image(variant, 1) * m.n_epoch:.2f}s alone)'
                     + (f', x{m.run_factor():.2f} for train_cmo.py (its earlier runs)' if m.run_factor() != 1. else '')
                     + ' + evaluations'
                     + ('' if replan or a.no_timings else '; step 2 re-plans with what step 1 measures'))
        return '\n'.join(lines)

    # -- steps
    def step_install(self) -> None:
        if self.args.no_install:
            self.record('0', 'install', None, 'skipped', note='--no-install')
            return
        t = time.time()
        missing = missing_requirements()
        if not missing:
            self.record('0', 'install', None, 'done', time.time() - t,
                        'every requirement of setup.py is installed already: nothing to fetch')
            self.measured['step_s']['install'] = time.time() - t
            return
        cmd = install_command(missing)
        self.log(f'missing: {", ".join(missing)}; {" ".join(cmd)}')
        proc = start_process(cmd, self.pack_dir / 'logs' / 'install.log', self.env)
        rc = self.wait(proc, min(300., max(10., self.left() - self.reserve())))
        status = 'done' if rc == 0 else 'failed'
        self.measured['step_s']['install'] = time.time() - t
        self.record('0', 'install', None, status, time.time() - t,
                    '' if rc == 0 else f'pip exit {rc}: {tail(self.pack_dir / "logs" / "install.log", 3)}')

    def step_check(self) -> bool:
        t = time.time()
        if self.data_dir is None or not ((self.data_dir / 'train.tar').is_file() or (self.data_dir / 'train').is_dir()):
            self.record('0', 'check', None, 'failed', note=f'no CIFAR-10 data: {self.data_dir} (see --data-dir, '
                                                            f'--prepare-data)')
            return False
        if self.manifest and (self.manifest.get('rho') != self.args.rho or
                              (self.manifest.get('imb_max') or None) != (self.args.imb_max or None)):
            self.record('0', 'check', None, 'failed', note=f'{self.data_dir} is the compact copy for rho '
                                                            f'{self.manifest.get("rho")}, imb-max '
                                                            f'{self.manifest.get("imb_max")}: pass the full tars')
            return False
        if self.args.device == 'cuda' and shutil.which('nvidia-smi'):
            smi = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,memory.used,driver_version,'
                                  'clocks.sm,utilization.gpu', '--format=csv'], capture_output=True, text=True)
            self.log('nvidia-smi: ' + ' | '.join(smi.stdout.strip().splitlines()))
        try:
            proc = subprocess.run([sys.executable, '-c', CHECK_CODE, self.args.device], capture_output=True,
                                  text=True, cwd=str(REPO), env=self.env, timeout=max(60., self.left()))
        except subprocess.TimeoutExpired:
            self.record('0', 'check', None, 'failed', time.time() - t, 'torch did not answer within the time left')
            return False
        out = [line for line in proc.stdout.splitlines() if line.startswith('CHECK ')]
        info = json.loads(out[-1][6:]) if out else {}
        self.machine = info
        self.measured['machine'] = info
        self.measured['step_s']['check'] = time.time() - t
        if proc.returncode != 0 or not out:
            self.record('0', 'check', None, 'failed', time.time() - t,
                        f'{"no GPU: " if proc.returncode == 3 else ""}{proc.stderr.strip()[-400:] or info}')
            return False
        self.log('machine: ' + json.dumps(info))
        self.record('0', 'check', None, 'done', time.time() - t,
                    f'{info.get("gpu", "cpu")}, torch {info.get("torch")}, timm {info.get("timm")}')
        return True

    def wait(self, proc: subprocess.Popen, limit: float) -> Optional[int]:
        """Wait at most ``limit`` seconds; stop the process then (None)."""
        end = time.time() + limit
        while proc.poll() is None and time.time() < end:
            time.sleep(0.5)
        if proc.poll() is None:
            stop_processes([proc], grace=5.)
            return None
        return closed(proc)

    def timing_est(self, name: str, variant: Optional[str]) -> float:
        a, m = self.args, self.model
        if name == 'mixing':
            return m.fixed_s('mixing')
        if name.startswith('graph_'):
            got = m.step_s(name)
            return got if got is not None else m.g['graph_check_s' if name == 'graph_check' else 'graph_speed_s']
        return m.timing_s(name, variant, a.timing_epochs, a.probe_parallel)

    def graph_cmd(self, name: str, variant: str, out: Path) -> List[str]:
        """bench/graph_step.py: the self-check alone (``graph_check``) or the timings and kernel counts."""
        a = self.args
        cmd = [sys.executable, str(REPO / 'bench' / 'graph_step.py'), '--device', a.device, '--out', str(out),
               '--threads', str(a.threads)] + (['--amp', '--channels-last'] if 'bf16_cl' in variant else [])
        last = self.n_train % BATCH or BATCH
        if name == 'graph_check':
            return cmd + ['--check-steps', '4' if a.device == 'cuda' else '2', '--steps', '0',
                          '--batch-sizes', str(BATCH if a.device == 'cuda' else 32)] + \
                (['--simulate-mismatch'] if a.simulate_graph_mismatch else [])
        sizes = [BATCH, last] if last != BATCH else [BATCH]
        if a.device == 'cpu':  # the dry mode: small batches, a couple of steps
            sizes = [32, 8]
        return cmd + ['--check-steps', '0', '--kernels', '--steps', str(a.graph_steps), '--repeats',
                      '3' if a.device == 'cuda' else '1', '--batch-sizes'] + \
            [str(b) for b in sizes]

    def timing_cmd(self, name: str, variant: str, out: Path) -> List[str]:
        a = self.args
        if name.startswith('graph_'):
            return self.graph_cmd(name, variant, out)
        data = ['--data-dir', str(self.data_dir), '--imb-ratio', str(a.rho)] + (
            ['--imb-max', str(a.imb_max)] if a.imb_max else [])
        if name == 'mixing':
            cpu = ['--threads', '1', '--batch-size', '32', '--mix-iters', '20', '--step-iters', '5', '--warmup', '1',
                   '--no-cuda'] \
                if a.device == 'cpu' else ['--threads', '4', '--mix-iters', '100', '--step-iters', '10']
            return [sys.executable, str(REPO / 'bench' / 'mixing_cost.py')] + cpu + ['--out', str(out)]
        cmd = [sys.executable, str(REPO / 'bench' / 'train_speed.py')] + data + [
            '--epochs', str(a.timing_epochs), '--device', a.device, '--out', str(out)]
        if name == 'speed_paths':
            return cmd + ['--paths', 'ordinary', 'fast', '--cmo', 'off', 'on', '--threads', str(max(a.threads, 4) if
                          a.device == 'cuda' else a.threads), '--workers', str(a.workers)]
        return cmd + ['--paths', 'fast', '--cmo', 'on', '--threads', str(a.threads), '--workers', '0'] + \
            VARIANTS[variant][1]

    def step_timings(self) -> None:
        a = self.args
        tdir = self.pack_dir / 'timings'
        tdir.mkdir(parents=True, exist_ok=True)
        for name, title, variant in self.timing_plan(self.plan_variant()):
            if a.no_timings and name != 'graph_check':
                continue
            if name == 'probe':
                variant = self.plan_variant()  # the fastest one measured so far
                if variant in GRAPH_TWIN:  # train_speed.py times the eager step: the twin's parallel slope
                    variant = GRAPH_TWIN[variant]
                title = title.replace('best variant', variant)
            est = self.timing_est(name, variant)
            if not self.fits(est):
                self.record('1', name, est, 'skipped', note=self.skip_note(est))
                if name == 'graph_check':
                    self.graph_ok, self.graph_note = False, 'self-check not run (budget)'
                continue
            if name.startswith('graph_speed') and not self.graph_ok:
                self.record('1', name, est, 'skipped', note=f'the self-check did not pass: {self.graph_note}')
                continue
            if not name.startswith(('mixing', 'graph_')) and self.n_train < BATCH:
                self.record('1', name, est, 'skipped', note=f'{self.n_train} training images: train_speed.py needs '
                                                            f'one whole batch of {BATCH}')
                continue
            t = time.time()
            limit = min(max(3 * est, est + 60.), self.left() - self.reserve())
            if name == 'probe':
                status, note = self.probe(variant, est, limit, tdir)
            else:
                out = tdir / (f'{name}.json' if name.startswith('graph_') else
                              f'{"mixing_cost" if name == "mixing" else "train_speed_" + name[6:]}.json')
                proc = start_process(self.timing_cmd(name, variant, out), self.pack_dir / 'logs' / f'{name}.log',
                                     self.env)
                rc = self.wait(proc, limit)
                status = 'done' if rc == 0 and out.is_file() else ('stopped' if rc is None else 'failed')
                note = '' if status == 'done' else (f'stopped at its {limit:.0f}s limit' if rc is None else
                                                    f'exit {rc}: {tail(self.pack_dir / "logs" / f"{name}.log", 3)}')
                if name == 'graph_check':
                    status, note = self.take_graph_check(rc, out, status, note)
                elif status == 'done':
                    note = self.take_timing(name, variant, json.loads(out.read_text()), time.time() - t)
            self.measured['step_s'][name] = time.time() - t
            self.record('1', name, est, status, time.time() - t, note)
            self.model = CostModel(a.device, self.n_train, self.n_test, self.merged_measurements())

    def merged_measurements(self) -> Dict[str, Any]:
        """This session's measurements over --estimates' ones."""
        base = json.loads(json.dumps(self.model.m)) if self.model.m else {}
        for key, value in self.measured.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key].update(value)
            elif value:
                base[key] = value
        return base

    def take_graph_check(self, rc: Optional[int], out: Path, status: str, note: str):
        """The self-check's verdict: the graphed variants are used only when it passed; a failed check is not a
        failed suite (the runs fall back to the eager step, the window is not lost)."""
        rep = json.loads(out.read_text()) if out.is_file() else {}
        check = rep.get('check') or {}
        self.timings['graph_check'] = rep
        if rc == 0 and check.get('ok'):
            self.graph_ok = True
            self.graph_note = (f'graph-safe = eager over {check["steps"]} steps x {check["epochs"]} epochs '
                               f'({"CUDA graphs" if check.get("captured") else "the eager CPU stand-in"}), largest '
                               f'weight difference {check["max_abs_diff"]:.3g}')
            return 'done', self.graph_note
        self.graph_ok = False
        why = (f'weights differ (largest {check.get("max_abs_diff", float("nan")):.3g}, '
               f'{", ".join(check.get("differing", [])[:3])})' if check else note or f'exit {rc}')
        self.graph_note = f'{why}: falling back to the eager step'
        self.log(f'graph-safe step self-check failed: {why}; the runs use the eager step')
        return 'fallback', self.graph_note

    def take_timing(self, name: str, variant: str, rep: Dict[str, Any], wall: float) -> str:
        if name.startswith('graph_speed'):
            self.timings[name] = rep
            rows = rep.get('rows') or []
            if not rows:
                return 'no rows'
            full = rows[0]
            twin = self.measured['variants'].get(GRAPH_TWIN[variant], {})
            ratio = full['graphed_ms'] / full['eager_ms']
            # train_speed.py's figure of the eager twin, scaled by the measured graphed / eager ratio of a step
            per_image = twin['s_per_image'] * ratio if twin.get('s_per_image') else \
                full['graphed_ms'] / 1e3 / full['batch_size']
            v = dict(s_per_image=per_image, s_per_epoch=per_image * self.model.n_epoch, step_ratio=ratio)
            if twin.get('bare_startup_s'):
                v['bare_startup_s'] = twin['bare_startup_s']
            self.measured['variants'][variant] = v
            unit = rep.get('kernels_unit', 'kernels')
            return '; '.join(f'batch {r["batch_size"]}: {r["eager_ms"]:.2f} -> {r["graphed_ms"]:.2f} ms/step '
                             f'({r["speedup"]:.2f}x)' + (f', {r["eager_kernels"]:.0f} -> {r["graphed_kernels"]:.0f} '
                                                          f'{unit}/step' if 'eager_kernels' in r else '')
                             for r in rows)
        if name == 'mixing':
            self.timings['mixing'] = rep
            devs = rep.get('devices', {})
            return '; '.join(f'{k}: mixing {100 * v["ratio_mixed_batch"]:.2f}% of a {v["train_step_ms"]:.1f} ms step'
                             for k, v in devs.items())
        self.timings[name] = rep
        rows = {(r['path'], r['cmo']): r for r in rep['rows']}
        fast = rows.get(('fast', 'on'))
        if not fast:
            return 'no --data-on-device row'
        epochs_total = sum(sum(r['epochs_s']) for r in rep['rows'])
        per_image = 1. / fast['images_per_s']
        decode = (rep.get('decode_s') or 0.) / max(1, rep['train_images'])
        proc_start = max(1., wall - epochs_total - (rep.get('decode_s') or 0.))
        v = dict(s_per_image=per_image, s_per_epoch=per_image * self.model.n_epoch,
                 bare_startup_s=max(1., wall - epochs_total))  # imports, decoding, model: all but the epochs
        if 'compile' in variant:
            v['compile_s'] = max(0., fast['epochs_s'][0] - fast['s_per_epoch'])
        self.measured['variants'][variant] = v
        self.measured['decode_s_per_image'] = decode
        self.measured['proc_start_s'] = proc_start
        if ('ordinary', 'on') in rows:
            self.measured['ordinary_s_per_image'] = 1. / rows[('ordinary', 'on')]['images_per_s']
        return ', '.join(f'{r["path"]}/cmo {r["cmo"]}: {r["s_per_epoch"]:.2f}s/epoch, {r["images_per_s"]:.0f} img/s'
                         for r in rep['rows'])

    def probe(self, variant: str, est: float, limit: float, tdir: Path):
        """``probe_parallel`` copies of train_speed.py at once: the per-epoch time with that many runs on the GPU."""
        n = self.args.probe_parallel
        procs, outs = [], []
        t = time.time()
        for i in range(n):
            out = tdir / f'train_speed_parallel{n}_{i}.json'
            outs.append(out)
            procs.append(start_process(self.timing_cmd('probe', variant, out), self.pack_dir / 'logs' /
                                       f'probe_{i}.log', self.env))
        ends = [None] * n
        end = time.time() + limit
        while time.time() < end and any(p.poll() is None for p in procs):
            time.sleep(0.5)
            for i, p in enumerate(procs):
                if ends[i] is None and p.poll() is not None:
                    ends[i] = time.time()
        rcs = [None if p.poll() is None else closed(p) for p in procs]
        stop_processes([p for p, rc in zip(procs, rcs) if rc is None], grace=5.)
        if any(rc is None for rc in rcs):
            return 'stopped', f'stopped at its {limit:.0f}s limit'
        if any(rc != 0 or not o.is_file() for rc, o in zip(rcs, outs)):
            return 'failed', f'exit codes {rcs}: {tail(self.pack_dir / "logs" / "probe_0.log", 3)}'
        reps = [json.loads(o.read_text()) for o in outs]
        per_image = statistics.median(1. / r['rows'][0]['images_per_s'] for r in reps)
        walls = [e - t for e in ends if e is not None]
        epochs = [sum(r['rows'][0]['epochs_s']) for r in reps]
        startup_p = statistics.median(w - e for w, e in zip(walls, epochs))
        alone = self.model.s_per_image(variant, 1)
        slope = max(0., (per_image / alone - 1) / (n - 1))
        startup_1 = self.model.m.get('variants', {}).get(variant, {}).get('bare_startup_s') or startup_p
        self.measured['parallel'] = dict(variant=variant, p=n, s_per_image=per_image, slope=slope,
                                         startup_factor=max(1., startup_p / max(1., startup_1)))
        self.timings['probe'] = dict(variant=variant, p=n, reports=reps)
        n_epoch = self.model.n_epoch
        return 'done', (f'{n} at once: {per_image * n_epoch:.2f}s/epoch each vs {alone * n_epoch:.2f}s '
                        f'alone: {n * alone / per_image:.2f}x the throughput of one run')

    # -- step 2
    def run_command(self, method: str, seed: int, variant: str) -> List[str]:
        import reproduce_cifar
        a = self.args
        rargs = argparse.Namespace(rho=a.rho, out=str(self.runs_dir), dataset='', data_dir=str(self.data_dir),
                                   imb_max=a.imb_max, extra=['--data-on-device', '--device', a.device, '--epochs',
                                                             str(self.epochs_of(method)), '--eval-interval',
                                                             str(a.eval_interval)] + self.flags_of(method, variant))
        cmd, run_dir = reproduce_cifar.command(rargs, method, seed)
        if '--resume' not in cmd and run_dir.is_dir() and any(run_dir.iterdir()):
            cmd.append('--overwrite')  # a run killed before its first checkpoint
        return cmd

    def epochs_done(self, name: str) -> int:
        return len(read_rows(self.runs_dir / name / 'summary.csv'))

    def step_runs(self) -> None:
        import reproduce_cifar
        a = self.args
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        if a.resume_from:
            with tarfile.open(a.resume_from) as tf:
                tf.extractall(self.runs_dir, filter='data') if hasattr(tarfile, 'data_filter') else \
                    tf.extractall(self.runs_dir)
            self.log(f'unpacked {a.resume_from} into {self.runs_dir}')
        variant = self.plan_variant()
        if variant in GRAPH_TWIN and not self.graph_ok:  # never graphed runs without a passing self-check
            self.log(f'runs: {variant} without a passing self-check of the graph-safe step '
                     f'({self.graph_note or "not run"}): the eager {GRAPH_TWIN[variant]} instead')
            variant = GRAPH_TWIN[variant]
        run_deadline = self.deadline - self.reserve()
        available = run_deadline - time.time()
        p = self.plan_parallel(variant, available / a.margin)
        queue = []
        for method, seed in self.queue:
            name = run_name(method, seed)
            if (self.runs_dir / name / 'results.json').is_file():
                self.runs[name] = dict(status='done', note='finished before this session', epochs=a.epochs)
                continue
            queue.append((method, seed))
        self.log(f'runs: {len(queue)} to do, {p} at a time, variant {variant} '
                 f'({" ".join(VARIANTS[variant][0]) or "fp32, eager"}); one run ~'
                 f'{self.run_cost(variant, p) * a.margin:.0f}s at {p} at a time; {available:.0f}s left for runs')
        self.measured['runs'] = dict(variant=variant, parallel=p,
                                     observed=list((self.model.m.get('runs') or {}).get('observed', [])))
        t_step = time.time()
        est_total = self.run_cost(variant, p) * a.margin * math.ceil(len(queue) / max(1, p))
        if queue and not self.fits(self.run_cost(variant, 1, self.epochs_of(queue[0][0]) - max(
                self.epochs_done(run_name(*queue[0])), 0))):
            note = self.skip_note(self.run_cost(variant, 1))
            for method, seed in queue:
                self.runs[run_name(method, seed)] = dict(status='skipped', note='budget', epochs=0)
            self.record('2', 'runs', est_total, 'skipped', note=note)
            return
        running = self.running
        while queue or running:
            now = time.time()
            # finished?
            for name, r in list(running.items()):
                if r['proc'].poll() is not None:
                    self.finish_run(name, r, closed(r['proc']))
                    del running[name]
            if now >= run_deadline and running:
                self.log(f'deadline: stopping {", ".join(running)}')
                stop_processes([r['proc'] for r in running.values()])
                for name, r in running.items():
                    self.finish_run(name, r, None)
                running.clear()
            # start the next ones
            while queue and len(running) < p and now < run_deadline:
                method, seed = queue[0]
                name = run_name(method, seed)
                stage1 = reproduce_cifar.stage1_of(method)
                if stage1 is not None and self.runs.get(run_name(stage1, seed), {}).get('status') != 'done':
                    if run_name(stage1, seed) in running:
                        break  # a second stage waits for its first stage
                    queue.pop(0)
                    self.runs[name] = dict(status='skipped', epochs=0,
                                           note=f'its stage-1 run {run_name(stage1, seed)} did not finish')
                    self.log(f'skip {name}: its stage-1 run {run_name(stage1, seed)} did not finish')
                    continue
                done = self.epochs_done(name) if (self.runs_dir / name / 'last.pth.tar').is_file() else 0
                need = self.start_estimate(variant, len(running) + 1, self.epochs_of(method) - done, running)
                others = self.others_fit(variant, len(running) + 1, running, run_deadline)
                if now + need * a.margin > run_deadline or not others:
                    why = (f'needs ~{need * a.margin:.0f}s, {run_deadline - now:.0f}s left' if others else
                           'would slow the running runs past the deadline')
                    if running:  # wait: a slot frees, the estimate may change
                        break
                    queue.pop(0)
                    self.runs[name] = dict(status='skipped', note=f'budget: {why}', epochs=done)
                    self.log(f'skip {name}: {why}')
                    continue
                queue.pop(0)
                cmd = self.run_command(method, seed, variant)
                self.log(f'start {name} (~{need:.0f}s, {self.epochs_of(method) - done} epochs{", resumed" if done else ""}): '
                         f'{" ".join(shlex.quote(c) for c in cmd)}')
                running[name] = dict(proc=start_process(cmd, self.runs_dir / f'{name}.log', self.env),
                                     start=time.time(), first_row=None, resumed_at=done, est=need,
                                     p=len(running) + 1, method=method)
            if not running and queue and time.time() >= run_deadline:
                for method, seed in queue:
                    self.runs[run_name(method, seed)] = dict(status='skipped', note='budget: deadline', epochs=0)
                queue.clear()
            if not running and queue:
                continue
            time.sleep(1.)
            for name, r in running.items():
                if r['first_row'] is None and self.epochs_done(name) > r['resumed_at']:
                    r['first_row'] = time.time()
        counts = {s: sum(r['status'] == s for r in self.runs.values()) for s in ('done', 'incomplete', 'failed',
                                                                                  'skipped')}
        status = 'failed' if counts['failed'] else ('done' if counts['done'] == len(self.queue) else 'partial')
        self.record('2', 'runs', est_total, status, time.time() - t_step,
                    ', '.join(f'{v} {k}' for k, v in counts.items() if v))

    def observed(self, running: Dict[str, Dict[str, Any]]):
        """Median start-up and seconds per epoch (evaluations included) of the runs under way, and their number."""
        startups, epochs = [], []
        for name, r in running.items():
            rows = read_rows(self.runs_dir / name / 'summary.csv')[r['resumed_at']:]
            times = [float(x['epoch_time_s']) for x in rows if x.get('epoch_time_s')]
            if len(times) >= 2:
                steady = statistics.mean(times[1:])
                epochs.append(steady)
                if r['first_row']:
                    startups.append(max(0., r['first_row'] - r['start'] - steady))
        return (statistics.median(startups) if startups else None,
                statistics.median(epochs) if epochs else None, len(running))

    def start_estimate(self, variant: str, p: int, epochs: int, running) -> float:
        est = self.run_cost(variant, p, epochs)
        startup, per_epoch, q = self.observed(running)
        if per_epoch is not None:
            scale = self.model.s_per_image(variant, p) / self.model.s_per_image(variant, q)
            evals = math.ceil(epochs / self.args.eval_interval) + 1
            obs = (startup if startup is not None else self.model.startup_s(variant, p)) + \
                per_epoch * scale * (epochs + evals * self.n_test / self.model.n_epoch / 3)
            est = max(est, obs) if startup is None else obs
        return est

    def others_fit(self, variant: str, p: int, running, run_deadline: float) -> bool:
        """Would each running run still finish before the deadline with ``p`` runs at once?"""
        if not running:
            return True
        now = time.time()
        scale = self.model.s_per_image(variant, p) / self.model.s_per_image(variant, len(running))
        for name, r in running.items():
            rows = read_rows(self.runs_dir / name / 'summary.csv')
            times = [float(x['epoch_time_s']) for x in rows[r['resumed_at']:] if x.get('epoch_time_s')]
            left = (self.epochs_of(r['method']) if 'method' in r else self.args.epochs) - len(rows)
            if len(times) >= 2:
                finish = now + left * statistics.mean(times[1:]) * scale
            else:
                finish = r['start'] + r['est'] * scale
            if finish > run_deadline and (len(times) < 2 or now + left * statistics.mean(times[1:]) <= run_deadline):
                return False  # it fits now and would not with one more
        return True

    def finish_run(self, name: str, r: Dict[str, Any], rc: Optional[int], why: str = 'the deadline') -> None:
        run_dir = self.runs_dir / name
        done = self.epochs_done(name)
        wall = time.time() - r['start']
        rows = read_rows(run_dir / 'summary.csv')
        times = [float(x['epoch_time_s']) for x in rows if x.get('epoch_time_s')]
        info = dict(epochs=done, wall_s=round(wall, 1), est_s=round(r['est'], 1),
                    s_per_epoch=round(statistics.median(times[1:] or times), 3) if times else None)
        if rc == 0 and (run_dir / 'results.json').is_file():
            res = json.loads((run_dir / 'results.json').read_text())
            info.update(status='done', top1=res['metrics'].get('top1'))
            if info['s_per_epoch'] and 'runs' in self.measured:  # for the next session's --estimates
                self.measured['runs']['observed'].append(dict(
                    name=name, variant=self.measured['runs']['variant'], parallel=r['p'],
                    s_per_epoch=info['s_per_epoch']))
        elif rc is None:
            info.update(status='incomplete', note=f'stopped at {why} after {done} of {self.args.epochs} epochs'
                                                 f'{"; last.pth.tar kept" if (run_dir / "last.pth.tar").is_file() else ""}')
        else:
            info.update(status='failed', note=f'exit {rc}: {tail(self.runs_dir / f"{name}.log", 2)}')
        self.runs[name] = info
        top1 = f', top-1 {info["top1"]:.2f}' if info.get('top1') is not None else ''
        self.log(f'{info["status"]} {name}: {done} epochs in {wall:.0f}s (est. {r["est"]:.0f}s){top1}'
                 f'{"; " + info["note"] if info.get("note") else ""}')

    # -- steps 3 and 4
    def step_summary(self) -> None:
        t = time.time()
        out = self.pack_dir / 'runs'
        out.mkdir(parents=True, exist_ok=True)
        status, note = 'skipped', 'no finished run'
        finished = sorted(self.runs_dir.glob('*/results.json')) if self.runs_dir.is_dir() else []
        if finished:
            cmd = [sys.executable, str(REPO / 'bench' / 'summarize_runs.py'), str(self.runs_dir), '--copy-to', str(out),
                   '--title', f'CIFAR-10-LT rho={self.args.rho} ({self.machine.get("gpu", self.args.device)}):']
            proc = start_process(cmd, self.pack_dir / 'logs' / 'summarize_runs.log', self.env)
            rc = self.wait(proc, max(30., self.left()))
            status = 'done' if rc == 0 else 'failed'
            note = f'{len(finished)} finished runs: runs/table.md' if rc == 0 else \
                f'exit {rc}: {tail(self.pack_dir / "logs" / "summarize_runs.log", 3)}'
        # every run's small files, the unfinished ones too
        for run_dir in sorted(p for p in self.runs_dir.glob('*-s*') if p.is_dir()) if self.runs_dir.is_dir() else []:
            for f in RESULT_FILES:
                if (run_dir / f).is_file() and (run_dir / f).stat().st_size < 2 ** 20:
                    (out / run_dir.name).mkdir(parents=True, exist_ok=True)
                    shutil.copy2(run_dir / f, out / run_dir.name / f)
            log = self.runs_dir / f'{run_dir.name}.log'
            if log.is_file():
                (out / run_dir.name).mkdir(parents=True, exist_ok=True)
                (out / run_dir.name / 'stdout.log').write_text(
                    '\n'.join(log.read_text(errors='replace').splitlines()[-400:]) + '\n')
        self.measured['step_s']['summary'] = time.time() - t
        self.record('3', 'summary', self.model.fixed_s('summary'), status, time.time() - t, note)
        (self.pack_dir / 'summary.md').write_text(self.summary_md())
        (self.pack_dir / 'measured.json').write_text(json.dumps(self.merged_measurements(), indent=1) + '\n')

    def summary_md(self) -> str:
        a = self.args
        lines = [f'# gpu_suite: CIFAR-10-LT rho={a.rho}, {a.epochs} epochs', '',
                 f'Machine: {json.dumps(self.machine)}', '',
                 f'Command: `python bench/gpu_suite.py {" ".join(shlex.quote(x) for x in sys.argv[1:])}`; '
                 f'budget {a.budget_s:.0f}s, used {time.time() - T0:.0f}s; data {self.data_dir} '
                 f'({self.n_train:,} training, {self.n_test:,} test images).', '',
                 '## Steps', '', '| step | name | est. s | s | status | note |', '|---|---|---|---|---|---|']
        for s in self.steps:
            est = '–' if s['est_s'] is None else f"{s['est_s']:.0f}"
            lines.append(f'| {s["step"]} | {s["title"]} | {est} | '
                         f'{s["seconds"]:.1f} | {s["status"]} | {s["note"].replace("|", "/")} |')
        lines += ['', '## Timings (median seconds per epoch of CIFAR-10-LT, ResNet-32, batch 128)', '',
                  '| report | data path | CMO | s/epoch | images/s | 200 epochs (min) |', '|---|---|---|---|---|---|']
        for name, rep in self.timings.items():
            if name in ('mixing', 'probe') or name.startswith('graph_'):
                continue
            for r in rep['rows']:
                lines.append(f'| {name} | {r["path"]} | {r["cmo"]} | {r["s_per_epoch"]:.3f} | {r["images_per_s"]:.0f} '
                             f'| {r["projected_200_epochs_min"]} |')
        if 'probe' in self.timings:
            pr = self.timings['probe']
            for i, rep in enumerate(pr['reports']):
                r = rep['rows'][0]
                lines.append(f'| {pr["p"]} at once ({pr["variant"]}) #{i} | {r["path"]} | {r["cmo"]} | '
                             f'{r["s_per_epoch"]:.3f} | {r["images_per_s"]:.0f} | {r["projected_200_epochs_min"]} |')
        graph_rows = [(n, r) for n, rep in self.timings.items() if n.startswith('graph_speed')
                      for r in rep.get('rows', [])]
        if graph_rows or 'graph_check' in self.timings:
            lines += ['', f'## Graph-safe step (--cuda-graph): {self.graph_note or "self-check not run"}', '',
                      '| report | batch | eager ms/step | graph-safe ms/step | speed-up | eager kernels/step | '
                      'graph-safe kernels/step |', '|---|---|---|---|---|---|---|']
            for n, r in graph_rows:
                lines.append(f'| {n} | {r["batch_size"]} | {r["eager_ms"]:.2f} | {r["graphed_ms"]:.2f} | '
                             f'{r["speedup"]:.2f}x | {r.get("eager_kernels", "–")} | {r.get("graphed_kernels", "–")} |')
        if 'mixing' in self.timings:
            lines += ['', '| mixing_cost device | mix (batch mode) ms | ResNet-32 step ms | ratio |', '|---|---|---|---|']
            for k, v in self.timings['mixing'].get('devices', {}).items():
                lines.append(f'| {k} | {v["mix_batch_ms"]:.3f} | {v["train_step_ms"]:.2f} | '
                             f'{100 * v["ratio_mixed_batch"]:.3f} % |')
        flags = ' '.join(['--data-on-device', '--eval-interval', str(a.eval_interval)] +
                         VARIANTS[self.measured.get('runs', {}).get('variant', 'fp32')][0])
        lines += ['', '## Runs', '', f'Flags: `{flags}`, '
                  f'{self.measured.get("runs", {}).get("parallel", "–")} at a time.', '',
                  '| run | status | epochs | wall s | est. s | s/epoch | top-1 | note |', '|---|---|---|---|---|---|---|---|']
        for method, seed in self.queue:
            name = run_name(method, seed)
            r = self.runs.get(name, dict(status='not started', epochs=0))
            top1 = r.get('top1')
            lines.append(f'| {name} | {r["status"]} | {r.get("epochs", 0)} | {r.get("wall_s", "–")} | '
                         f'{r.get("est_s", "–")} | {r.get("s_per_epoch") or "–"} | '
                         f'{"–" if top1 is None else f"{top1:.2f}"} | {r.get("note", "").replace("|", "/")} |')
        table = self.pack_dir / 'runs' / 'table.md'
        if table.is_file():
            lines += ['', '## Table (bench/summarize_runs.py: the rows for docs/RESULTS.md)', '', table.read_text()]
        return '\n'.join(lines) + '\n'

    def step_pack(self) -> None:
        t = time.time()
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        (self.pack_dir / 'plan.txt').write_text(self.plan + '\n')
        tar_path = out / 'gpu_suite.tar.gz'
        for drop_logs in (False, True):
            with tarfile.open(tar_path, 'w:gz') as tf:
                for f in sorted(self.pack_dir.rglob('*')):
                    if f.is_file() and not f.name.endswith('.pth.tar') and not (drop_logs and f.suffix == '.log'):
                        tf.add(f, arcname=str(Path('gpu_suite') / f.relative_to(self.pack_dir)))
            if tar_path.stat().st_size <= PACK_LIMIT:
                break
        shutil.copyfile(self.pack_dir / 'summary.md', out / 'gpu_suite_summary.md')
        # checkpoints of the runs stopped at the deadline, most advanced first, as many as fit one returned file
        incomplete = sorted((n for n, r in self.runs.items() if r['status'] == 'incomplete' and
                             (self.runs_dir / n / 'last.pth.tar').is_file()), key=lambda n: -self.runs[n]['epochs'])
        kept, size = [], 0
        for n in incomplete:
            files = [self.runs_dir / n / f for f in ('last.pth.tar', 'summary.csv', 'args.yaml', 'train.log')
                     if (self.runs_dir / n / f).is_file()]
            s = sum(f.stat().st_size for f in files)
            if size + s <= PACK_LIMIT * 0.9:  # checkpoints hardly compress
                kept.append((n, files))
                size += s
        if kept:
            with tarfile.open(out / 'gpu_suite_resume.tar.gz', 'w:gz') as tf:
                for n, files in kept:
                    for f in files:
                        tf.add(f, arcname=f'{n}/{f.name}')
        self.measured['step_s']['pack'] = time.time() - t
        note = f'{show(tar_path)} ({tar_path.stat().st_size / 1024:.0f} KiB)' + (
            f', gpu_suite_resume.tar.gz ({", ".join(n for n, _ in kept)}: resume with --resume-from)' if kept else '')
        if len(kept) < len(incomplete):
            note += f'; no room for the checkpoints of {", ".join(n for n in incomplete if n not in dict(kept))}'
        self.record('4', 'pack', self.model.fixed_s('pack'), 'done', time.time() - t, note)
        self.log(f'finished in {time.time() - T0:.0f}s of the {self.args.budget_s:.0f}s budget')
        (out / 'gpu_suite_log.txt').write_text('\n'.join(self.lines) + '\n')
        (out / 'gpu_suite_summary.md').write_text(self.summary_md())  # with the pack step

    def run(self) -> int:
        a = self.args
        self.pack_dir.mkdir(parents=True, exist_ok=True)
        for old in (self.pack_dir / 'log.txt', self.pack_dir / 'summary.md', Path(a.out) / 'gpu_suite_log.txt',
                    Path(a.out) / 'gpu_suite_resume.tar.gz'):
            old.unlink(missing_ok=True)
        self.plan = self.plan_text()
        self.log(self.plan)
        handlers = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.step_install()
            ok = self.step_check()
            if ok and (not a.no_timings or self.graph_variants()):
                self.step_timings()  # with --no-timings: the graph-safe step's self-check only
                if self.measured['variants']:
                    self.log(self.plan_text(replan=True))
            elif not ok:
                for step, name in (('1', 'timings'), ('2', 'runs')):
                    self.record(step, name, None, 'skipped', note='the check failed')
            if ok:
                self.step_runs()
        except Interrupted as e:
            for sig, h in handlers.items():  # a second signal ends the suite at once
                signal.signal(sig, h)
            self.log(f'{e}: stopping {len(ACTIVE)} processes, then the summary and packing')
            stop_processes(list(ACTIVE), grace=10.)
            for name, r in self.running.items():
                self.finish_run(name, r, None, why=str(e))
            self.running.clear()
            self.record('-', 'interrupted', None, 'failed', note=f'{e} at {time.time() - T0:.0f}s')
        for sig, h in handlers.items():
            signal.signal(sig, h)
        self.step_summary()
        self.step_pack()
        return 1 if self.failed else 0


CHECK_CODE = r'''
import json, platform, sys, time
import torch, timm
import timm_cmo
info = dict(python=platform.python_version(), torch=torch.__version__, timm=timm.__version__,
            timm_cmo=timm_cmo.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
            cpu_threads=torch.get_num_threads())
if sys.argv[1] == 'cuda':
    if not torch.cuda.is_available():
        print('CHECK ' + json.dumps(info))
        sys.exit(3)
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2 ** 30, 1), sms=p.multi_processor_count,
                capability=f'{p.major}.{p.minor}')
    a = torch.randn(4096, 4096, device='cuda', dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    info['bf16_matmul_tflops'] = round(20 * 2 * 4096 ** 3 / (time.perf_counter() - t) / 1e12, 1)
print('CHECK ' + json.dumps(info))
'''


def install_command(missing: List[str], wheels: Path = WHEELS) -> List[str]:
    """The pip command for ``missing`` (as missing_requirements() words them).

    With a ``wheels`` folder (``shared/wheels``, made before the session with ``pip download``) holding a
    wheel of some of them, those are installed from that folder and nothing else (the GPU machine cannot
    download; a missing test extra without a wheel does not stop them). Otherwise ``pip install -e
    ".[test]"`` (a machine that can reach the package index).
    """
    def norm(name: str) -> str:
        return re.sub(r'[-_.]+', '_', name).lower()
    held = {norm(w.name.split('-')[0]) for w in wheels.glob('*.whl')} if wheels.is_dir() else set()
    reqs = [req.split(' (')[0] for req in missing]
    reqs = [req for req in reqs if norm(re.match(r'[A-Za-z0-9_.\-]+', req).group(0)) in held]
    if reqs:
        return [sys.executable, '-m', 'pip', 'install', '--no-index', '--find-links', str(wheels), *reqs]
    return [sys.executable, '-m', 'pip', 'install', '--retries', '1', '--timeout', '15', '-e', '.[test]']


def missing_requirements() -> List[str]:
    """setup.py's install_requires and test extras that are not installed (or too old)."""
    import ast
    from importlib import metadata
    text = (REPO / 'setup.py').read_text()
    reqs = []
    for key in ('install_requires', "'test'"):
        m = re.search(re.escape(key) + r'\s*[=:]\s*(\[[^\]]*\])', text)
        if m:
            reqs += ast.literal_eval(m.group(1))
    missing = []
    for req in reqs:
        m = re.match(r'([A-Za-z0-9_.\-]+)\s*(>=\s*([0-9.]+))?', req)
        name, minimum = m.group(1), m.group(3)
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(req)
            continue
        if minimum:
            def nums(v):
                return tuple(int(x) for x in re.findall(r'\d+', v)[:3])
            if nums(have) < nums(minimum):
                missing.append(f'{req} (have {have})')
    return missing


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prepare_data:
        return prepare_data(args)
    suite = Suite(args)
    if args.plan_only:
        print(suite.plan_text())
        return 0
    return suite.run()


if __name__ == '__main__':
    sys.exit(main())
