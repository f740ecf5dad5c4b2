""" Graph-safe batches of ``--data-on-device``: an epoch's random numbers drawn ahead, as device tensors.

:class:`DrawnBatches` turns a :class:`~timm_cmo.data.device_loader.DeviceLoader` into batches that need no host
work. At the start of an epoch :meth:`DrawnBatches.draw` makes every random decision of the epoch from the very
streams the loader's own iteration reads, in the same order: the plan (background order or ROS draws, CMO
decisions and foregrounds), the crop offsets and flips (the loader's device generator), CMO's lambda and box
(or the blur / jitter draws), Remix's permutation, lambda and label weights, Mixup / CutMix's draws (the mixers'
host generators, through their ``draw`` methods). They are stacked per step as device tensors, one group per
batch size (the full batches, then the last, smaller one when it is kept). :meth:`DrawnBatches.batch` builds one
step's batch from its row of those tensors with tensor operations only: a box is pasted through a mask, an
unmixed batch is "mixed" with an empty mask or weight 1 and label weight 1, so every step runs the same kernels
on the same shapes, which is what a CUDA graph replays.

The same seed therefore gives the same batches as iterating the loader, bit for bit: the same pixels (blends
rounded as each mixer rounds them), the same labels, the same lambda (a (B,) tensor, float64 where the loader
gives a float, so the loss's shares round alike). Random erasing is drawn inside the step from the global
generator and is not supported here.
"""
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from .cmo import MixInfo, box_masks, host_to_device
from .device_loader import DeviceLoader, crop_flip, draw_crop_flip, normalize

__all__ = ['DrawGroup', 'DrawnBatches']

Draws = Dict[str, torch.Tensor]


class DrawGroup(NamedTuple):
    """Consecutive steps of one batch size: ``draws[key]`` holds a (steps, ...) tensor per key."""
    batch_size: int
    steps: int
    draws: Draws


class DrawnBatches:
    """The loader's batches as graph-safe steps: :meth:`draw` per epoch, :meth:`batch` per step.

    Keys of a step's draws (tensors on the loader's device, B the batch size):

    * always ``index`` (B,) int64 backgrounds and ``y_b`` (B,) their labels; ``offsets`` (2, B) int64 with
      crop padding, ``flip`` (B,) bool with flips;
    * a mix (CMO, Remix, Mixup / CutMix): ``y_f`` (B,) the second labels, ``lam`` (B,) the share of ``y_b`` in
      the loss (1 where nothing is mixed; float64 where the loader's mixer gives one float per batch, float32
      where it gives a tensor);
    * CMO: ``fg_index``, ``fg_offsets``, ``fg_flip`` the foreground at each position (a stand-in image where
      there is none), ``apply`` (B,) bool where one is pasted, and ``box`` (4, B) (paste), ``sigma`` (B,) (blur)
      or ``factors`` (B, 3) / ``order`` (B, 3) (jitter); the blend variant's image weights are ``lam`` / ``w1``;
    * Remix, Mixup / CutMix (a batch mixed with a permutation of itself): ``perm`` (B,), ``blend`` (B,) bool
      with image weights ``w`` / ``w1`` (B,), ``paste`` (B,) bool with ``box`` (4, B).

    Args:
        loader: The ``--data-on-device`` training loader (no random erasing). Its ``set_epoch`` is called as
            usual; :meth:`draw` reads the epoch it was set to.
    """

    def __init__(self, loader: DeviceLoader):
        if loader.random_erasing is not None:
            raise ValueError('random erasing draws on the device from the global generator inside the step; '
                             'it cannot be drawn ahead (turn --reprob off)')
        self.loader = loader
        self.self_mixer = loader.remix if loader.remix is not None else loader.mixup
        if loader.mixer is not None:
            self.kind, self.smoothing = 'cmo', loader.mixer.label_smoothing
        elif self.self_mixer is not None:
            self.kind, self.smoothing = 'self', self.self_mixer.label_smoothing
        else:
            self.kind, self.smoothing = ('smooth' if loader.label_smoothing > 0 else None), loader.label_smoothing
        self.img_shape = tuple(loader.images.shape[-2:])

    def __len__(self) -> int:
        return len(self.loader)

    # --- per epoch: every draw, from the loader's streams in its order

    def draw(self) -> List[DrawGroup]:
        """The draws of the loader's current epoch, grouped by batch size in step order."""
        loader = self.loader
        plan = loader.planner.plan(loader.epoch)
        gen = loader._generator(4, loader.rank)  # the crop / flip stream of DeviceLoader.__iter__
        rows = []
        for bp in plan:
            b = len(bp.index)
            row: Dict[str, Any] = dict(index=bp.index)
            row['offsets'], row['flip'] = draw_crop_flip(b, loader.padding, loader.hflip, loader.device, gen)
            if self.kind == 'cmo':
                row.update(self._draw_cmo(bp, b, gen))
            elif self.kind == 'self':
                row.update(self._draw_self(b))
            rows.append(row)
        groups = []
        start = 0
        while start < len(rows):
            size = len(rows[start]['index'])
            end = start
            while end < len(rows) and len(rows[end]['index']) == size:
                end += 1
            groups.append(DrawGroup(size, end - start, self._stack(rows[start:end], size)))
            start = end
        return groups

    def _draw_cmo(self, bp, b: int, gen: torch.Generator) -> Dict[str, Any]:
        loader, mixer = self.loader, self.loader.mixer
        m = len(bp.fg_index)
        apply = np.zeros(b, dtype=bool)
        fg_index = np.zeros(b, dtype=np.int64)  # image 0 stands in where nothing is pasted
        row: Dict[str, Any] = dict(fg_pos=bp.fg_pos, fg_offsets=None, fg_flip=None)
        drawn = None
        if m:
            row['fg_offsets'], row['fg_flip'] = draw_crop_flip(m, loader.padding, loader.hflip, loader.device, gen)
            apply[bp.fg_pos] = True
            fg_index[bp.fg_pos] = bp.fg_index
            drawn = mixer.draw(b, self.img_shape)
        row.update(fg_index=fg_index, apply=apply)
        ones = np.ones(b, dtype=np.float32)
        if mixer.augment is not None:
            if mixer.augment == 'blur':
                row['sigma'] = drawn['sigma'] if drawn else np.ones(b)
            else:
                row['factors'] = drawn['factors'] if drawn else np.ones((b, 3))
                row['order'] = drawn['order'] if drawn else np.tile(np.arange(3), (b, 1))
            row['lam'] = (~apply).astype(np.float32)  # the replaced samples keep no share of their own label
            return row
        if mixer.mode == 'batch':  # a float lambda: float64, as the loss gets it from the loader
            lam = np.full(b, drawn['lam'] if drawn is not None else 1., dtype=np.float64)
        elif drawn is None:
            lam = ones
        else:
            lam = np.where(apply, drawn['lam'].astype(np.float32), ones)
        row['lam'] = lam
        if mixer.blend:  # the image weights as CMOMixup rounds them (batch mode: 1 - lam in float64)
            row['w1'] = np.full(b, 1. - drawn['lam'], np.float32) if drawn is not None and mixer.mode == 'batch' \
                else np.float32(1.) - lam
        else:
            box = np.zeros((4, b), dtype=np.int64)
            if drawn is not None:
                box[:] = np.asarray(drawn['box'], dtype=np.int64).reshape(4, -1)
            row['box'] = box
        return row

    def _draw_self(self, b: int) -> Dict[str, Any]:
        mixer = self.self_mixer
        drawn = mixer.draw(b, self.img_shape)
        identity = np.arange(b, dtype=np.int64)
        row = dict(perm=identity, blend=np.zeros(b, dtype=bool), w=np.ones(b, dtype=np.float32),
                   w1=np.zeros(b, dtype=np.float32), paste=np.zeros(b, dtype=bool), box=np.zeros((4, b), np.int64),
                   lam=np.ones(b, dtype=np.float32), remix_lam=1.)
        if drawn is None:
            return row
        remix = mixer is self.loader.remix
        per_sample = not remix and mixer.mode != 'batch'
        row['perm'] = np.asarray(drawn['perm'], dtype=np.int64) if remix else identity[::-1].copy()
        if per_sample:  # Mixup / CutMix per pair or sample
            w = np.where(drawn['blend'], drawn['lam'], 1.).astype(np.float32)
            row.update(blend=drawn['blend'], paste=drawn['paste'], box=drawn['box'], w=w, w1=np.float32(1.) - w,
                       lam=drawn['lam'])
            return row
        lam = drawn['lam']
        cutmix = drawn.get('box') is not None if remix else drawn['cutmix']
        if cutmix:
            row.update(paste=np.ones(b, dtype=bool), box=np.repeat(np.asarray(drawn['box'], np.int64)[:, None], b, 1))
        else:  # the image weights as the mixers round them: lam and 1 - lam in float64, then float32
            row.update(blend=np.ones(b, dtype=bool), w=np.full(b, lam, np.float32), w1=np.full(b, 1. - lam, np.float32))
        row['lam'] = np.full(b, lam, dtype=np.float64)  # a float lambda: float64, as the loss gets it from the mixer
        row['remix_lam'] = lam
        return row

    def _stack(self, rows: List[Dict[str, Any]], b: int) -> Draws:
        loader = self.loader
        device = loader.device
        targets = loader.targets
        t: Draws = {}
        t['index'] = host_to_device(np.stack([r['index'] for r in rows]), device)
        t['y_b'] = targets[t['index']]
        for key in ('offsets', 'flip'):
            if rows[0][key] is not None:
                t[key] = torch.stack([r[key] for r in rows])
        if self.kind == 'cmo':
            t['fg_index'] = host_to_device(np.stack([r['fg_index'] for r in rows]), device)
            t['apply'] = host_to_device(np.stack([r['apply'] for r in rows]), device)
            t['y_f'] = torch.where(t['apply'], targets[t['fg_index']], t['y_b'])
            t.update(self._aligned_foreground_draws(rows, b))
            for key in ('box', 'order'):
                if key in rows[0]:
                    t[key] = host_to_device(np.stack([r[key] for r in rows]), device)
            for key in ('sigma', 'factors'):
                if key in rows[0]:
                    t[key] = host_to_device(np.stack([r[key] for r in rows]), device, loader.img_dtype)
            if 'w1' in rows[0]:
                t['w1'] = host_to_device(np.stack([r['w1'] for r in rows]), device)
        elif self.kind == 'self':
            for key in ('perm', 'blend', 'paste', 'box', 'w', 'w1'):
                t[key] = host_to_device(np.stack([r[key] for r in rows]), device)
            t['y_f'] = t['y_b'].gather(1, t['perm'])
        if self.kind in ('cmo', 'self'):
            if self.kind == 'self' and self.self_mixer is loader.remix:
                t['lam'] = loader.remix.label_weights(np.array([r['remix_lam'] for r in rows]), t['y_b'], t['y_f'])
            else:
                t['lam'] = host_to_device(np.stack([r['lam'] for r in rows]), device)
        return t

    def _aligned_foreground_draws(self, rows: List[Dict[str, Any]], b: int) -> Draws:
        """Each row's foreground crop offsets and flips at the positions they are pasted onto (zeros elsewhere)."""
        loader = self.loader
        device = loader.device
        s = len(rows)
        mixed = [k for k, r in enumerate(rows) if r['fg_offsets'] is not None or r['fg_flip'] is not None]
        t: Draws = {}
        at = None
        if mixed:
            rk = np.concatenate([np.full(len(rows[k]['fg_pos']), k, dtype=np.int64) for k in mixed])
            pos = np.concatenate([rows[k]['fg_pos'] for k in mixed])
            at = (host_to_device(rk, device), host_to_device(pos, device))
        if loader.padding > 0:
            t['fg_offsets'] = torch.zeros((s, 2, b), dtype=torch.int64, device=device)
            if at is not None:
                t['fg_offsets'][at[0], :, at[1]] = torch.cat([rows[k]['fg_offsets'] for k in mixed], dim=1).t()
        if loader.hflip > 0:
            t['fg_flip'] = torch.zeros((s, b), dtype=torch.bool, device=device)
            if at is not None:
                t['fg_flip'][at] = torch.cat([rows[k]['fg_flip'] for k in mixed])
        return t

    # --- per step: tensor operations only

    def _augment(self, index: torch.Tensor, offsets: Optional[torch.Tensor], flip: Optional[torch.Tensor]):
        loader = self.loader
        x = crop_flip(loader.images[index], loader.padding, offsets, flip)
        return normalize(x, loader.mean, loader.std, loader.img_dtype, loader.channels_last)

    def batch(self, d: Draws) -> Tuple[torch.Tensor, torch.Tensor, Optional[MixInfo]]:
        """One step's ``(input, labels, mix)`` from its draws (each key without the steps dimension): ``mix``
        is the :class:`~timm_cmo.data.cmo.MixInfo` for the loss (None without mixing or smoothing, where the
        labels are the target)."""
        x = self._augment(d['index'], d.get('offsets'), d.get('flip'))
        y = d['y_b']
        if self.kind is None:
            return x, y, None
        if self.kind == 'smooth':
            return x, y, MixInfo(y, y, 1., self.smoothing)
        if self.kind == 'cmo':
            x = self._paste(x, self._augment(d['fg_index'], d.get('fg_offsets'), d.get('fg_flip')), d)
        else:
            x = self._self_mix(x, d)
        if self.loader.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y, MixInfo(y, d['y_f'], d['lam'], self.smoothing)

    def _paste(self, x: torch.Tensor, x_fg: torch.Tensor, d: Draws) -> torch.Tensor:
        mixer = self.loader.mixer
        view = (-1, 1, 1, 1)
        if mixer.augment is not None:
            x_aug = mixer.augment_tensors(x_fg, sigma=d.get('sigma'), factors=d.get('factors'), order=d.get('order'))
            return torch.where(d['apply'].view(view), x_aug, x)
        if mixer.blend:  # lam is the image weight too (1 where nothing is pasted)
            return self._blend(x, x_fg, d['lam'], d['w1'], fused=mixer.mode == 'batch')
        mask = box_masks(d['box'], *self.img_shape) & d['apply'][:, None, None]
        return torch.where(mask.unsqueeze(1), x_fg, x)

    @staticmethod
    def _blend(x: torch.Tensor, other: torch.Tensor, w: torch.Tensor, w1: torch.Tensor, fused: bool) -> torch.Tensor:
        """``w x + w1 other`` per sample, rounded as the mixer does it: ``fused``: ``x.mul_(w).add_(other,
        alpha=w1)`` (CMO batch mode, Remix), which ``addcmul`` reproduces bit for bit; else two products."""
        view = (-1, 1, 1, 1)
        w, w1 = w.to(x.dtype).view(view), w1.to(x.dtype).view(view)
        return torch.addcmul(x * w, other, w1) if fused else x * w + other * w1

    def _self_mix(self, x: torch.Tensor, d: Draws) -> torch.Tensor:
        view = (-1, 1, 1, 1)
        partner = x.index_select(0, d['perm'])
        mixed = self._blend(x, partner, d['w'], d['w1'], fused=self.self_mixer is self.loader.remix)
        x = torch.where(d['blend'].view(view), mixed, x)
        mask = box_masks(d['box'], *self.img_shape) & d['paste'][:, None, None]
        return torch.where(mask.unsqueeze(1), partner, x)
