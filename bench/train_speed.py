#!/usr/bin/env python3
""" Training speed of the CIFAR-10-LT ResNet-32 recipe: ordinary loader path vs --data-on-device, and models.

Times whole training epochs of ``train_cmo.train_one_epoch`` (ResNet-32 or ``--models``, e.g. RIDE-ResNet-32
with its RIDE loss, batch 128, the recipe's SGD), with CMO off and on (CMO active from the first epoch),
for each data path, and reports
the median seconds per timed epoch, training images per second, the one-off decode time of the fast path, the
projected 200-epoch time, and the peak resident memory of the process.

    python bench/train_speed.py --data-dir ../shared/data/cifar10 --threads 2 --workers 2 \\
        --out bench/results/train_speed_cpu.json
"""
import argparse
import json
import statistics
import time
from types import SimpleNamespace

from common import report_header, write_json  # noqa: E402  (also puts the repo on sys.path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', required=True)
    p.add_argument('--imb-ratio', type=float, default=100)
    p.add_argument('--imb-max', type=int, default=None)
    p.add_argument('--paths', nargs='+', default=['ordinary', 'fast'], choices=['ordinary', 'fast'])
    p.add_argument('--cmo', nargs='+', default=['off', 'on'], choices=['off', 'on'])
    p.add_argument('--epochs', type=int, default=3, help='epochs timed per setting (after one warm-up epoch)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--workers', type=int, default=2, help='loader workers of the ordinary path')
    p.add_argument('--device', default='cuda' if __import__('torch').cuda.is_available() else 'cpu')
    p.add_argument('--amp', action='store_true', help='bf16 autocast')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--compile', nargs='+', default=['off'], choices=['off', 'on'],
                   help='torch.compile the model (off, on, or both: off on)')
    p.add_argument('--models', nargs='+', default=['resnet32_cifar'],
                   help='models to time (a multi-expert RIDE model trains with the ride loss)')
    p.add_argument('--out', default='', help='write the figures as JSON here')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    from contextlib import suppress
    from functools import partial

    import timm
    from timm.optim import create_optimizer_v2

    import timm_cmo  # noqa: F401  (registers resnet32_cifar)
    import train_cmo
    from timm_cmo.data import CMOConfig, create_cmo_loader, create_lt_dataset
    from timm_cmo.data.device_loader import DeviceLoader, decode_to_tensor
    from timm_cmo.losses import create_loss
    from timm_cmo.results import peak_rss_mib

    device = torch.device(args.device)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    ds = create_lt_dataset('', args.data_dir, imb_ratio=args.imb_ratio, imb_max=args.imb_max)
    amp = partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16) if args.amp else suppress
    run_args = SimpleNamespace(channels_last=args.channels_last, smoothing=0.0, clip_grad=None, clip_mode='norm',
                               log_interval=10 ** 9, rank=0, world_size=1, distributed=False)
    decode_s = None
    settings = []
    for path in args.paths:
        if path == 'fast':
            t0 = time.time()
            images, targets = decode_to_tensor(ds, (32, 32), device)
            decode_s = time.time() - t0
        for model_name, cmo, compiled in [(m, c, k) for m in args.models for c in args.cmo for k in args.compile]:
            if path == 'fast':
                loader = DeviceLoader(images, targets, 128, mean, std, channels_last=args.channels_last, num_classes=10,
                                      cmo=CMOConfig(start_epoch=-1) if cmo == 'on' else None, seed=0)
            else:
                loader = create_cmo_loader(
                    ds, (3, 32, 32), 128, is_training=True, device=device, num_workers=args.workers, mean=mean,
                    std=std, color_jitter=None, train_crop_mode='pad', persistent_workers=True, cmo=cmo == 'on',
                    cmo_start_epoch=-1, num_classes=10, seed=0)
            torch.manual_seed(0)
            model = timm.create_model(model_name, num_classes=10).to(device)
            ride = hasattr(model, 'num_experts')
            if ride:  # the ride loss takes every expert's logits, as train_cmo.py trains it
                model.set_expert_training(True)
            if args.channels_last:
                model = model.to(memory_format=torch.channels_last)
            if compiled == 'on':
                model = torch.compile(model)
            opt = create_optimizer_v2(model, opt='momentum', lr=0.1, momentum=0.9, weight_decay=2e-4,
                                      filter_bias_and_bn=False)
            loss_fn = create_loss('ride' if ride else 'ce', ds.class_counts, **({'epochs': 200} if ride else {})).to(device)
            settings.append(dict(model_name=model_name, compiled=compiled, path=path, cmo=cmo, loader=loader, model=model,
                                 opt=opt, loss_fn=loss_fn, times=[]))

    # one warm-up epoch each, then the timed epochs interleaved across the settings (drift hits all alike)
    for epoch in range(args.epochs + 1):
        for st in settings:
            st['loader'].set_epoch(epoch)
            if device.type == 'cuda':
                torch.cuda.synchronize()
            t0 = time.time()
            train_cmo.train_one_epoch(epoch, st['model'], st['loader'], st['opt'], st['loss_fn'], run_args, device,
                                      amp_autocast=amp)
            if device.type == 'cuda':
                torch.cuda.synchronize()
            st['times'].append(time.time() - t0)
            print(f"epoch {epoch} {st['model_name']} {st['path']} cmo {st['cmo']} compile {st['compiled']}: "
                  f"{st['times'][-1]:.1f}s", flush=True)
    rows = []
    for st in settings:
        per_epoch = statistics.median(st['times'][1:])  # of an even count: the mean of the middle two
        images_per_epoch = len(st['loader']) * 128
        rows.append(dict(
            model=st['model_name'], compiled=st['compiled'], path=st['path'], cmo=st['cmo'], s_per_epoch=round(per_epoch, 2), epochs_s=[round(t, 2) for t in st['times']],
            images_per_s=round(images_per_epoch / per_epoch, 1),
            projected_200_epochs_min=round((200 * per_epoch + (decode_s if st['path'] == 'fast' else 0)) / 60, 1)))
    report = dict(
        report_header(__file__, argv), device=str(device), threads=args.threads, workers=args.workers,
        train_images=len(ds), decode_s=None if decode_s is None else round(decode_s, 1),
        peak_rss_mib=round(peak_rss_mib(), 0),
        peak_cuda_mib=round(torch.cuda.max_memory_allocated() / 2 ** 20, 0) if device.type == 'cuda' else None,
        rows=rows)
    if args.out:
        write_json(args.out, report)
    print(json.dumps(report, indent=1))


if __name__ == '__main__':
    main()
