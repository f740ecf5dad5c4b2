"""The data-on-device fast path has the ordinary loader's semantics: crops, flips, class draws, lambda, window."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision import transforms

from timm_cmo.data import CMOConfig, class_sampling_probs, create_cmo_loader, create_lt_dataset
from timm_cmo.data.device_loader import DeviceEvalLoader, DeviceLoader, decode_to_tensor, pad_crop_flip

CPU = torch.device('cpu')
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def coded_image():
    """32x32 image with R = row + 1, G = col + 1: an output pixel tells where the crop put it."""
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing='ij')
    return np.stack([rows + 1, cols + 1, np.zeros_like(rows)], -1).astype(np.uint8)


def offsets_and_flip(x):
    """(row offset, col offset, flipped) of a pad-4 crop of the coded image, from two centre pixels; x (B, 3, 32, 32)."""
    r = x[:, 0, 16, 16].long() - 1
    g16, g17 = x[:, 1, 16, 16].long(), x[:, 1, 16, 17].long()
    flipped = g17 < g16
    oy = r - 12
    ox = torch.where(flipped, g16 - 1 - 15 + 4, g16 - 1 - 16 + 4)
    return oy, ox, flipped


def test_crop_offsets_and_flips_match_torchvision():
    img = coded_image()
    n = 3000
    x = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).expand(n, 3, 32, 32).contiguous()
    g = torch.Generator().manual_seed(0)
    oy_d, ox_d, fl_d = offsets_and_flip(pad_crop_flip(x, 4, 0.5, g))
    torch.manual_seed(0)
    tv = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(0.5),
                             transforms.PILToTensor()])
    pil = Image.fromarray(img)
    oy_t, ox_t, fl_t = offsets_and_flip(torch.stack([tv(pil) for _ in range(n)]))
    for a, b in ((oy_d, oy_t), (ox_d, ox_t)):
        assert a.min() == 0 and a.max() == 8 and b.min() == 0 and b.max() == 8
        table = np.stack([np.bincount(a.numpy(), minlength=9), np.bincount(b.numpy(), minlength=9)])
        assert stats.chi2_contingency(table).pvalue > 1e-3  # same law on both paths
        assert stats.chisquare(table[0]).pvalue > 1e-3  # uniform over the 9 offsets
    assert stats.chi2_contingency([[fl_d.sum(), n - fl_d.sum()], [fl_t.sum(), n - fl_t.sum()]]).pvalue > 1e-3
    assert stats.binomtest(int(fl_d.sum()), n, 0.5).pvalue > 1e-3


def test_crop_pixels_are_a_shifted_window():
    x = torch.from_numpy(coded_image()).permute(2, 0, 1).unsqueeze(0).repeat(16, 1, 1, 1)
    out = pad_crop_flip(x, 4, 0.0, torch.Generator().manual_seed(1))
    oy, ox, _ = offsets_and_flip(out)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(16):
        assert torch.equal(out[i], padded[i, :, oy[i]:oy[i] + 32, ox[i]:ox[i] + 32])


@pytest.fixture(scope='module')
def lt_data(cifar10_dir):
    ds = create_lt_dataset('', str(cifar10_dir / 'train.tar'), imb_ratio=100, imb_max=300)
    images, targets = decode_to_tensor(ds, (32, 32), CPU)
    return ds, images, targets


def device_loader(images, targets, cmo=True, **kwargs):
    flags = dict(cmo_start_epoch=-1)
    flags.update({k: kwargs.pop(k) for k in list(kwargs) if k.startswith('cmo_')})
    args = dict(batch_size=64, mean=CIFAR_MEAN, std=CIFAR_STD, num_classes=10,
                cmo=CMOConfig.from_flags(**flags) if cmo else None)
    args.update(kwargs)
    return DeviceLoader(images, targets, **args)


def test_decode_matches_dataset(lt_data):
    ds, images, targets = lt_data
    assert images.shape == (len(ds), 3, 32, 32) and images.dtype == torch.uint8
    assert targets.tolist() == ds.targets.tolist()
    for i in (0, 100, len(ds) - 1):
        assert torch.equal(images[i], transforms.PILToTensor()(ds[i][0]))


def ordinary_loader(ds, **kwargs):
    args = dict(input_size=(3, 32, 32), batch_size=32, is_training=True, device=CPU, num_workers=0,
                mean=CIFAR_MEAN, std=CIFAR_STD, no_aug=True, num_classes=10)
    args.update(kwargs)
    return create_cmo_loader(ds, **args)


PARITY_CASES = {
    'cmo-off': dict(cmo=False),
    'cmo-window': dict(cmo=True, cmo_prob=0.5, cmo_start_epoch=0, cmo_end_epochs=1, epochs=4),
    'elem': dict(cmo=True, cmo_prob=0.5, cmo_mode='elem', cmo_start_epoch=-1),
    'back': dict(cmo=True, cmo_prob=0.7, cmo_variant='back', cmo_start_epoch=0, cmo_end_epochs=1, epochs=4),
    'minor': dict(cmo=True, cmo_prob=0.7, cmo_variant='minor', cmo_start_epoch=0, cmo_end_epochs=1, epochs=4),
    'mixup': dict(cmo=True, cmo_prob=1.0, cmo_variant='mixup', cmo_start_epoch=-1, cmo_r=2.0),
    'effective-elem-mixup': dict(cmo=True, cmo_effective=True, cmo_mode='elem', cmo_variant='mixup',
                                 cmo_start_epoch=-1),
    'ros': dict(cmo=False, ros_r=1.0),
    'ros-sqrt-cmo': dict(cmo=True, ros_r=0.5, cmo_start_epoch=-1),
    'keep-last-smoothing': dict(cmo=True, drop_last=False, label_smoothing=0.1, cmo_start_epoch=-1),
    'rank1-of-2': dict(cmo=True, cmo_start_epoch=-1, num_replicas=2, rank=1),
    'remix': dict(cmo=False, remix=True),
    'remix-cutmix-ros-smoothing': dict(cmo=False, remix=True, remix_mode='cutmix', ros_r=1.0, label_smoothing=0.1),
    'timm-mixup': dict(cmo=False, mixup=1.0),
    'cutmix-elem-prob-odd-batches-smoothing': dict(cmo=False, cutmix=1.0, mixup_mode='elem', mixup_prob=0.7,
                                                   batch_size=25, drop_last=False, label_smoothing=0.1),
    'mixup-pair-odd-batches': dict(cmo=False, mixup=1.0, mixup_mode='pair', batch_size=25, drop_last=False),
    'mixup-cutmix-minmax-pair-off-epoch-ros': dict(cmo=False, mixup=0.4, cutmix_minmax=(0.2, 0.8), mixup_mode='pair',
                                                   mixup_off_epoch=2, ros_r=1.0),
    'blur-window': dict(cmo=True, cmo_prob=0.7, cmo_variant='blur', cmo_start_epoch=0, cmo_end_epochs=1, epochs=4),
    'jitter-elem-odd-batches': dict(cmo=True, cmo_variant='jitter', cmo_mode='elem', cmo_start_epoch=-1, batch_size=25,
                                    drop_last=False),
    # BBN's re-balancing batch (the reversed sampler), alone and beside CMO's batch, odd batches, smoothing
    'dual': dict(cmo=False, dual_r=2.0),
    'dual-cmo-window-keep-last-odd-smoothing': dict(cmo=True, cmo_prob=0.7, cmo_start_epoch=0, cmo_end_epochs=1,
                                                    epochs=4, dual_r=2.0, batch_size=25, drop_last=False,
                                                    label_smoothing=0.1),
    'dual-balanced-cmo-elem-mixup': dict(cmo=True, cmo_mode='elem', cmo_variant='mixup', cmo_start_epoch=-1,
                                         dual_r=1.0),
}
MIXUP_OPTS = {'mixup': 'mixup_alpha', 'cutmix': 'cutmix_alpha', 'cutmix_minmax': 'cutmix_minmax', 'mixup_prob': 'prob',
              'mixup_switch_prob': 'switch_prob', 'mixup_mode': 'mode', 'mixup_off_epoch': 'off_epoch'}


@pytest.mark.parametrize('case', list(PARITY_CASES))
def test_device_path_equals_ordinary_loader(lt_parity, case):
    """With augmentation off both paths must give the same batches: same plan (order, ROS, CMO decisions,
    foregrounds), same lambda and boxes, same pixels, targets and mix info, in every epoch of the window."""
    ds, images, targets = lt_parity
    opts = dict(PARITY_CASES[case])
    cmo = opts.pop('cmo')
    split = {k: opts.pop(k) for k in ('num_replicas', 'rank') if k in opts}
    batch_size = opts.pop('batch_size', 32)
    cmo_flags = {k: v for k, v in opts.items() if k.startswith('cmo_')}
    common = {k: v for k, v in opts.items() if not k.startswith('cmo_')}
    remix = {k: common.pop(k) for k in list(common) if k.startswith('remix')}
    mixup = {k: common.pop(k) for k in list(common) if k in MIXUP_OPTS}
    remixer = mixer = None
    if remix:
        from timm_cmo.data.remix import RemixMixup
        remixer = RemixMixup(10, ds.class_counts, mode=remix.get('remix_mode', 'mixup'),
                             label_smoothing=common.get('label_smoothing', 0.))
    if mixup:
        from timm_cmo.data import MixupCutmix
        mixer = MixupCutmix(10, **dict(dict(mixup_alpha=0.), **{MIXUP_OPTS[k]: v for k, v in mixup.items()}),
                            label_smoothing=common.get('label_smoothing', 0.))
    fast = DeviceLoader(images, targets, batch_size, CIFAR_MEAN, CIFAR_STD, padding=0, hflip=0., num_classes=10, seed=4,
                        cmo=CMOConfig.from_flags(**cmo_flags) if cmo else None, remix=remixer, mixup=mixer, **common,
                        **split)
    if split:  # the ordinary loader takes its split from the process group: compare the plans it would read
        from timm_cmo.data import EpochPlanner
        planner = EpochPlanner(ds.targets, 32, cmo=CMOConfig.from_flags(**cmo_flags), seed=4, **split)
        for epoch in range(2):
            assert [b.index.tolist() for b in planner.plan(epoch)] == [b.index.tolist() for b in fast.planner.plan(epoch)]
        return
    ordinary = ordinary_loader(ds, cmo=cmo, seed=4, batch_size=batch_size, **cmo_flags, **common, **remix, **mixup)
    assert len(fast) == len(ordinary)
    mixed, sizes = [], set()
    for epoch in range(4):
        fast.set_epoch(epoch)
        ordinary.set_epoch(epoch)
        n = 0
        for (xf, tf), (xo, to) in zip(fast, ordinary):
            n += 1
            sizes.add(len(xf))
            assert torch.equal(xf, xo)  # bit for bit: an ulp of difference grows into different runs
            assert torch.equal(tf, to)
            if cmo or remix or mixup:
                a, b = fast.mix_info, ordinary.mix_info
                assert torch.equal(a.y_b, b.y_b) and torch.equal(a.y_f, b.y_f) and a.smoothing == b.smoothing
                torch.testing.assert_close(torch.as_tensor(a.lam), torch.as_tensor(b.lam))
                if bool((torch.as_tensor(a.lam) < 1).any()):
                    mixed.append(epoch)
            if 'dual_r' in common:  # the dual batch: same images, labels and smoothing, as many as the batch
                a, b = fast.dual, ordinary.dual
                assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.smoothing == b.smoothing
                assert a.x.shape == xf.shape and len(a.y) == len(xf)
            else:
                assert fast.dual is None and ordinary.dual is None
        assert n == len(fast)
    if cmo or remix or mixup:
        assert mixed
    if 'mixup_off_epoch' in mixup:  # no mixing from the off epoch on
        assert max(mixed) < mixup['mixup_off_epoch'] <= 3
    if batch_size % 2:
        assert all(size % 2 for size in sizes)  # odd batches (timm's Mixup would refuse them)


@pytest.fixture(scope='module')
def lt_parity(cifar10_dir):
    ds = create_lt_dataset('', str(cifar10_dir / 'train.tar'), imb_ratio=10, imb_max=60)
    images, targets = decode_to_tensor(ds, (32, 32), CPU)
    return ds, images, targets


def collect(loader, epochs):
    bg, fg, lams = [], [], []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, target in loader:
            info = loader.mix_info
            lam = torch.as_tensor(info.lam).expand(len(info.y_b))
            bg.append(info.y_b)
            fg.append(info.y_f[lam < 1])
            lams.append(lam[lam < 1])
    return torch.cat(bg).numpy(), torch.cat(fg).numpy(), torch.cat(lams).numpy()


@pytest.mark.parametrize('variant', ['cmo', 'back', 'minor'])
def test_class_draws_follow_p_and_q(lt_data, variant):
    """Backgrounds ~ P and foregrounds ~ Q (swapped by the ablations), checked against the laws."""
    ds, images, targets = lt_data
    fast = device_loader(images, targets, cmo_prob=1.0, cmo_variant=variant)
    bg_d, fg_d, lam_d = collect(fast, 4)
    counts = ds.class_counts
    p, q = counts / counts.sum(), class_sampling_probs(counts, 1.0)
    for d, law in ((bg_d, q if variant in ('back', 'minor') else p), (fg_d, p if variant == 'back' else q)):
        obs_d = np.bincount(d, minlength=10)
        exp = law * len(d)
        k2 = exp > 5
        assert stats.chisquare(obs_d[k2], exp[k2] * obs_d[k2].sum() / exp[k2].sum()).pvalue > 1e-3


def test_ros_backgrounds_are_class_balanced(lt_data):
    ds, images, targets = lt_data
    loader = device_loader(images, targets, cmo=False, ros_r=1.0)
    ys = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        ys += [y for _, y in loader]
    obs = np.bincount(torch.cat(ys).numpy(), minlength=10)
    assert stats.chisquare(obs).pvalue > 1e-3  # every class equally likely (r = 1)


def test_epoch_window_prob_and_elem_mode(lt_data):
    _, images, targets = lt_data
    loader = device_loader(images, targets, cmo_prob=0.5, cmo_start_epoch=3, cmo_end_epochs=3, epochs=10)
    mixed_epochs, mixed, batches = [], 0, 0
    for epoch in range(10):
        loader.set_epoch(epoch)
        for x, t in loader:
            is_mixed = loader.mix_info.lam < 1
            if is_mixed and epoch not in mixed_epochs:
                mixed_epochs.append(epoch)
            if epoch in (4, 5, 6):
                mixed += int(is_mixed)
                batches += 1
            torch.testing.assert_close(t.sum(1), torch.ones(64))
    assert mixed_epochs == [4, 5, 6]
    assert stats.binomtest(mixed, batches, 0.5).pvalue > 1e-3
    elem = device_loader(images, targets, cmo_prob=0.5, cmo_mode='elem')
    elem.set_epoch(0)
    x, t = next(iter(elem))
    lam = elem.mix_info.lam
    assert lam.shape == (64,) and 10 < int((lam < 1).sum()) < 54


def test_reproducible_and_cmo_off_gives_hard_labels(lt_data):
    _, images, targets = lt_data
    a, b = device_loader(images, targets, seed=5), device_loader(images, targets, seed=5)
    for loader in (a, b):
        loader.set_epoch(2)
    for (xa, ta), (xb, tb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    plain = device_loader(images, targets, cmo=False)
    plain.set_epoch(0)
    x, y = next(iter(plain))
    assert y.dtype == torch.int64 and y.shape == (64,)
    # normalised like timm's prefetcher
    assert abs(float(x.mean())) < 1.0


def test_keep_last_batch(lt_data):
    _, images, targets = lt_data
    n = len(targets)
    kept = device_loader(images, targets, cmo=False, drop_last=False)
    kept.set_epoch(0)
    sizes = [len(y) for _, y in kept]
    assert len(sizes) == -(-n // 64) and sum(sizes) == n and sizes[-1] == n % 64
    dropped = device_loader(images, targets, cmo=False)
    assert len(dropped) == n // 64


def test_distributed_shares(lt_data):
    _, images, targets = lt_data
    shares = []
    for rank in range(2):
        loader = device_loader(images, targets, cmo=False, num_replicas=2, rank=rank, batch_size=32)
        shares.append(loader.planner.order(1).tolist())
    assert not set(shares[0]) & set(shares[1])
    assert len(set(shares[0]) | set(shares[1])) == len(targets)
    ev = [DeviceEvalLoader(images, targets, 50, CIFAR_MEAN, CIFAR_STD, num_replicas=2, rank=r) for r in range(2)]
    got = [torch.cat([y for _, y in e]) for e in ev]
    assert torch.equal(got[0], targets[0::2]) and torch.equal(got[1], targets[1::2])


def erased_fractions(loader, epochs):
    """Per image: the share of its pixels that random erasing ('const' mode: zeros) set, over ``epochs``."""
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, _ in loader:
            out.append((x == 0).all(1).flatten(1).float().mean(1))
    return torch.cat(out).numpy()


@pytest.mark.parametrize('cmo,count', [(False, 1), (True, 2)])
def test_random_erasing_same_law_on_both_paths(lt_parity, cmo, count):
    """Random erasing draws from the global generators on both paths (as timm's), so the batches differ;
    what must agree is the law: how often an image is erased and how much of it, before CMO pastes."""
    ds, images, targets = lt_parity
    random.seed(0)
    torch.manual_seed(0)
    cmo_flags = dict(cmo_start_epoch=-1, cmo_prob=1.0) if cmo else {}
    erase = dict(re_prob=0.5, re_mode='const', re_count=count)
    fast = device_loader(images, targets, cmo=cmo, batch_size=32, padding=0, hflip=0., **cmo_flags, **erase)
    paths = {'device': erased_fractions(fast, 8)}
    for prefetch in (True, False):
        ordinary = ordinary_loader(ds, no_aug=False, train_crop_mode='pad', crop_padding=0, hflip=0., cmo=cmo,
                                   use_prefetcher=prefetch, **cmo_flags, **erase)
        paths[f'ordinary-prefetch={prefetch}'] = erased_fractions(ordinary, 8)
    # a real pixel never normalises to exactly 0 (the means are not integers on the 0-255 scale)
    unerased = device_loader(images, targets, cmo=False, batch_size=32, padding=0, hflip=0.)
    assert erased_fractions(unerased, 1).max() == 0
    d = paths['device']
    lo, hi = (0.5, 0.75) if cmo else (0.45, 0.55)  # p = 0.5 per image; with CMO background or foreground
    for name, o in paths.items():
        assert lo < (o > 0).mean() < hi, name
        table = [[(d > 0).sum(), (d == 0).sum()], [(o > 0).sum(), (o == 0).sum()]]
        assert stats.chi2_contingency(table).pvalue > 1e-3, name
        assert stats.ks_2samp(d[d > 0], o[o > 0]).pvalue > 1e-3, name
