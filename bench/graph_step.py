#!/usr/bin/env python3
""" The graph-safe training step (``--cuda-graph``) against today's ``--data-on-device`` step: same numbers, ms per
step, kernels per step.

Both steps are train_cmo.py's own (``train_one_epoch`` and ``train_one_epoch_graphed`` with
:class:`~timm_cmo.train_step.GraphedTrainStep`), on ResNet-32 (default) with CMO and CE, images drawn at random in
device memory with the CIFAR-10-LT class counts (the pixels do not change the time of a step). On a CUDA device
the graph-safe step is captured as CUDA graphs; on the CPU it is its eager stand-in.

  --check-steps N   the self-check: N steps of each from the same seed, the weights and losses compared
                    (exit 3 when they differ beyond --check-rtol / --check-atol)
  --batch-sizes     ms per step of each batch size (128: the recipes'; 118: the last batch of a CIFAR-10-LT epoch),
                    the median of --repeats epochs of --steps steps, the two paths interleaved
  --kernels         device kernels per step from torch.profiler (on the CPU: aten operators per step)

    python bench/graph_step.py --device cuda --amp --channels-last --out graph_step.json   # on a GPU
    python bench/graph_step.py --device cpu --steps 6 --threads 1 --out graph_step_cpu.json # the CPU ratio

``--simulate-mismatch`` perturbs the graph-safe weights before the comparison: the check fails, as a test of
what depends on it (bench/gpu_suite.py's fallback to the eager step).
"""
import argparse
import math
import sys
import time
from contextlib import suppress
from functools import partial

from common import report_header, write_json  # (also puts the repo on sys.path)

NUM_CLASSES = 10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda' if __import__('torch').cuda.is_available() else 'cpu')
    p.add_argument('--model', default='resnet32_cifar')
    p.add_argument('--loss', default='ce', help='a timm_cmo loss (create_loss)')
    p.add_argument('--reweight', default='none')
    p.add_argument('--no-cmo', action='store_true', help='without CMO (default: CMO batch mode, prob 0.5)')
    p.add_argument('--rho', type=float, default=100, help='CIFAR-10-LT imbalance of the class counts')
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[128, 118])
    p.add_argument('--steps', type=int, default=30,
                   help='steps timed per batch size and path (after a warm-up); 0: the self-check only')
    p.add_argument('--repeats', type=int, default=3, help='timed epochs per path, interleaved (the median)')
    p.add_argument('--check-steps', type=int, default=4, help='steps of the self-check (0: no check)')
    p.add_argument('--check-rtol', type=float, default=None, help='default 1e-5 (fp32), 2e-2 (--amp)')
    p.add_argument('--check-atol', type=float, default=None, help='default 1e-5 (fp32), 2e-3 (--amp)')
    p.add_argument('--kernels', action='store_true', help='count kernels (CPU: operators) per step')
    p.add_argument('--amp', action='store_true', help='bf16 autocast')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    p.add_argument('--simulate-mismatch', action='store_true', help='make the self-check fail (a test hook)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='', help='write the figures as JSON here')
    return p.parse_args(argv)


def lt_targets(n: int, rho: float, seed: int):
    """``n`` labels drawn in CIFAR-10-LT proportions (largest class 5000, ratio ``rho``), every class once at least."""
    import numpy as np
    if n < NUM_CLASSES:
        raise ValueError(f'{n} images for {NUM_CLASSES} classes')
    counts = np.array([5000 * rho ** (-i / (NUM_CLASSES - 1)) for i in range(NUM_CLASSES)])
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(NUM_CLASSES), rng.choice(NUM_CLASSES, n - NUM_CLASSES, p=counts / counts.sum())])
    return rng.permutation(y)  # every class at least once


class Setup:
    """A model, loader, loss, SGD and the args train_cmo.py's epoch functions read, for ``steps`` batches of ``b``."""

    def __init__(self, a, b: int, steps: int):
        import numpy as np
        import timm
        import torch

        import train_cmo  # noqa: F401 (registers the models)
        from timm_cmo.data import CMOConfig
        from timm_cmo.data.device_loader import DeviceLoader
        from timm_cmo.losses import create_loss
        device = torch.device(a.device)
        n = b * steps
        g = torch.Generator().manual_seed(a.seed)
        targets = torch.from_numpy(lt_targets(n, a.rho, a.seed)).to(device)
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
        counts = np.bincount(targets.cpu().numpy(), minlength=NUM_CLASSES).tolist()
        self.loader = DeviceLoader(images, targets, b, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
                                   num_classes=NUM_CLASSES, seed=a.seed, epochs=200, channels_last=a.channels_last,
                                   cmo=None if a.no_cmo else CMOConfig.from_flags(cmo_start_epoch=-1))
        torch.manual_seed(a.seed)
        self.model = timm.create_model(a.model, num_classes=NUM_CLASSES, head_norm=a.loss == 'ldam').to(device)
        if a.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = create_loss(a.loss, counts, reweight=a.reweight).to(device)
        if self.loss_fn.needs_experts:
            self.model.set_expert_training(True)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
        self.args = argparse.Namespace(channels_last=a.channels_last, clip_grad=None, clip_mode='norm',
                                       log_interval=10 ** 9, rank=0, world_size=1, distributed=False,
                                       grad_accum_steps=1)
        self.device = device
        self.amp = partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16) if a.amp else suppress
        self.graphed = None
        self.amp_dtype = torch.bfloat16 if a.amp else None

    def epoch(self, epoch: int, graphed: bool) -> float:
        """One epoch on the chosen path; returns its mean loss."""
        import train_cmo
        from timm_cmo.train_step import GraphedTrainStep
        self.loader.set_epoch(epoch)
        self.loss_fn.set_epoch(epoch)
        if not graphed:
            return train_cmo.train_one_epoch(epoch, self.model, self.loader, self.optimizer, self.loss_fn, self.args,
                                             self.device, amp_autocast=self.amp)['loss']
        if self.graphed is None:
            self.graphed = GraphedTrainStep(self.model, self.loss_fn, self.optimizer, self.loader,
                                            autocast_dtype=self.amp_dtype)
        return train_cmo.train_one_epoch_graphed(epoch, self.graphed, self.args)['loss']


def sync(device) -> None:
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def self_check(a) -> dict:
    """``check_steps`` steps (one epoch) and a second epoch on each path from the same seed: the largest weight
    difference and the losses."""
    import torch
    b = a.batch_sizes[0]
    ref, got = Setup(a, b, a.check_steps), Setup(a, b, a.check_steps)
    losses = [[ref.epoch(e, False), got.epoch(e, True)] for e in range(2)]
    if a.simulate_mismatch:
        with torch.no_grad():
            next(got.model.parameters()).add_(1.)
    rtol = a.check_rtol if a.check_rtol is not None else (2e-2 if a.amp else 1e-5)
    atol = a.check_atol if a.check_atol is not None else (2e-3 if a.amp else 1e-5)
    worst, bad = 0., []
    for (k, u), v in zip(ref.model.state_dict().items(), got.model.state_dict().values()):
        if not u.is_floating_point():
            if not torch.equal(u, v):
                bad.append(k)
            continue
        d = (u.double() - v.double()).abs()
        worst = max(worst, float(d.max()))
        if not bool((d <= atol + rtol * u.double().abs()).all()):
            bad.append(k)
    loss_ok = all(math.isclose(x, y, rel_tol=max(rtol, 1e-6), abs_tol=atol) for x, y in losses)
    return dict(ok=not bad and loss_ok, steps=a.check_steps, epochs=2, batch_size=b, max_abs_diff=worst,
                rtol=rtol, atol=atol, differing=bad[:10], losses=losses,
                captured=bool(got.graphed is not None and got.graphed.capture))


def count_kernels(setup: Setup, graphed: bool, steps: int, epoch: int) -> float:
    """Device kernels (CUDA) or aten operators (CPU) per step of one profiled epoch."""
    from torch.profiler import ProfilerActivity, profile
    cuda = setup.device.type == 'cuda'
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        setup.epoch(epoch, graphed)
        sync(setup.device)
    events = prof.events()
    if cuda:
        n = sum(1 for e in events if str(getattr(e, 'device_type', '')).endswith('CUDA') and
                not e.name.startswith(('cudaStream', 'cudaEvent')))
    else:
        n = sum(1 for e in events if e.name.startswith('aten::') and e.cpu_parent is None)
    return n / steps


def time_steps(a, b: int) -> dict:
    """ms per step of batch ``b`` on both paths: one warm-up epoch each (the capture), then ``repeats`` timed
    epochs of each, interleaved (eager, graph-safe, eager, ...); the median epoch of each."""
    import statistics
    row = dict(batch_size=b, steps=a.steps, repeats=a.repeats)
    setups = {graphed: Setup(a, b, a.steps) for graphed in (False, True)}
    for graphed, setup in setups.items():
        setup.epoch(0, graphed)
        sync(setup.device)
    times = {False: [], True: []}
    for r in range(a.repeats):
        for graphed, setup in setups.items():
            t = time.perf_counter()
            setup.epoch(1 + r, graphed)
            sync(setup.device)
            times[graphed].append((time.perf_counter() - t) / a.steps * 1e3)
    for graphed, key in ((False, 'eager'), (True, 'graphed')):
        row[f'{key}_ms'] = statistics.median(times[graphed])
        row[f'{key}_ms_all'] = [round(x, 3) for x in times[graphed]]
        if a.kernels:
            row[f'{key}_kernels'] = count_kernels(setups[graphed], graphed, a.steps, 1 + a.repeats)
    row['speedup'] = row['eager_ms'] / row['graphed_ms']
    return row


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == 'cuda' and not torch.cuda.is_available():
        print('no CUDA device', file=sys.stderr)
        return 2
    report = dict(report_header(__file__, argv), device=a.device, model=a.model, loss=a.loss, cmo=not a.no_cmo,
                  amp=a.amp, channels_last=a.channels_last,
                  captured=a.device == 'cuda', kernels_unit='CUDA kernels' if a.device == 'cuda' else 'aten operators')
    status = 0
    if a.check_steps:
        report['check'] = check = self_check(a)
        print(f'self-check ({check["steps"]} steps x 2 epochs, batch {check["batch_size"]}, '
              f'{"captured" if check["captured"] else "eager stand-in"}): {"ok" if check["ok"] else "DIFFERENT"}, '
              f'largest weight difference {check["max_abs_diff"]:.3g}', flush=True)
        if not check['ok']:
            status = 3
    if status == 0 and a.steps > 0:
        report['rows'] = []
        for b in a.batch_sizes:
            row = time_steps(a, b)
            report['rows'].append(row)
            kern = f', {row["eager_kernels"]:.0f} -> {row["graphed_kernels"]:.0f} {report["kernels_unit"]}/step' \
                if a.kernels else ''
            print(f'batch {b}: eager {row["eager_ms"]:.2f} ms/step, graph-safe {row["graphed_ms"]:.2f} ms/step '
                  f'({row["speedup"]:.2f}x){kern}', flush=True)
    if a.out:
        write_json(a.out, report)
    return status


if __name__ == '__main__':
    sys.exit(main())
