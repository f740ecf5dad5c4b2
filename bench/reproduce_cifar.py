#!/usr/bin/env python3
""" Run the CIFAR-10-LT recipes of hparams/ for several methods and seeds, a few runs at a time.

Each run is ``train_cmo.py -c hparams/cifar10_lt_r<rho>_<method>.yaml`` with the data, seed and speed
options given here, in its own folder under ``--out``. A finished run (results.json present) is
skipped; an interrupted one resumes from its ``last.pth.tar`` (one stopped before its first checkpoint
starts afresh, its folder kept as ``<run>.stopped-<time>``), so the driver can be restarted.

Second stages start from their stage-1 run of the same seed once it has finished: ``<stage 1>_crt`` and
``<stage 1>_lws`` (Kang et al.'s classifier re-training and learnable weight scaling, e.g. ``ce_crt``,
``ce_cmo_lws``), ``<stage 1>_las`` (MiSLAS's LAS, e.g. ``ce_drw_cmo_las``) and ``<stage 1>_router`` (RIDE's
expert assignment, ``hparams/cifar10_lt_ride_router.yaml``, e.g. ``ride_cmo_router``) get ``--initial-checkpoint
<out>/<stage 1>-s<seed>/last.pth.tar``.

    python bench/reproduce_cifar.py --data-dir ../shared/data/cifar10 --out ../runs/cifar10_lt_mini \\
        --imb-max 1000 --methods ce ce_cmo bs bs_cmo ldam_drw ldam_drw_cmo --seeds 0 1 --parallel 2 --threads 1 \\
        -- --data-on-device --device cpu --eval-interval 10
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

from common import REPO, run_name


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data-dir', required=True, help="folder with CIFAR-10 train.tar/test.tar (or train/test)")
    parser.add_argument('--dataset', default='', help="'' for folders/tars, torch/cifar10 for torchvision")
    parser.add_argument('--out', required=True, help='parent folder of the runs')
    parser.add_argument('--rho', type=int, default=100)
    parser.add_argument('--imb-max', type=int, default=None, help='cap on the largest class (1000: mini CIFAR-10-LT)')
    parser.add_argument('--methods', nargs='+', default=['ce', 'ce_cmo', 'bs', 'bs_cmo', 'ldam_drw', 'ldam_drw_cmo'])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0])
    parser.add_argument('--parallel', type=int, default=2, help='runs at a time')
    parser.add_argument('--threads', type=int, default=1, help='torch threads per run (CPU)')
    parser.add_argument('extra', nargs=argparse.REMAINDER, help='after --: more train_cmo.py flags for every run')
    return parser.parse_args(argv)


STAGE2_SUFFIXES = ('_crt', '_lws', '_las', '_router')
POLL_S = 5.0  # seconds between checks of the running processes


def stage1_of(method: str) -> Optional[str]:
    """The stage-1 method a second stage starts from (``ce_drw_cmo_las`` -> ``ce_drw_cmo``), else None."""
    for suffix in STAGE2_SUFFIXES:
        if method.endswith(suffix) and len(method) > len(suffix):
            return method[:-len(suffix)]
    return None


def recipe_of(args, method: str) -> Path:
    name = 'cifar10_lt_ride_router.yaml' if method.endswith('_router') else f'cifar10_lt_r{args.rho}_{method}.yaml'
    recipe = REPO / 'hparams' / name
    if not recipe.is_file():
        raise SystemExit(f'No recipe {recipe} (method {method})')
    return recipe


def finished(args, method: str, seed: int) -> bool:
    return (Path(args.out) / run_name(method, seed) / 'results.json').is_file()


def command(args, method: str, seed: int):
    recipe = recipe_of(args, method)
    run_dir = Path(args.out) / run_name(method, seed)
    cmd = [sys.executable, str(REPO / 'train_cmo.py'), '-c', str(recipe), '--dataset', args.dataset,
           '--data-dir', args.data_dir, '--seed', str(seed), '--output', args.out,
           '--experiment', run_name(method, seed), '--workers', '0', '--checkpoint-hist', '1', '--log-interval', '100']
    if args.imb_max:
        cmd += ['--imb-max', str(args.imb_max)]
    stage1 = stage1_of(method)
    if stage1 is not None:
        cmd += ['--initial-checkpoint', str(Path(args.out) / run_name(stage1, seed) / 'last.pth.tar')]
        if method.endswith('_router'):  # one router recipe for every imbalance
            cmd += ['--imb-ratio', str(args.rho)]
    if (run_dir / 'last.pth.tar').is_file():
        cmd += ['--resume', str(run_dir / 'last.pth.tar')]
    extra = [a for a in args.extra if a != '--']
    return cmd + extra, run_dir


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    queue = []
    for seed in args.seeds:
        for method in args.methods:
            recipe_of(args, method)  # every recipe exists before anything starts
            if finished(args, method, seed):
                print(f'done already: {run_name(method, seed)}', flush=True)
                continue
            queue.append((method, seed))
    for method, seed in queue:
        stage1 = stage1_of(method)
        if stage1 is not None and (stage1, seed) not in queue and not finished(args, stage1, seed):
            raise SystemExit(f'{run_name(method, seed)} starts from {run_name(stage1, seed)}, which has not finished '
                             f'and is not among --methods')
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    running = []
    failed = []
    while queue or running:
        while len(running) < args.parallel and (ready := next_ready(args, queue)) is not None:
            method, seed = queue.pop(ready)
            cmd, run_dir = command(args, method, seed)
            if (moved := set_aside_unstarted(run_dir)) is not None:
                print(f'{run_dir.name} stopped before its first checkpoint: its folder is kept as {moved.name}, '
                      f'the run starts afresh', flush=True)
            log = open(Path(args.out) / f'{run_name(method, seed)}.log', 'a')
            print(f'{time.strftime("%H:%M:%S")} start {run_name(method, seed)}: {" ".join(cmd)}', flush=True)
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), method, seed, log,
                            time.time()))
        time.sleep(POLL_S)
        for item in list(running):
            proc, method, seed, log, start = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                status = 'finished' if proc.returncode == 0 else f'FAILED ({proc.returncode})'
                if proc.returncode:
                    failed.append(run_name(method, seed))
                print(f'{time.strftime("%H:%M:%S")} {status} {run_name(method, seed)} in {(time.time() - start) / 60:.1f} min',
                      flush=True)
        if not running and queue and next_ready(args, queue) is None:
            break  # only second stages of failed runs are left
    for method, seed in queue:
        failed.append(run_name(method, seed))
        print(f'not run: {run_name(method, seed)} (its stage-1 run {run_name(stage1_of(method), seed)} failed)',
              flush=True)
    if failed:
        raise SystemExit(f'failed runs: {failed}')


def set_aside_unstarted(run_dir: Path) -> Optional[Path]:
    """Move aside the folder of a run stopped before its first checkpoint (args.yaml and a log, no
    ``last.pth.tar``), which train_cmo.py would refuse to start in; returns where it went (None: nothing moved)."""
    if not run_dir.is_dir() or (run_dir / 'last.pth.tar').is_file() or not any(run_dir.iterdir()):
        return None
    target = run_dir.with_name(f'{run_dir.name}.stopped-{time.strftime("%Y%m%d-%H%M%S")}')
    run_dir.rename(target)
    return target


def next_ready(args, queue: List[Tuple[str, int]]) -> Optional[int]:
    """Index of the first queued run that can start now: not a second stage, or one whose stage-1 run has
    finished (a second stage of a failed run never can); None when none can."""
    for i, (method, seed) in enumerate(queue):
        stage1 = stage1_of(method)
        if stage1 is None or finished(args, stage1, seed):
            return i
    return None


if __name__ == '__main__':
    main()
