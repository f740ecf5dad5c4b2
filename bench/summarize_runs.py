#!/usr/bin/env python3
""" Tabulate finished train_cmo.py runs (``<method>-s<seed>`` folders) and keep their small result files.

    python bench/summarize_runs.py ../runs/cifar10_lt_mini --copy-to docs/results/cifar10_lt_mini

Prints (and with ``--copy-to`` writes ``table.md``) a Markdown table of the final-epoch top-1,
head / middle / tail and per-class accuracy per method and seed, the mean over seeds, and the gain
of each "+ CMO" method over the same method without CMO, and the time and peak memory of each run.
``--copy-to`` also copies each run's results.json, summary.csv, args.yaml and per-class CSV (a few KB
each) and draws ``per_class_<method>.png``: per-class accuracy of each method with and without CMO
(mean over seeds) against the training images per class.
"""
import argparse
import json
import re
import shutil
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

from common import run_name  # (also puts the repo on sys.path)
from timm_cmo.plot import plot_per_class_accuracy  # noqa: E402

KEEP = ('results.json', 'summary.csv', 'per_class_accuracy.csv', 'args.yaml')
NAMES = {'ce': 'CE', 'ce_drw': 'CE-DRW', 'ldam_drw': 'LDAM-DRW', 'bs': 'BS'}


def label(method: str) -> str:
    base = method[:-4] if method.endswith('_cmo') else method
    return NAMES.get(base, base) + (' + CMO' if method.endswith('_cmo') else '')


def load_runs(root: Path) -> Dict[str, Dict[int, dict]]:
    runs = defaultdict(dict)
    for res in sorted(root.glob('*/results.json')):
        m = re.fullmatch(r'(.+)-s(\d+)', res.parent.name)
        if m:
            runs[m.group(1)][int(m.group(2))] = json.loads(res.read_text())
    return runs


def fmt(v) -> str:
    return '–' if v is None else f'{v:.1f}'


def table(runs: Dict[str, Dict[int, dict]]) -> List[str]:
    order = sorted(runs, key=lambda m: (list(NAMES).index(m.replace('_cmo', '')) if m.replace('_cmo', '') in NAMES
                                        else 99, m.endswith('_cmo')))
    any_run = next(iter(next(iter(runs.values())).values()))
    names = any_run['class_names']
    counts = any_run['dataset']['class_counts']
    lines = [
        '| method | seed | top-1 | head | middle | tail | ' + ' | '.join(f'{n} ({c})' for n, c in zip(names, counts))
        + ' | paper (recipe target) |',
        '|---|---|---|---|---|---|' + '---|' * len(names) + '---|',
    ]
    means = {}
    for method in order:
        seeds = runs[method]
        for seed, r in sorted(seeds.items()):
            m = r['metrics']
            lines.append(f'| {label(method)} | {seed} | {fmt(m["top1"])} | {fmt(m["head"])} | {fmt(m["middle"])} | '
                         f'{fmt(m["tail"])} | ' + ' | '.join(fmt(a) for a in r['per_class']['top1'])
                         + f' | {fmt(r.get("paper_top1"))} |')
        keys = ('top1', 'head', 'middle', 'tail')
        means[method] = {k: statistics.mean(r['metrics'][k] for r in seeds.values()) for k in keys}
        means[method]['seeds'] = sorted(seeds)
        if len(seeds) > 1:
            per_class = mean_per_class(seeds)
            lines.append(f'| **{label(method)}** | mean of {len(seeds)} | **{fmt(means[method]["top1"])}** | '
                         f'{fmt(means[method]["head"])} | {fmt(means[method]["middle"])} | {fmt(means[method]["tail"])} | '
                         + ' | '.join(fmt(a) for a in per_class) + ' | |')
    lines += ['', '| CMO gain (with minus without, mean over common seeds) | top-1 | head | middle | tail |',
              '|---|---|---|---|---|']
    for method in order:
        base = method[:-4] if method.endswith('_cmo') else None
        if base and base in runs:
            common = sorted(set(runs[method]) & set(runs[base]))
            if not common:
                continue
            gains = {k: statistics.mean(runs[method][s]['metrics'][k] - runs[base][s]['metrics'][k] for s in common)
                     for k in ('top1', 'head', 'middle', 'tail')}
            lines.append(f'| {label(method)} vs {label(base)} (seeds {", ".join(map(str, common))}) | '
                         + ' | '.join(f'{gains[k]:+.1f}' for k in ('top1', 'head', 'middle', 'tail')) + ' |')
    lines += ['', '| run | wall time (min) | peak RSS (MiB) | device |', '|---|---|---|---|']
    for method in order:
        for seed, r in sorted(runs[method].items()):
            res = r.get('resources') or {}
            resumed = ' (after resume: last part only)' if '--resume' in r.get('command', '') else ''
            rss = res.get('peak_rss_mib')
            lines.append(f'| {run_name(method, seed)} | {fmt(res.get("wall_min"))}{resumed} | '
                         f'{"–" if rss is None else f"{rss:,}"} | {res.get("device", "–")} |')
    return lines


def mean_per_class(seeds: Dict[int, dict]) -> List[float]:
    return [statistics.mean(vals) for vals in zip(*(r['per_class']['top1'] for r in seeds.values()))]


def plot_pairs(runs: Dict[str, Dict[int, dict]], out: Path, title: str = '') -> List[Path]:
    """One PNG per method: per-class accuracy without and with CMO, each the mean over its seeds."""
    paths = []
    for base in sorted(m for m in runs if not m.endswith('_cmo')):
        series = {}
        for method in (base, base + '_cmo'):
            if method in runs:
                seeds = runs[method]
                series[f'{label(method)} ({len(seeds)} seed{"s" if len(seeds) > 1 else ""})'] = mean_per_class(seeds)
        any_run = next(iter(runs[base].values()))
        path = out / f'per_class_{base}.png'
        plot_per_class_accuracy(path, series, any_run['dataset']['class_counts'], any_run['class_names'],
                                title=f'{title}{" " if title else ""}{" vs ".join(series)}')
        paths.append(path)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('runs', help='folder holding the <method>-s<seed> run folders')
    p.add_argument('--copy-to', default='', help='keep the small result files, table.md and the PNGs here')
    p.add_argument('--title', default='', help='prefix of the plot titles, e.g. "mini CIFAR-10-LT:"')
    args = p.parse_args(argv)
    root = Path(args.runs)
    runs = load_runs(root)
    if not runs:
        raise SystemExit(f'No finished runs (<method>-s<seed>/results.json) under {root}')
    lines = table(runs)
    print('\n'.join(lines))
    if args.copy_to:
        out = Path(args.copy_to)
        for method, seeds in runs.items():
            for seed in seeds:
                src = root / run_name(method, seed)
                dst = out / src.name
                dst.mkdir(parents=True, exist_ok=True)
                for name in KEEP:
                    if (src / name).is_file():
                        shutil.copy2(src / name, dst / name)
        (out / 'table.md').write_text('\n'.join(lines) + '\n')
        plot_pairs(runs, out, args.title)


if __name__ == '__main__':
    main()
