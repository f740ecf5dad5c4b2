""" Loader throughput on CIFAR-10-LT: timm's plain loader vs the CMO loader vs the paper's two loaders.

Images per second of the loader alone (no model), counted as background images delivered, i.e.
training samples, over full epochs of CIFAR-10-LT (rho=100, 12,406 images, 96 batches of 128 with
drop_last), after one warm-up epoch of every loader. All loaders use the same augmentation (the
paper's pad-4 random crop + flip, no colour jitter) and timm's prefetcher (uint8 fast collate,
normalisation after the loader), on the CPU:

* ``timm``: ``timm.data.create_loader`` (with the pad crop swapped in as ``create_cmo_loader`` does).
* ``cmo``: ``create_cmo_loader(cmo=True, cmo_prob=0.5)``: foregrounds are read only for the
  batches that will be mixed (~1.5 decodes per training sample).
* ``two_loader``: the paper code's approach: a second loader over the same dataset with
  ``WeightedRandomSampler(n_k^-1 per sample, N, replacement=True)``, a foreground batch read at
  every step whether it is mixed or not (2 decodes per sample), mixed with ``CMOMixup(prob=0.5)``.

The loaders run in the same process, interleaved (the order rotates every repeat); the median
over the repeats is reported, for each ``--workers`` setting. Image reads are counted through a
shared-memory counter in a dataset wrapper (works across worker processes).

    python bench/loader_throughput.py --data-dir ../shared/data/cifar10 --workers 0 2 --repeats 3
"""
import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.utils.data
from timm.data import create_loader
from timm.data.loader import PrefetchLoader, fast_collate

from common import REPO, default_data_dir, report_header, write_json  # noqa: E402  (also puts the repo on sys.path)

import timm_cmo  # noqa: E402,F401  (registers the plugin)
from timm_cmo.data import (  # noqa: E402
    CMOMixup, LongTailDataset, create_cmo_loader, create_lt_dataset, dataset_targets, sample_weights,
)
from timm_cmo.data.transforms import pad_crop_transform  # noqa: E402

CPU = torch.device('cpu')
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
INPUT_SIZE = (3, 32, 32)
LOADERS = ('timm', 'cmo', 'two_loader')


class CountReads:
    """Mixin for a map-style dataset: counts ``__getitem__`` calls in a shared-memory tensor, one slot per process
    (so reads in loader workers count too)."""

    MAX_SLOTS = 64

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads = torch.zeros(self.MAX_SLOTS, dtype=torch.int64).share_memory_()

    def __getitem__(self, index):
        info = torch.utils.data.get_worker_info()
        self.reads[0 if info is None else 1 + info.id] += 1
        return super().__getitem__(index)

    def count(self) -> int:
        return int(self.reads.sum())


class CountingDataset(CountReads, LongTailDataset):
    """A LongTailDataset counting its image reads."""


def make_dataset(tar: str, imb_ratio: float) -> CountingDataset:
    """A fresh dataset with its own tar reader: a reader whose tar file the parent process has opened
    must not be shared with forked workers (they would share one file offset)."""
    src = create_lt_dataset('', tar, imb_ratio=imb_ratio)
    return CountingDataset(src.dataset, indices=src.indices, num_classes=src.num_classes, classes=src.classes)


def loader_kwargs(batch_size: int, workers: int):
    return dict(input_size=INPUT_SIZE, batch_size=batch_size, is_training=True, num_workers=workers, device=CPU,
                mean=CIFAR_MEAN, std=CIFAR_STD, color_jitter=None)


class TwoLoaders:
    """The paper code's training-loop data path: a background batch from the plain loader and, at
    every step, a foreground batch from a class-weighted loader; mixed with probability ``prob``.

    ``loader_kw``: the arguments of timm's ``create_loader`` (default: this script's CIFAR ones);
    ``pad_crop``: swap in the paper's pad-4 random crop (the CIFAR recipe).
    """

    def __init__(self, bg_dataset, fg_dataset, batch_size, workers, prob=0.5, seed=0, loader_kw=None, pad_crop=True):
        kw = loader_kw if loader_kw is not None else loader_kwargs(batch_size, workers)
        self.bg = create_loader(bg_dataset, **kw)
        if pad_crop:
            bg_dataset.transform = pad_crop_transform(bg_dataset.transform, kw['input_size'])
        # same transform (timm's, with the pad crop), same collate and prefetcher for the foregrounds
        fg_dataset.transform = bg_dataset.transform
        targets = dataset_targets(fg_dataset)
        weights = sample_weights(targets, r=1.0)
        sampler = torch.utils.data.WeightedRandomSampler(weights, len(weights), replacement=True)
        inner = torch.utils.data.DataLoader(
            fg_dataset, batch_size=kw['batch_size'], sampler=sampler, num_workers=kw['num_workers'],
            collate_fn=fast_collate, drop_last=True, persistent_workers=kw['num_workers'] > 0)
        self.fg = PrefetchLoader(inner, mean=kw['mean'], std=kw['std'], device=kw['device'])
        num_classes = getattr(bg_dataset, 'num_classes', None) or int(targets.max()) + 1
        self.mixer = CMOMixup(num_classes, prob=prob, beta=1.0, seed=seed)

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return len(self.bg)

    def __iter__(self):
        fg_iter = iter(self.fg)  # as the paper: a new foreground iterator every epoch, restarted when exhausted
        for x, y in self.bg:
            try:
                x_f, y_f = next(fg_iter)
            except StopIteration:
                fg_iter = iter(self.fg)
                x_f, y_f = next(fg_iter)
            yield self.mixer(x, y, x_f[:x.shape[0]], y_f[:y.shape[0]])


def build(name: str, tar: str, imb_ratio: float, batch_size: int, workers: int, seed: int):
    """(loader, datasets whose reads count) for one of LOADERS."""
    if name == 'timm':
        ds = make_dataset(tar, imb_ratio)
        loader = create_loader(ds, **loader_kwargs(batch_size, workers))
        ds.transform = pad_crop_transform(ds.transform, INPUT_SIZE)  # what create_cmo_loader(train_crop_mode='pad') does
        return loader, [ds]
    if name == 'cmo':
        ds = make_dataset(tar, imb_ratio)
        loader = create_cmo_loader(ds, **loader_kwargs(batch_size, workers), cmo=True, cmo_prob=0.5,
                                   cmo_start_epoch=-1, train_crop_mode='pad', seed=seed)
        return loader, [ds]
    if name == 'two_loader':
        bg, fg = make_dataset(tar, imb_ratio), make_dataset(tar, imb_ratio)
        return TwoLoaders(bg, fg, batch_size, workers, prob=0.5, seed=seed), [bg, fg]
    raise ValueError(name)


def run_epoch(loader, datasets, epoch):
    """One full epoch: (seconds, background images, image reads)."""
    if hasattr(loader, 'set_epoch'):
        loader.set_epoch(epoch)
    reads0 = sum(d.count() for d in datasets)
    n = 0
    t0 = time.perf_counter()
    for x, _ in loader:
        n += x.shape[0]
    dt = time.perf_counter() - t0
    return dt, n, sum(d.count() for d in datasets) - reads0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data-dir', default=default_data_dir(), help='Folder with CIFAR-10 train.tar (or the tar itself)')
    p.add_argument('--imb-ratio', type=float, default=100.)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--workers', type=int, nargs='+', default=[0, 2])
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--threads', type=int, default=None, help='torch threads of the main process (default: torch default)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default=str(REPO / 'bench' / 'results' / 'loader_throughput.json'))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    tar = args.data_dir if args.data_dir.endswith('.tar') else os.path.join(args.data_dir, 'train.tar')

    results = dict(report_header(__file__, argv), batch_size=args.batch_size,
                   imb_ratio=args.imb_ratio, repeats=args.repeats, workers={})
    info = results['machine']
    print(f'# {info}', flush=True)
    t_start = time.perf_counter()
    for workers in args.workers:
        loaders = {name: build(name, tar, args.imb_ratio, args.batch_size, workers, args.seed) for name in LOADERS}
        n_data = len(loaders['timm'][1][0])
        for name, (loader, datasets) in loaders.items():  # warm-up: one full epoch each (starts workers)
            run_epoch(loader, datasets, 0)
        runs = {name: [] for name in LOADERS}
        for rep in range(args.repeats):
            order = LOADERS[rep % 3:] + LOADERS[:rep % 3]
            for name in order:
                loader, datasets = loaders[name]
                dt, n, reads = run_epoch(loader, datasets, rep + 1)
                runs[name].append(dict(seconds=dt, images=n, reads=reads, images_per_s=n / dt))
                print(f'workers={workers} rep={rep} {name:>10}: {n / dt:8.0f} img/s  ({dt:.2f} s, {n} images, '
                      f'{reads / n:.3f} reads/sample)', flush=True)
        summary = {}
        for name in LOADERS:
            r = runs[name]
            summary[name] = dict(
                images_per_s=statistics.median(x['images_per_s'] for x in r),
                reads_per_sample=sum(x['reads'] for x in r) / sum(x['images'] for x in r),
                images_per_epoch=r[0]['images'], runs=r)
        ips = {name: summary[name]['images_per_s'] for name in LOADERS}
        summary['ratios'] = dict(cmo_vs_timm=ips['cmo'] / ips['timm'], cmo_vs_two_loader=ips['cmo'] / ips['two_loader'])
        summary['goals_met'] = dict(cmo_vs_timm=summary['ratios']['cmo_vs_timm'] >= 0.6,
                                    cmo_vs_two_loader=summary['ratios']['cmo_vs_two_loader'] >= 1.3)
        summary['dataset_images'] = n_data
        results['workers'][str(workers)] = summary
        del loaders

    results['wall_s'] = time.perf_counter() - t_start
    print()
    print(f'CIFAR-10-LT rho={args.imb_ratio:g}, batch {args.batch_size}, median of {args.repeats} epochs, {info["cpu"]}, '
          f'{info["cores"]} cores')
    print(f'| workers | timm img/s | CMO img/s | two-loader img/s | CMO/timm (goal >= 0.6) | CMO/two-loader (goal >= 1.3) '
          f'| reads/sample timm / CMO / two-loader |')
    print('|---|---|---|---|---|---|---|')
    for workers, s in results['workers'].items():
        print(f'| {workers} | {s["timm"]["images_per_s"]:.0f} | {s["cmo"]["images_per_s"]:.0f} | '
              f'{s["two_loader"]["images_per_s"]:.0f} | {s["ratios"]["cmo_vs_timm"]:.2f} | '
              f'{s["ratios"]["cmo_vs_two_loader"]:.2f} | {s["timm"]["reads_per_sample"]:.2f} / '
              f'{s["cmo"]["reads_per_sample"]:.2f} / {s["two_loader"]["reads_per_sample"]:.2f} |')
    write_json(args.out, results)
    print(f'\nwrote {args.out} ({results["wall_s"]:.0f} s)')
    return results


if __name__ == '__main__':
    main()
