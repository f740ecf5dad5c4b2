#!/usr/bin/env python3
""" Tabulate finished train_cmo.py runs (``<method>-s<seed>`` folders) and keep their small result files.

    python bench/summarize_runs.py ../runs/cifar10_lt_mini --copy-to docs/results/cifar10_lt_mini

Prints (and with ``--copy-to`` writes ``table.md``) a Markdown table of the final-epoch top-1,
head / middle / tail, calibration (ECE, MCE, NLL) and per-class accuracy per method and seed, the mean over seeds,
the paper's comparison layout (rows: the base methods CE, CE-DRW, LDAM-DRW, BS, RIDE, Causal Norm; columns: as is,
+ ROS, + Remix, + CMO, + CMO + LAS, + EA, + CMO + EA (RIDE's router stage), + cRT, + LWS, + tau-norm,
+ post-hoc LA and their + CMO forms, where runs exist; with several seeds
each cell lists the per-seed top-1 too), the gain of each variant over its base method (head / middle / tail and
many / medium / few shot, with the top-1 gain of each seed, so a sign that flips between seeds shows),
and the time and peak memory of each run. Methods are named like the recipes:
``<base>[_ros|_remix|_cmo][_las|_crt|_lws|_tau_norm|_post_la]`` (``_tau_norm`` / ``_post_la``: the
``--evaluate --post-hoc`` folders of a run). ``--copy-to`` also copies each run's results.json, summary.csv,
args.yaml, per-class CSV and reliability diagram (a few KB each) and draws ``per_class_<base>.png`` (``--plot-format svg|pdf``):
per-class accuracy of each variant of a base method (mean over seeds) against the training images
per class.
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
from timm_cmo.results import SummaryWriter  # noqa: E402

KEEP = ('results.json', 'summary.csv', 'per_class_accuracy.csv', 'args.yaml', 'reliability.png', 'reliability.svg',
        'reliability.pdf')
NAMES = {'ce': 'CE', 'ce_drw': 'CE-DRW', 'ldam_drw': 'LDAM-DRW', 'bs': 'BS', 'ride': 'RIDE',
         'causal_norm': 'Causal Norm', 'lade': 'LADE', 'ib': 'IB', 'bbn': 'BBN'}
VARIANTS = {'': 'as is', '_ros': '+ ROS', '_remix': '+ Remix', '_mixup': '+ Mixup', '_cutmix': '+ CutMix',
            '_cmo': '+ CMO', '_cmo_mixup': '+ CMO (mixup)', '_cmo_blur': '+ CMO (blur)', '_cmo_jitter': '+ CMO (jitter)',
            '_cmo_las': '+ CMO + LAS', '_router': '+ EA', '_cmo_router': '+ CMO + EA',
            '_crt': '+ cRT', '_lws': '+ LWS', '_tau_norm': '+ tau-norm', '_post_la': '+ post-hoc LA',
            '_cmo_crt': '+ CMO + cRT', '_cmo_lws': '+ CMO + LWS', '_cmo_tau_norm': '+ CMO + tau-norm',
            '_cmo_post_la': '+ CMO + post-hoc LA'}
# EA: RIDE's expert assignment (router stage); '_cmo_<variant>': the CMO paper's Table 12 variants; cRT, LWS:
# Kang et al.'s second stages; tau-norm, post-hoc LA: post-hoc evaluations
RUN_KEYS = ('top1', 'head', 'middle', 'tail', 'ece', 'mce', 'nll')  # per-run table columns
DIGITS = {'nll': 2}  # decimals of a column where 1 is too few (NLL in nats; the rest are %)
GAIN_KEYS = {'top1': 'top-1', 'head': 'head', 'middle': 'middle', 'tail': 'tail',
             'many': 'many (>100)', 'medium': 'medium (20-100)', 'few': 'few (<20)'}


def split(method: str):
    """(base method, variant suffix): ``ce_drw_cmo_las`` -> ``('ce_drw', '_cmo_las')``."""
    for suffix in sorted(VARIANTS, key=len, reverse=True):
        if suffix and method.endswith(suffix):
            return method[:-len(suffix)], suffix
    return method, ''


def label(method: str) -> str:
    base, variant = split(method)
    return NAMES.get(base, base) + (' ' + VARIANTS[variant] if variant else '')


def order_key(method: str):
    base, variant = split(method)
    return (list(NAMES).index(base) if base in NAMES else 99, base, list(VARIANTS).index(variant))


def load_runs(root: Path) -> Dict[str, Dict[int, dict]]:
    runs = defaultdict(dict)
    for res in sorted(root.glob('*/results.json')):
        m = re.fullmatch(r'(.+)-s(\d+)', res.parent.name)
        if m:
            runs[m.group(1)][int(m.group(2))] = dict(json.loads(res.read_text()),
                                                     _summary_csv=res.parent / 'summary.csv')
    return runs


def fmt(v, digits: int = 1, sign: str = '') -> str:
    """``v`` with ``digits`` decimals (``sign='+'``: signed), '–' for a missing value."""
    return '–' if v is None else f'{v:{sign}.{digits}f}'


def table(runs: Dict[str, Dict[int, dict]]) -> List[str]:
    order = sorted(runs, key=order_key)
    any_run = next(iter(next(iter(runs.values())).values()))
    names = any_run['class_names']
    counts = any_run['dataset']['class_counts']
    lines = [
        '| method | seed | top-1 | head | middle | tail | ECE | MCE | NLL | '
        + ' | '.join(f'{n} ({c})' for n, c in zip(names, counts)) + ' | paper (recipe target) |',
        '|---|---|' + '---|' * len(RUN_KEYS) + '---|' * len(names) + '---|',
    ]
    means = {}
    for method in order:
        seeds = runs[method]
        for seed, r in sorted(seeds.items()):
            lines.append(f'| {label(method)} | {seed} | ' + ' | '.join(fmt(r['metrics'].get(k), DIGITS.get(k, 1))
                                                                      for k in RUN_KEYS)
                         + ' | ' + ' | '.join(fmt(a) for a in r['per_class']['top1'])
                         + f' | {fmt(r.get("paper_top1"))} |')
        means[method] = {k: mean_or_none([r['metrics'].get(k) for r in seeds.values()]) for k in RUN_KEYS}
        means[method]['seeds'] = {s: r['metrics']['top1'] for s, r in sorted(seeds.items())}
        if len(seeds) > 1:
            lines.append(f'| **{label(method)}** | mean of {len(seeds)} | **{fmt(means[method]["top1"])}** | '
                         + ' | '.join(fmt(means[method][k], DIGITS.get(k, 1)) for k in RUN_KEYS[1:]) + ' | '
                         + ' | '.join(fmt(a) for a in mean_per_class(seeds)) + ' | |')
    lines += [''] + comparison(runs, means)
    lines += ['', '| gain over the base method (with minus without, mean over common seeds) | '
              + ' | '.join(GAIN_KEYS.values()) + ' | top-1 gain per seed |', '|---|' + '---|' * (len(GAIN_KEYS) + 1)]
    for method in order:
        base = split(method)[0] if split(method)[1] else None
        if base and base in runs:
            common = sorted(set(runs[method]) & set(runs[base]))
            if not common:
                continue
            per_seed = {k: [gain(runs[method][s], runs[base][s], k) for s in common] for k in GAIN_KEYS}
            lines.append(f'| {label(method)} vs {label(base)} (seeds {", ".join(map(str, common))}) | '
                         + ' | '.join(fmt(mean_or_none(per_seed[k]), sign='+') for k in GAIN_KEYS) + ' | '
                         + ', '.join(fmt(g, sign='+') for g in per_seed['top1']) + ' |')
    lines += ['', '| run | wall time (min) | peak RSS (MiB) | device |', '|---|---|---|---|']
    for method in order:
        for seed, r in sorted(runs[method].items()):
            res = r.get('resources') or {}
            wall = fmt(res.get('wall_min'))
            if '--evaluate' in r.get('command', ''):
                wall = f'{wall} (evaluation)'
            elif '--resume' in r.get('command', ''):
                summed = SummaryWriter(r['_summary_csv']).epoch_minutes()  # None without the file or its times
                wall = f'{fmt(summed)} (resumed: epoch times summed)' if summed is not None else \
                    f'{wall} (after resume: last part only)'
            rss = res.get('peak_rss_mib')
            lines.append(f'| {run_name(method, seed)} | {wall} | '
                         f'{"–" if rss is None else f"{rss:,}"} | {res.get("device", "–")} |')
    return lines


def mean_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def gain(run: dict, base: dict, key: str):
    """``run`` minus ``base`` on one metric; None where either lacks it (e.g. an empty shot group)."""
    a, b = run['metrics'].get(key), base['metrics'].get(key)
    return None if a is None or b is None else a - b


def comparison(runs: Dict[str, Dict[int, dict]], means: Dict[str, dict]) -> List[str]:
    """The paper's comparison layout: a row per base method, a column per variant; top-1 (ECE), mean over seeds."""
    bases = sorted({split(m)[0] for m in runs}, key=order_key)
    variants = [v for v in VARIANTS if any(split(m)[1] == v for m in runs)]
    lines = ['| top-1 (ECE), mean over seeds | ' + ' | '.join(VARIANTS[v] for v in variants) + ' |',
             '|---|' + '---|' * len(variants)]
    for base in bases:
        cells = []
        for v in variants:
            m = means.get(base + v)
            cells.append('–' if m is None else f'{fmt(m["top1"])} ({fmt(m["ece"])})' + (
                f' [seeds: {", ".join(fmt(t) for t in m["seeds"].values())}]' if len(m['seeds']) > 1 else ''))
        lines.append(f'| {NAMES.get(base, base)} | ' + ' | '.join(cells) + ' |')
    return lines


def mean_per_class(seeds: Dict[int, dict]) -> List[float]:
    return [statistics.mean(vals) for vals in zip(*(r['per_class']['top1'] for r in seeds.values()))]


def plot_pairs(runs: Dict[str, Dict[int, dict]], out: Path, title: str = '', fmt: str = 'png') -> List[Path]:
    """One PNG per base method: per-class accuracy of each of its variants (as is, ROS, Remix, CMO, CMO + LAS),
    each the mean over its seeds."""
    paths = []
    for base in sorted({split(m)[0] for m in runs}, key=order_key):
        series = {}
        for method in (base + v for v in VARIANTS):
            if method in runs:
                seeds = runs[method]
                series[f'{label(method)} ({len(seeds)} seed{"s" if len(seeds) > 1 else ""})'] = mean_per_class(seeds)
        any_run = next(iter(runs[next(base + v for v in VARIANTS if base + v in runs)].values()))
        path = out / f'per_class_{base}.{fmt}'
        plot_per_class_accuracy(path, series, any_run['dataset']['class_counts'], any_run['class_names'],
                                title=f'{title}{" " if title else ""}{" vs ".join(series)}')
        paths.append(path)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('runs', help='folder holding the <method>-s<seed> run folders')
    p.add_argument('--copy-to', default='', help='keep the small result files, table.md and the PNGs here')
    p.add_argument('--title', default='', help='prefix of the plot titles, e.g. "mini CIFAR-10-LT:"')
    p.add_argument('--plot-format', default='png', choices=('png', 'svg', 'pdf'), help='file format of the plots')
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
        plot_pairs(runs, out, args.title, args.plot_format)


if __name__ == '__main__':
    main()
