""" Cost of the CMO mixing step vs one ResNet-32 training step (CIFAR, batch 128, 32x32).

The mixing is timed as ``CMOLoader.__iter__`` runs it on a collated batch (B backgrounds + B
foregrounds, normalised float32, labels (2, B)): split, ``CMOMixup.mix`` (host-drawn lambda and
box, in-place paste, soft targets). Unmixed batches of the CMO loader still get soft targets
(``CMOMixup.target``); the expected cost per step at ``cmo_prob=0.5`` is the mean of the two.
The training step is ``timm.create_model('resnet32_cifar', num_classes=10)``: forward, cross
entropy on the soft targets, backward, SGD step (momentum 0.9, weight decay 2e-4).

Runs on the CPU (torch threads as ``--threads``), and also on CUDA when available (timed with
``torch.cuda.synchronize()``).

    python bench/mixing_cost.py --threads 2 1
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import timm

from common import REPO, report_header, write_json  # noqa: E402  (also puts the repo on sys.path)

import timm_cmo  # noqa: E402,F401  (registers resnet32_cifar)
from timm_cmo.data import CMOMixup  # noqa: E402


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_blocks(fn, device, iters, blocks):
    """Median over ``blocks`` of the mean ms per call of ``fn`` over ``iters`` calls."""
    means = []
    for _ in range(blocks):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        means.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(means), means


def bench_device(device, batch_size, num_classes, mix_iters, step_iters, warmup, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * batch_size, 3, 32, 32, generator=g).to(device)  # backgrounds then foregrounds
    y = torch.randint(0, num_classes, (2, batch_size), generator=g).to(device)
    res = {}
    for mode in ('batch', 'elem'):
        mixer = CMOMixup(num_classes, prob=1.0, beta=1.0, mode=mode, seed=seed)

        def mix():  # as CMOLoader.__iter__ on a mixed batch
            b = y.shape[1]
            x_b, x_f = x[:b], x[b:]
            y_b, y_f = y[0], y[1]
            return mixer.mix(x_b, y_b, x_f, y_f)

        for _ in range(warmup * 10):
            mix()
        res[f'mix_{mode}_ms'], _ = time_blocks(mix, device, mix_iters, 5)

    mixer = CMOMixup(num_classes, prob=1.0, beta=1.0, mode='batch', seed=seed)
    y_b = y[0]
    for _ in range(warmup * 10):
        mixer.target(y_b)
    res['unmixed_target_ms'], _ = time_blocks(lambda: mixer.target(y_b), device, mix_iters, 5)
    res['expected_prob0.5_ms'] = 0.5 * res['mix_batch_ms'] + 0.5 * res['unmixed_target_ms']

    torch.manual_seed(seed)
    model = timm.create_model('resnet32_cifar', num_classes=num_classes).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    xb = x[:batch_size].clone()
    _, target, _ = mixer.mix(xb, y[0], x[batch_size:], y[1])

    def step():
        out = model(xb)
        loss = F.cross_entropy(out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    res['train_step_ms'], res['train_step_blocks_ms'] = time_blocks(step, device, max(1, step_iters // 5), 5)
    res['ratio_mixed_batch'] = res['mix_batch_ms'] / res['train_step_ms']
    res['ratio_prob0.5'] = res['expected_prob0.5_ms'] / res['train_step_ms']
    res['ratio_elem'] = res['mix_elem_ms'] / res['train_step_ms']
    res['goal_met'] = res['ratio_mixed_batch'] < 0.02
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--threads', type=int, nargs='+', default=[2], help='torch CPU threads (one CPU run per value)')
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--num-classes', type=int, default=10)
    p.add_argument('--mix-iters', type=int, default=400, help='mixing calls per timed block (5 blocks)')
    p.add_argument('--step-iters', type=int, default=25, help='training steps timed (5 blocks)')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--no-cuda', action='store_true')
    p.add_argument('--out', default=str(REPO / 'bench' / 'results' / 'mixing_cost.json'))
    args = p.parse_args(argv)
    results = dict(report_header(__file__, argv), batch_size=args.batch_size,
                   devices={})
    print(f'# {results["machine"]}', flush=True)
    runs = [(f'cpu, {t} thread{"s" if t > 1 else ""}', torch.device('cpu'), t) for t in args.threads]
    if torch.cuda.is_available() and not args.no_cuda:
        runs.append((f'cuda ({torch.cuda.get_device_name(0)})', torch.device('cuda'), max(args.threads)))
    for name, device, threads in runs:
        torch.set_num_threads(threads)
        r = bench_device(device, args.batch_size, args.num_classes, args.mix_iters, args.step_iters, args.warmup, args.seed)
        r['torch_threads'] = threads
        results['devices'][name] = r
        print(f'{name}: mix (batch mode, mixed batch) {r["mix_batch_ms"]:.3f} ms, unmixed soft target '
              f'{r["unmixed_target_ms"]:.3f} ms, at prob 0.5 {r["expected_prob0.5_ms"]:.3f} ms, elem mode '
              f'{r["mix_elem_ms"]:.3f} ms | ResNet-32 step {r["train_step_ms"]:.1f} ms | ratio mixed '
              f'{100 * r["ratio_mixed_batch"]:.3f} % (goal < 2 %), at prob 0.5 {100 * r["ratio_prob0.5"]:.3f} %, '
              f'elem {100 * r["ratio_elem"]:.3f} %', flush=True)
    write_json(args.out, results)
    print(f'wrote {args.out}')
    return results


if __name__ == '__main__':
    main()
