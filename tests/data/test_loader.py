"""The CMO loader: timm parity, foreground/background distributions, variants, window, decodes, torchrun."""
import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from timm.data import ImageDataset, create_loader

from timm_cmo.data import LongTailDataset, class_sampling_probs, create_cmo_loader, create_lt_dataset

CPU = torch.device('cpu')
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


class CountingDataset(LongTailDataset):
    """A LongTailDataset that counts image reads (decodes) and remembers the indices read."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads = []

    def __getitem__(self, index):
        self.reads.append(int(index))
        return super().__getitem__(index)


@pytest.fixture(scope='module')
def lt_small(cifar10_dir):
    """Real CIFAR-10, the rho=100 profile with the largest class capped at 300 images."""
    return create_lt_dataset('', str(cifar10_dir / 'train.tar'), imb_ratio=100, imb_max=300)


def fresh(ds, cls=LongTailDataset):
    """A new dataset object over the same reader (loaders set the transform on the dataset they get)."""
    base = ImageDataset(ds.dataset.reader.root, reader=ds.dataset.reader)
    return cls(base, indices=ds.indices, num_classes=ds.num_classes, classes=ds.classes)


def cmo_loader(ds, **kwargs):
    args = dict(input_size=(3, 32, 32), batch_size=64, is_training=True, device=CPU, num_workers=0,
                mean=CIFAR_MEAN, std=CIFAR_STD, color_jitter=None, train_crop_mode='pad', cmo=True,
                cmo_start_epoch=-1, epochs=None)
    args.update(kwargs)
    return create_cmo_loader(ds, **args)


def collect(loader, epochs):
    """Hard labels of backgrounds and foregrounds (mixed samples only) over some epochs."""
    bg, fg = [], []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, target in loader:
            info = loader.mix_info
            bg.append(info.y_b)
            lam = torch.as_tensor(info.lam).expand(len(info.y_b))
            fg.append(info.y_f[lam < 1])
    return torch.cat(bg).numpy(), torch.cat(fg).numpy()


def test_cmo_off_reads_the_plan_with_timms_transform(lt_small):
    """CMO off: each batch is timm's training transform of the plan's samples, drawn with the batch's seed."""
    from timm.data.loader import fast_collate
    from timm_cmo.data.loader import seeded_rngs
    kw = dict(input_size=(3, 32, 32), batch_size=32, is_training=True, device=CPU, num_workers=0,
              mean=CIFAR_MEAN, std=CIFAR_STD)
    ours = create_cmo_loader(fresh(lt_small), cmo=False, seed=9, **kw)
    reference = fresh(lt_small)
    create_loader(reference, **kw)  # timm sets its training transform on the dataset
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1) * 255
    ours.set_epoch(1)
    plan = ours.planner.plan(1)
    for (x, y), b in zip(ours, plan[:3]):
        with seeded_rngs(b.seed):
            xr, yr = fast_collate([reference[i] for i in b.index])
        torch.testing.assert_close(x, (xr.float() - mean) / std, atol=1e-5, rtol=0)
        assert torch.equal(y, yr) and ours.mix_info is None
    assert len(ours) == len(lt_small) // 32  # timm's drop_last for training


@pytest.mark.parametrize('cmo,dual_r', [(False, None), (True, None), (True, 2.0)])
def test_workers_and_resume_do_not_change_batches(lt_small, cmo, dual_r):
    """The same epoch gives the same augmented batches (and dual batches) with 0 or 2 (persistent) workers, and
    when a loader starts at that epoch (a resumed run) instead of reaching it."""
    kw = dict(cmo=cmo, cmo_prob=0.5, cmo_mode='elem', batch_size=32, color_jitter=0.4, seed=2, epochs=None,
              dual_r=dual_r)
    runs = []
    for workers, epochs in ((0, (0, 1)), (2, (0, 1)), (2, (1,))):
        loader = cmo_loader(fresh(lt_small), num_workers=workers, **kw)
        out = {}
        for epoch in epochs:
            loader.set_epoch(epoch)
            out[epoch] = [(x, t, loader.dual) for _, (x, t) in zip(range(4), loader)]
        runs.append(out)
    for other in runs[1:]:
        for epoch, batches in other.items():
            for (xa, ta, da), (xb, tb, db) in zip(runs[0][epoch], batches):
                assert torch.equal(xa, xb) and torch.equal(ta, tb)
                assert (da is None) == (db is None) == (dual_r is None)
                if da is not None:
                    assert torch.equal(da.x, db.x) and torch.equal(da.y, db.y)
    assert not torch.equal(runs[0][0][0][0], runs[0][1][0][0])  # epochs differ


def test_main_process_generators_do_not_depend_on_workers(lt_small):
    """Reading batches advances the main process's global generators (which drive dropout and timm's random
    erasing) the same way with 0 workers as with 2: the transforms' draws stay inside the batch reads."""
    after = []
    for workers in (0, 2):
        loader = cmo_loader(fresh(lt_small), cmo=False, batch_size=16, num_workers=workers)
        torch.manual_seed(0), random.seed(0), np.random.seed(0)
        _ = [b for _, b in zip(range(3), loader)]
        after.append((torch.rand(1).item(), random.random(), np.random.rand()))
    assert after[0] == after[1]


def test_ros_and_keep_last(lt_small):
    ds = fresh(lt_small)
    loader = cmo_loader(ds, cmo=False, ros_r=1.0, drop_last=False, batch_size=64)
    assert len(loader) == -(-len(ds) // 64)
    ys = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        ys += [y for _, y in loader]
    assert sum(len(y) for y in ys) == 3 * len(ds)
    assert stats.chisquare(np.bincount(torch.cat(ys).numpy(), minlength=10)).pvalue > 1e-3


def test_device_accepts_strings_and_defaults_without_cuda(lt_small):
    loader = cmo_loader(fresh(lt_small), device='cpu', cmo=True, batch_size=8)
    x, t = next(iter(loader))
    assert x.device.type == 'cpu' and loader.device == torch.device('cpu')
    if not torch.cuda.is_available():
        default = cmo_loader(fresh(lt_small), device=None, batch_size=8)
        assert default.device == torch.device('cpu') and next(iter(default))[0].device.type == 'cpu'


def test_cmo_on_prob_zero_matches_plain_loader(lt_small):
    """The CMO path with nothing to mix reads and augments exactly what timm's loader does."""
    kw = dict(input_size=(3, 32, 32), batch_size=32, is_training=True, device=CPU, num_workers=0,
              mean=CIFAR_MEAN, std=CIFAR_STD, train_crop_mode='pad')
    ours = create_cmo_loader(fresh(lt_small), cmo=True, cmo_prob=0.0, cmo_start_epoch=-1, **kw)
    plain = create_cmo_loader(fresh(lt_small), cmo=False, **kw)
    a = [b for _, b in zip(range(3), ours)]
    b = [b for _, b in zip(range(3), plain)]
    for (xa, ta), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb)
        assert torch.equal(ta, torch.eye(10)[yb])


@pytest.mark.parametrize('r', [1.0, 2.0])
def test_foreground_follows_q_background_follows_p(lt_small, r):
    ds = fresh(lt_small)
    loader = cmo_loader(ds, cmo_prob=1.0, cmo_r=r)
    bg, fg = collect(loader, epochs=4)
    counts = ds.class_counts
    # backgrounds: every epoch a permutation of the data (drop_last removes a few)
    bg_obs = np.bincount(bg, minlength=10)
    assert stats.chisquare(bg_obs, counts / counts.sum() * bg_obs.sum()).pvalue > 1e-3
    # foregrounds: class k with probability q(r, k) = n_k^(1-r) / sum n^(1-r)
    fg_obs = np.bincount(fg, minlength=10)
    expected = class_sampling_probs(counts, r=r) * len(fg)
    keep = expected > 5
    assert stats.chisquare(fg_obs[keep], expected[keep] * fg_obs[keep].sum() / expected[keep].sum()).pvalue > 1e-3
    assert len(fg) > 0.95 * len(bg)  # prob=1: (almost) every sample gets a foreground


@pytest.mark.parametrize('variant', ['back', 'minor', 'mixup'])
def test_variants_swap_distributions(lt_small, variant):
    ds = fresh(lt_small)
    loader = cmo_loader(ds, cmo_prob=1.0, cmo_variant=variant)
    bg, fg = collect(loader, epochs=3)
    counts = ds.class_counts
    p, q = counts / counts.sum(), class_sampling_probs(counts, r=1.0)
    bg_dist, fg_dist = {'back': (q, p), 'minor': (q, q), 'mixup': (p, q)}[variant]
    for obs_labels, dist in ((bg, bg_dist), (fg, fg_dist)):
        obs = np.bincount(obs_labels, minlength=10)
        exp = dist * len(obs_labels)
        keep = exp > 5
        assert stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue > 1e-3


def test_epoch_window_and_decode_counts(lt_small):
    """CMO only when 3 < epoch < epochs - 3; foregrounds decoded only for mixed batches (<= 1 + prob per sample)."""
    ds = fresh(lt_small, CountingDataset)
    loader = cmo_loader(ds, cmo_prob=0.5, cmo_start_epoch=3, cmo_end_epochs=3, epochs=10, batch_size=32)
    per_epoch = {}
    for epoch in range(10):
        loader.set_epoch(epoch)
        ds.reads.clear()
        mixed_batches, n_bg = 0, 0
        for x, target in loader:
            n_bg += x.shape[0]
            mixed_batches += int(loader.mix_info.lam < 1 or not (loader.mix_info.y_f is loader.mix_info.y_b))
        per_epoch[epoch] = (len(ds.reads), n_bg, mixed_batches)
        # every read is a background or a foreground of a mixed batch: nothing read in vain
        assert len(ds.reads) == n_bg + 32 * mixed_batches
    assert [e for e, (_, _, m) in per_epoch.items() if m] == [4, 5, 6]
    reads = sum(per_epoch[e][0] for e in (4, 5, 6))
    samples = sum(per_epoch[e][1] for e in (4, 5, 6))
    assert 1.2 < reads / samples < 1.8  # expected 1.5 with prob 0.5 (33 batches)


def test_elem_mode_per_sample(lt_small):
    ds = fresh(lt_small, CountingDataset)
    loader = cmo_loader(ds, cmo_prob=0.5, cmo_mode='elem', batch_size=64)
    loader.set_epoch(0)
    ds.reads.clear()
    n = 0
    for x, target in loader:
        lam = loader.mix_info.lam
        assert lam.shape == (64,)
        torch.testing.assert_close(target.sum(1), torch.ones(64))
        assert len(lam[lam < 1].unique()) > 5  # one box and lambda per sample, not per batch
        n += 64
    n_fg = len(ds.reads) - n  # a foreground read per mixed sample, each with probability 0.5
    assert stats.binomtest(n_fg, n, 0.5).pvalue > 1e-3


def _const_image_dataset(n=40):
    """Image i has constant value i + 1 and label i: every output pixel and label names its source image."""

    class Const(torch.utils.data.Dataset):
        def __init__(self):
            self.targets = list(range(n))
            self.transform = None
            self.num_classes = n

        def __getitem__(self, i):
            img = Image.new('RGB', (32, 32), (i + 1,) * 3)
            return (self.transform(img) if self.transform else img), self.targets[i]

        def __len__(self):
            return n

    return Const()


@pytest.mark.parametrize('mode,variant', [('batch', 'cmo'), ('elem', 'cmo'), ('batch', 'mixup'), ('elem', 'mixup')])
@pytest.mark.parametrize('use_prefetcher', [True, False])
def test_loader_output_is_exact(mode, variant, use_prefetcher):
    """Pasted pixels are the foreground image's, the rest the background's; lambda is the kept fraction;
    with the mixup variant pixels are the lambda-blend. Checked through timm's prefetcher and without it."""
    ds = _const_image_dataset()
    loader = create_cmo_loader(
        ds, (3, 32, 32), batch_size=8, is_training=True, no_aug=True, device=CPU, num_workers=0,
        mean=(0, 0, 0), std=(1, 1, 1), cmo=True, cmo_prob=1.0, cmo_mode=mode, cmo_variant=variant,
        cmo_start_epoch=-1, use_prefetcher=use_prefetcher)
    loader.set_epoch(0)
    for x, target in loader:
        info = loader.mix_info
        lam = torch.as_tensor(info.lam, dtype=torch.float32).expand(8)
        pix = x[:, 0] * 255.  # both paths give value / 255
        bg_val = (info.y_b + 1).float().view(8, 1, 1)
        fg_val = (info.y_f + 1).float().view(8, 1, 1)
        if variant == 'cmo':
            from_bg = torch.isclose(pix, bg_val.expand_as(pix), atol=1e-3)
            from_fg = torch.isclose(pix, fg_val.expand_as(pix), atol=1e-3)
            assert bool((from_bg | from_fg).all())
            differ = info.y_b != info.y_f  # an image pasted onto itself shows no box
            torch.testing.assert_close(from_bg.float().mean(dim=(1, 2))[differ], lam[differ])
        else:
            torch.testing.assert_close(pix, (lam.view(8, 1, 1) * bg_val + (1 - lam.view(8, 1, 1)) * fg_val).expand_as(pix),
                                       atol=2e-3, rtol=0)
        expected = torch.zeros(8, 40)
        expected[torch.arange(8), info.y_b] += lam
        expected[torch.arange(8), info.y_f] += 1 - lam
        torch.testing.assert_close(target, expected)


@pytest.mark.parametrize('cmo', [False, True])
@pytest.mark.parametrize('use_prefetcher', [True, False])
def test_dual_batch_is_the_plans_images(cmo, use_prefetcher):
    """The dual batch carries the plan's dual images and their labels, normalised like the batch, through timm's
    prefetcher and without it; it is never mixed, and the ordinary batch is what it would be without it."""
    ds = _const_image_dataset()
    kw = dict(input_size=(3, 32, 32), batch_size=8, is_training=True, no_aug=True, device=CPU, num_workers=0,
              mean=(0, 0, 0), std=(1, 1, 1), cmo=cmo, cmo_prob=1.0, cmo_start_epoch=-1, use_prefetcher=use_prefetcher,
              seed=3)
    loader = create_cmo_loader(ds, dual_r=2.0, **kw)
    plain = create_cmo_loader(_const_image_dataset(), **kw)
    loader.set_epoch(1)
    plain.set_epoch(1)
    plan = loader.planner.plan(1)
    assert len(loader) == len(plan) == 5
    for (x, target), (xp, tp), b in zip(loader, plain, plan):
        dual = loader.dual
        assert dual.y.tolist() == [ds.targets[i] for i in b.dual_index] and dual.smoothing == 0.
        assert dual.x.shape == (8, 3, 32, 32) and dual.x.dtype == x.dtype
        torch.testing.assert_close(dual.x * 255., (dual.y + 1).float().view(8, 1, 1, 1).expand(8, 3, 32, 32),
                                   atol=1e-3, rtol=0)
        assert torch.equal(x, xp) and torch.equal(target, tp)
        assert plain.dual is None


def test_bad_loader_options(lt_small):
    with pytest.raises(ValueError, match="'nope'"):
        cmo_loader(fresh(lt_small), cmo_variant='nope')
    with pytest.raises(ValueError, match='prob must be in'):
        cmo_loader(fresh(lt_small), cmo_prob=2.0)
    with pytest.raises(ValueError, match='r must be >= 0'):
        cmo_loader(fresh(lt_small), cmo_r=-1.0)


def test_torchrun_two_processes(tmp_path, cifar10_dir):
    """2 gloo processes: disjoint background shares (split like DistributedSampler), distinct foreground shares."""
    script = tmp_path / 'worker.py'
    script.write_text(textwrap.dedent(f'''
        import json, os
        import torch, torch.distributed as dist
        from timm_cmo.data import create_lt_dataset, create_cmo_loader, LongTailDataset
        dist.init_process_group('gloo')
        rank = dist.get_rank()

        class Recording(LongTailDataset):
            reads = []
            def __getitem__(self, i):
                self.reads.append(int(i))
                return super().__getitem__(i)

        src = create_lt_dataset('', r"{cifar10_dir / 'train.tar'}", imb_ratio=100, imb_max=100)
        ds = Recording(src.dataset, indices=src.indices, num_classes=10)
        loader = create_cmo_loader(ds, (3, 32, 32), batch_size=16, is_training=True, device=torch.device('cpu'),
                                   num_workers=0, distributed=True, cmo=True, cmo_prob=1.0, cmo_start_epoch=-1,
                                   train_crop_mode='pad', color_jitter=None)
        loader.set_epoch(1)
        for x, t in loader:
            assert t.shape == (16, 10)
        # every batch reads its 16 backgrounds, then its 16 foregrounds (prob=1)
        chunks = [ds.reads[i:i + 32] for i in range(0, len(ds.reads), 32)]
        bg = [i for c in chunks for i in c[:16]]
        fg = [i for c in chunks for i in c[16:]]
        with open(os.path.join(r"{tmp_path}", f"rank{{rank}}.json"), "w") as f:
            json.dump(dict(bg=bg, fg=fg, n=len(ds)), f)
        dist.destroy_process_group()
    '''))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2))
    assert r0['bg'] and r1['bg'] and r0['fg'] and r1['fg']
    assert not set(r0['bg']) & set(r1['bg'])
    assert len(set(r0['bg']) | set(r1['bg'])) >= r0['n'] - 2 * 16
    assert r0['fg'] != r1['fg']


def test_workers_open_their_own_tar_handle(cifar10_dir):
    """Reading an image in the main process opens timm's tar; forked workers must not share that handle."""
    from timm_cmo.data.loader import reset_reader_handles
    ds = create_lt_dataset('', str(cifar10_dir / 'test.tar'))
    ds.indices = ds.indices[::40]  # 250 images, all classes
    ds.targets = ds.targets[::40]
    reference = [np.asarray(ds[i][0]) for i in range(len(ds))]  # opens the tar in this process
    assert ds.dataset.reader.tar_state.tf is not None
    loader = create_cmo_loader(ds, (3, 32, 32), 25, is_training=False, device=CPU, num_workers=2,
                               use_prefetcher=False, mean=(0, 0, 0), std=(1, 1, 1), crop_pct=1.0,
                               persistent_workers=False)
    got = torch.cat([x for x, _ in loader])
    expected = torch.from_numpy(np.stack(reference)).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    reset_reader_handles(ds)
    assert ds.dataset.reader.tar_state.tf is None
