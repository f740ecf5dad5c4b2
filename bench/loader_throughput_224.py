""" Loader throughput at ImageNet resolution (224 px): timm's plain loader vs the CMO loader vs the paper's two
loaders, with Pillow's and simplejpeg's JPEG decoding.

The data is a long-tailed folder of ImageNet-sized baseline JPEGs made offline from the CIFAR-10 tar
(``--make-data``, skipped when the folder already holds the same set): 100 classes on the exponential
profile with rho = 256 (ImageNet-LT's n_max / n_min = 1280 / 5), the largest class ``--n-max`` images
(default 256: 4,635 images), 500 x 375 and (every fourth) 375 x 500 pixels, quality 90 with 4:2:0
chroma (Pillow's default), each a CIFAR image upsampled (bicubic) plus seeded multi-scale grain so the
files hold about 0.59 bytes per pixel (~108 KiB), as ImageNet's do. The loaders use timm's ImageNet
training transform (RandomResizedCrop 224, bilinear; horizontal flip; no colour jitter unless
``--color-jitter``) and timm's prefetcher (uint8 fast collate, normalisation in the main process, here
on the CPU):

* ``timm``: ``timm.data.create_loader`` over timm's own ``ImageDataset`` (Pillow decoding).
* ``plain``: ``create_cmo_loader(cmo=False)`` over ``create_lt_dataset``: the plugin's plain path, with
  simplejpeg decoding (when installed).
* ``cmo_pillow``: ``create_cmo_loader(cmo=True, cmo_prob=0.5)`` decoding with Pillow (``fast_decode=False``):
  the CMO loader before simplejpeg.
* ``cmo``: the same with simplejpeg decoding (the default where it is installed).
* ``two_loader``: the paper code's approach over timm's ``ImageDataset`` (Pillow): a second loader with
  ``WeightedRandomSampler(n_k^-1)``, a foreground batch at every step, ``CMOMixup(prob=0.5)``.

Every loader first reads ``--warmup-batches`` batches (starting its persistent workers), then runs
``--repeats`` timed full epochs, interleaved with the other loaders (the order rotates every repeat;
repeat r is epoch r + 1 for every loader, so both CMO loaders mix the same batches); the median is
reported per ``--workers`` value. Image reads are counted as in ``loader_throughput.py``.

The decode share of a loader's time: its reads per second times the seconds one decode takes (measured
on ``--profile-images`` of the files in this process, by CPU time) divided by the number of decoding
processes (``max(1, workers)``). The profile also times the rest of timm's transform and what
resizing only the pasted box of a foreground would save (the bound behind not planning the box).

    python bench/loader_throughput_224.py --make-only   # once: the folder (~500 MB; untimed, any load)
    python bench/loader_throughput_224.py --workers 0 2 --repeats 3
"""
import argparse
import io
import json
import os
import random
import statistics
import tarfile
import time
from typing import Dict, List, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageDataset, create_loader

from common import REPO, default_data_dir, report_header, write_json  # noqa: E402  (also puts the repo on sys.path)
from loader_throughput import CountingDataset, CountReads, TwoLoaders, run_epoch  # noqa: E402

from timm_cmo.data import create_cmo_loader, create_lt_dataset, long_tail_counts, rand_bbox  # noqa: E402
from timm_cmo.data import decode  # noqa: E402
from timm_cmo.data.decode import fast_decode_available, read_image  # noqa: E402
from timm_cmo.files import write_text_atomic  # noqa: E402

CPU = torch.device('cpu')
INPUT_SIZE = (3, 224, 224)
LOADERS = ('timm', 'plain', 'cmo_pillow', 'cmo', 'two_loader')
FOLDER_VERSION = 1
LANDSCAPE, PORTRAIT = (500, 375), (375, 500)
# loader -> decoder: which decode time its reads cost in the decode share
DECODER = dict(timm='pillow', plain='fast', cmo_pillow='pillow', cmo='fast', two_loader='pillow')


class CountingImageDataset(CountReads, ImageDataset):
    """timm's ImageDataset counting its image reads."""


# ---------------------------------------------------------------- the data

def synth_image(src: Image.Image, size: Tuple[int, int], rng: np.random.Generator, grain: float = 20.) -> Image.Image:
    """An ImageNet-sized photo-like image from a small one: bicubic upsampling to ``size`` (W, H) plus grain.

    The grain is seeded Gaussian noise at 1, 2, 4 and 8 pixel scales on the luma (amplitudes ``grain``
    x 1, 0.8, 0.6, 0.5) and at 4 pixels on the colours (x 0.3), so a quality-90 JPEG holds about as many
    bytes per pixel as ImageNet's.
    """
    w, h = size
    a = np.asarray(src.convert('RGB').resize((w, h), Image.BICUBIC), dtype=np.float32)
    luma = np.zeros((h, w), np.float32)
    for scale, amp in ((1, 1.0), (2, 0.8), (4, 0.6), (8, 0.5)):
        g = rng.standard_normal((-(-h // scale), -(-w // scale)), dtype=np.float32)
        luma += amp * np.repeat(np.repeat(g, scale, 0), scale, 1)[:h, :w]
    chroma = rng.standard_normal((-(-h // 4), -(-w // 4), 3), dtype=np.float32)
    chroma = np.repeat(np.repeat(chroma, 4, 0), 4, 1)[:h, :w]
    a += grain * luma[..., None] + 0.3 * grain * chroma
    return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))


def folder_spec(args) -> Dict:
    """What the generated folder holds (written to its manifest.json; a folder with another spec is remade)."""
    return dict(version=FOLDER_VERSION, source=os.path.basename(args.tar), n_max=args.n_max, num_classes=args.num_classes,
                imb_ratio=args.imb_ratio, quality=args.quality, grain=args.grain, seed=args.seed)


def make_folder(root: str, tar: str, spec: Dict) -> Dict:
    """Write the long-tailed JPEG folder ``root/c<class>/<n>.jpg`` (unless it holds ``spec`` already);
    returns its manifest (spec, class counts, images, bytes per pixel, seconds)."""
    manifest_path = os.path.join(root, 'manifest.json')
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get('spec') == spec:
            return manifest
    t0 = time.perf_counter()
    counts = long_tail_counts(spec['n_max'], spec['num_classes'], spec['imb_ratio'])
    if min(counts) < 1:
        raise ValueError(f'--n-max {spec["n_max"]} leaves classes without images at rho {spec["imb_ratio"]:g}')
    rng = np.random.default_rng(spec['seed'])
    with tarfile.open(tar) as tf:
        sources = [m for m in tf.getmembers() if m.isfile() and m.name.lower().endswith(('.jpg', '.jpeg', '.png'))]
        if not sources:
            raise ValueError(f'{tar} holds no images')
        i = 0
        total_bytes = total_px = 0
        for c, n in enumerate(counts):
            os.makedirs(os.path.join(root, f'c{c:03d}'), exist_ok=True)
            for k in range(n):
                with Image.open(tf.extractfile(sources[i % len(sources)])) as src:
                    size = PORTRAIT if i % 4 == 3 else LANDSCAPE
                    img = synth_image(src, size, rng, spec['grain'])
                buf = io.BytesIO()
                img.save(buf, 'JPEG', quality=spec['quality'])
                data = buf.getvalue()
                with open(os.path.join(root, f'c{c:03d}', f'{k:04d}.jpg'), 'wb') as f:
                    f.write(data)
                total_bytes += len(data)
                total_px += size[0] * size[1]
                i += 1
    manifest = dict(spec=spec, class_counts=counts, images=i, bytes_per_pixel=total_bytes / total_px,
                    mean_kib=total_bytes / i / 1024, make_s=time.perf_counter() - t0)
    write_text_atomic(manifest_path, json.dumps(manifest, indent=1))
    return manifest


def image_files(root: str) -> List[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith('.jpg'))


# ---------------------------------------------------------------- the loaders

def loader_kwargs(args, workers: int) -> Dict:
    return dict(input_size=INPUT_SIZE, batch_size=args.batch_size, is_training=True, num_workers=workers, device=CPU,
                mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, color_jitter=args.color_jitter or None)


def plugin_dataset(root: str, fast_decode: bool) -> CountingDataset:
    src = create_lt_dataset('', root, fast_decode=fast_decode)
    return CountingDataset(src.dataset, indices=src.indices, num_classes=src.num_classes, classes=src.classes,
                           fast_decode=fast_decode)


def build(name: str, root: str, args, workers: int):
    """(loader, datasets whose reads count) for one of LOADERS."""
    kw = loader_kwargs(args, workers)
    fast = fast_decode_available()
    if name == 'timm':
        ds = CountingImageDataset(root)
        return create_loader(ds, **kw), [ds]
    if name in ('plain', 'cmo', 'cmo_pillow'):
        ds = plugin_dataset(root, fast_decode=fast and name != 'cmo_pillow')
        return create_cmo_loader(ds, **kw, cmo=name != 'plain', cmo_prob=0.5, cmo_start_epoch=-1, seed=args.seed), [ds]
    if name == 'two_loader':
        bg, fg = CountingImageDataset(root), CountingImageDataset(root)
        return TwoLoaders(bg, fg, args.batch_size, workers, prob=0.5, seed=args.seed, loader_kw=kw, pad_crop=False), [bg, fg]
    raise ValueError(name)


def time_loaders(root: str, args, workers: int) -> Dict:
    loaders = {name: build(name, root, args, workers) for name in LOADERS}
    for name, (loader, datasets) in loaders.items():  # warm-up: a few batches each (starts persistent workers)
        for i, _ in enumerate(loader):
            if i + 1 >= args.warmup_batches:
                break
    runs = {name: [] for name in LOADERS}
    for rep in range(args.repeats):
        order = LOADERS[rep % len(LOADERS):] + LOADERS[:rep % len(LOADERS)]
        for name in order:
            loader, datasets = loaders[name]
            dt, n, reads = run_epoch(loader, datasets, rep + 1)
            runs[name].append(dict(seconds=dt, images=n, reads=reads, images_per_s=n / dt))
            print(f'workers={workers} rep={rep} {name:>10}: {n / dt:7.1f} img/s  ({dt:.2f} s, {n} images, '
                  f'{reads / n:.3f} reads/sample)', flush=True)
    summary = {}
    for name in LOADERS:
        r = runs[name]
        summary[name] = dict(images_per_s=statistics.median(x['images_per_s'] for x in r),
                             reads_per_sample=sum(x['reads'] for x in r) / sum(x['images'] for x in r), runs=r)
    del loaders
    return summary


# ---------------------------------------------------------------- the profile

def profile(files: List[str], n: int, seed: int) -> Dict:
    """Per-image CPU milliseconds (mean over 3 passes over ``n`` files, the steps interleaved) of: Pillow's
    decode, simplejpeg's (to a PIL image, and libjpeg-turbo's part alone), the rest of timm's transform
    (random-resized crop 224 + flip + to tensor), the crop's resize alone, and resizing only the CutMix box
    of a foreground (a Beta(1, 1) lambda), with how far its pixels are from the full resize's."""
    from timm.data import create_transform
    rng = np.random.default_rng(seed)
    random.seed(seed)
    step = max(1, len(files) // n)
    datas = []
    for path in files[::step][:n]:
        with open(path, 'rb') as f:
            datas.append(f.read())
    transform = create_transform(INPUT_SIZE[1:], is_training=True, use_prefetcher=True, color_jitter=None)
    rrc = transform.transforms[0]
    imgs = [read_image(d, 'RGB', fast=False) for d in datas]
    params = [rrc.get_params(im, rrc.scale, rrc.ratio) for im in imgs]
    crops = [im.crop((j, i, j + w, i + h)) for im, (i, j, h, w) in zip(imgs, params)]
    boxes = [rand_bbox(INPUT_SIZE[1:], float(rng.beta(1., 1.)), rng) for _ in imgs]
    out = INPUT_SIZE[1:][::-1]

    def box_resize(k):
        y0, y1, x0, x1 = boxes[k]
        if y1 <= y0 or x1 <= x0:
            return None
        w, h = crops[k].size
        sx, sy = w / out[0], h / out[1]
        return crops[k].resize((x1 - x0, y1 - y0), Image.BILINEAR, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy))

    steps = dict(
        decode_pillow=lambda k: read_image(datas[k], 'RGB', fast=False),
        decode_fast=lambda k: read_image(datas[k], 'RGB', fast=True),
        decode_libjpeg=lambda k: decode.simplejpeg.decode_jpeg(datas[k], 'RGB'),  # libjpeg-turbo alone, no PIL image
        transform=lambda k: transform(imgs[k]),
        resize=lambda k: crops[k].resize(out, Image.BILINEAR),
        resize_box=box_resize,
    )
    if not fast_decode_available():
        del steps['decode_fast'], steps['decode_libjpeg']
    times = {name: [] for name in steps}
    for _ in range(3):  # interleaved image by image, so a busy moment of the machine hits every step alike
        for k in range(len(datas)):
            for name, fn in steps.items():
                t0 = time.thread_time()
                fn(k)
                times[name].append(time.thread_time() - t0)
    result = {name + '_ms': 1e3 * float(np.mean(t)) for name, t in times.items()}
    identical = sum(np.array_equal(np.asarray(read_image(d, 'RGB', fast=True)), np.asarray(im)) for d, im in zip(datas, imgs))
    diffs = []
    for k in range(len(datas)):
        part = box_resize(k)
        if part is not None:
            y0, y1, x0, x1 = boxes[k]
            full = np.asarray(crops[k].resize(out, Image.BILINEAR), dtype=np.int16)[y0:y1, x0:x1]
            diffs.append(np.abs(full - np.asarray(part, dtype=np.int16)))
    result.update(images=len(datas), fast_decode_identical=int(identical),
                  box_max_abs_diff=int(max(d.max() for d in diffs)) if diffs else 0,
                  box_mean_abs_diff=float(np.mean(np.concatenate([d.ravel() for d in diffs]))) if diffs else 0.)
    return result


def decode_share(summary: Dict, prof: Dict, workers: int) -> None:
    """Add ``decode_share`` to every loader of ``summary`` (see the module docstring)."""
    for name in LOADERS:
        s = summary[name]
        ms = prof.get(f'decode_{DECODER[name]}_ms', prof['decode_pillow_ms'])
        s['decode_share'] = s['images_per_s'] * s['reads_per_sample'] * ms / 1e3 / max(1, workers)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data-dir', default=default_data_dir(), help='Folder with CIFAR-10 train.tar (or the tar itself)')
    p.add_argument('--make-data', default=str(REPO / 'output' / 'bench_imagenet_lt'), metavar='DIR',
                   help='Where the generated JPEG folder is (made when missing or different)')
    p.add_argument('--make-only', action='store_true', help='Make the folder (if needed) and stop: nothing is timed')
    p.add_argument('--n-max', type=int, default=256, help='Images of the largest class (256: 4,635 images; 512: 9,315)')
    p.add_argument('--num-classes', type=int, default=100)
    p.add_argument('--imb-ratio', type=float, default=256.)
    p.add_argument('--quality', type=int, default=90)
    p.add_argument('--grain', type=float, default=20.)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--workers', type=int, nargs='+', default=[0, 2])
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--warmup-batches', type=int, default=4)
    p.add_argument('--color-jitter', type=float, default=0., help="timm's --color-jitter (0: none, as the issue's transform)")
    p.add_argument('--profile-images', type=int, default=200)
    p.add_argument('--threads', type=int, default=1,
                   help='torch threads of the main process (default 1: the loader workers need the cores)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default=str(REPO / 'bench' / 'results' / 'loader_throughput_224.json'))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    args.tar = args.data_dir if args.data_dir.endswith('.tar') else os.path.join(args.data_dir, 'train.tar')

    results = dict(report_header(__file__, argv), batch_size=args.batch_size, repeats=args.repeats,
                   fast_decode=fast_decode_available(), workers={})
    info = results['machine']
    print(f'# {info}', flush=True)
    t_start = time.perf_counter()
    manifest = make_folder(args.make_data, args.tar, folder_spec(args))
    results['data'] = dict(folder=args.make_data, **{k: v for k, v in manifest.items() if k != 'class_counts'})
    print(f'# data: {manifest["images"]} images in {args.make_data}, {manifest["bytes_per_pixel"]:.3f} bytes/pixel, '
          f'{manifest["mean_kib"]:.0f} KiB on average', flush=True)
    if args.make_only:
        return results
    prof = profile(image_files(args.make_data), args.profile_images, args.seed)
    results['profile'] = prof
    shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in prof.items()}
    print(f'# profile (ms per image, CPU time): {json.dumps(shown)}', flush=True)
    for workers in args.workers:
        summary = time_loaders(args.make_data, args, workers)
        decode_share(summary, prof, workers)
        ips = {name: summary[name]['images_per_s'] for name in LOADERS}
        summary['ratios'] = dict(cmo_vs_timm=ips['cmo'] / ips['timm'], cmo_pillow_vs_timm=ips['cmo_pillow'] / ips['timm'],
                                 plain_vs_timm=ips['plain'] / ips['timm'], cmo_vs_two_loader=ips['cmo'] / ips['two_loader'],
                                 cmo_pillow_vs_two_loader=ips['cmo_pillow'] / ips['two_loader'])
        summary['goals_met'] = dict(cmo_vs_timm=summary['ratios']['cmo_vs_timm'] >= 0.85,
                                    plain_vs_timm=summary['ratios']['plain_vs_timm'] >= 1.2)
        results['workers'][str(workers)] = summary
    results['wall_s'] = time.perf_counter() - t_start

    print()
    print(f'224 px, {manifest["images"]} images (rho {args.imb_ratio:g}), batch {args.batch_size}, median of '
          f'{args.repeats} epochs, {info["cpu"]}, {info["cores"]} cores, '
          f'simplejpeg {"on" if results["fast_decode"] else "missing"}')
    print('| workers | ' + ' | '.join(f'{n} img/s' for n in LOADERS) + ' | CMO/timm (before -> after) | plain/timm '
          '| CMO/two-loader (before -> after) | reads/sample CMO | decode share timm / plain / CMO before -> after |')
    print('|---' * (len(LOADERS) + 6) + '|')
    for workers, s in results['workers'].items():
        r = s['ratios']
        print(f'| {workers} | ' + ' | '.join(f'{s[n]["images_per_s"]:.0f}' for n in LOADERS)
              + f' | {r["cmo_pillow_vs_timm"]:.2f} -> {r["cmo_vs_timm"]:.2f} | {r["plain_vs_timm"]:.2f} '
              f'| {r["cmo_pillow_vs_two_loader"]:.2f} -> {r["cmo_vs_two_loader"]:.2f} | {s["cmo"]["reads_per_sample"]:.2f} '
              f'| {s["timm"]["decode_share"]:.0%} / {s["plain"]["decode_share"]:.0%} / '
              f'{s["cmo_pillow"]["decode_share"]:.0%} -> {s["cmo"]["decode_share"]:.0%} |')
    write_json(args.out, results)
    print(f'\nwrote {args.out} ({results["wall_s"]:.0f} s)')
    return results


if __name__ == '__main__':
    main()
