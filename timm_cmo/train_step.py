""" The ``--data-on-device`` training step as one CUDA graph (``--cuda-graph``), and evaluation in fixed-size batches.

A ResNet-32 step on CIFAR is launch-bound on a GPU: some 400 small kernels, each costing more host time to launch
than device time to run. :class:`GraphedTrainStep` restructures train_cmo.py's step so that nothing in it needs
the host, captures it once per batch shape with ``torch.cuda.graph`` and replays it:

* the batch: every random draw of the epoch (plan, crops and flips, CMO decisions, lambda and boxes, Remix
  permutations and label weights, Mixup / CutMix) is made at the start of the epoch from the loader's own
  streams and kept in static device buffers that a device step counter indexes
  (:class:`~timm_cmo.data.device_draws.DrawnBatches`); boxes are pasted through masks;
* the loss: the DRW weights in force and RIDE's temperature live in device buffers that ``set_epoch`` updates in
  place (:meth:`~timm_cmo.losses.LongTailLoss.make_graph_safe`);
* the update: ``torch.autograd.grad``, then timm's SGD (``--opt momentum``, or ``sgd`` / ``nesterov``: every
  parameter group with its own lr, weight decay and momentum) as foreach operations with the learning rate a
  device tensor written between replays; ``--clip-grad`` (norm or value); timm's ``ModelEmaV3`` update with its
  weight a device tensor too (``1 - decay``; 1 for the first two updates, as ``ModelEmaV3.get_decay``);
* the step's loss goes to device buffers (per step, and their running sum) read at the log points only.

The full batches share one graph and the epoch's last, smaller batch (``--no-drop-last``) gets its own; both are
captured in one memory pool (``torch.cuda.graph_pool_handle``) after a warm-up on a side stream, the model,
optimizer and EMA state put back as they were before the warm-up. Evaluation runs in fixed-size batches, the last
one padded and the padding masked out of every metric, the forward pass graphed too.

Without CUDA (or with ``capture=False``) the same restructured step runs eagerly: the CPU stand-in, tested
against train_cmo.py's ``train_one_epoch`` on every option (same weights to float round-off) and, compiled with
``torch.compile(fullgraph=True)``, without a graph break (nothing in it reads a tensor on the host).

Not supported (a ``ValueError`` naming the option): the ordinary loader, gradient accumulation, random erasing,
AMP float16 (loss scaling), distributed training, losses that need features (IB) or BBN's dual batch, second
stages, the Causal Norm head, optimizers other than SGD, ``--clip-mode agc``.
"""
import math
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import torch
import torch.nn as nn

from .data.device_draws import DrawnBatches
from .data.device_loader import DeviceEvalLoader, DeviceLoader, normalize
from .metrics import ClassAccuracy
from .models import is_causal_norm

__all__ = ['GraphedTrainStep', 'check_graphable']

WARMUP_STEPS = 3  # eager steps on a side stream before a capture (PyTorch's recipe for whole-network capture)


def check_graphable(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, loader,
                    model_ema=None, clip_mode: str = 'norm') -> None:
    """Raise ``ValueError`` naming what keeps this training step from being graphed (nothing: return)."""
    if not isinstance(loader, DeviceLoader):
        raise ValueError('the training batches must come from the --data-on-device loader (the ordinary loader '
                         'reads and augments them on the host, which a graph cannot replay)')
    if loader.random_erasing is not None:
        raise ValueError('random erasing (--reprob) draws inside the step from the global generator')
    if getattr(loader.planner, 'dual_r', None) is not None or getattr(loss_fn, 'needs_dual', False):
        raise ValueError('BBN\'s dual (re-balancing) batch and two-branch loss are not drawn ahead (--loss bbn)')
    if getattr(loss_fn, 'needs_features', False):
        raise ValueError(f'{type(loss_fn).__name__} takes the penultimate features and switches loss at an epoch')
    if not callable(getattr(loss_fn, 'make_graph_safe', None)):
        raise ValueError(f'{type(loss_fn).__name__} is not a timm_cmo loss (no make_graph_safe)')
    if type(optimizer) is not torch.optim.SGD:
        raise ValueError(f'the optimizer is {type(optimizer).__name__}: the graphed update is SGD\'s '
                         f'(--opt momentum, sgd or nesterov)')
    for group in optimizer.param_groups:
        if group.get('maximize') or group.get('differentiable'):
            raise ValueError('SGD with maximize / differentiable is not supported')
    if clip_mode not in ('norm', 'value'):
        raise ValueError(f'--clip-mode {clip_mode}: the graphed step clips by norm or value')
    if is_causal_norm(model):
        raise ValueError('the Causal Norm head (--head causal) sets its moving-average decay from the lr on the host')
    if model_ema is not None:
        if getattr(model_ema, 'exclude_buffers', False) or getattr(model_ema, 'device', None) is not None or \
                getattr(model_ema, 'dtype', None) is not None or not getattr(model_ema, 'foreach', True):
            raise ValueError('the EMA must be timm ModelEmaV3 defaults (foreach, buffers included, on the model\'s '
                             'device and dtype)')
        if getattr(model_ema, 'use_warmup', False):
            raise ValueError('EMA decay warm-up is not supported')


class _Group(NamedTuple):
    """One optimizer parameter group: its trainable parameters, momentum buffers and the lr on the device."""
    group: Dict[str, Any]
    params: List[torch.Tensor]
    bufs: List[torch.Tensor]
    neg_lr: torch.Tensor  # -lr, written between replays


class _Static:
    """One batch size: its draw buffers (steps, ...) and its graph (None: run eagerly)."""

    def __init__(self, draws: Dict[str, torch.Tensor], fixed_row: bool):
        self.draws = draws
        self.fixed_row = fixed_row  # the last, smaller batch: one row, read at row 0
        self.graph: Optional['torch.cuda.CUDAGraph'] = None
        self.fn: Optional[Callable[[], None]] = None


class GraphedTrainStep:
    """train_cmo.py's ``--data-on-device`` training step, graph-safe; captured as CUDA graphs on a GPU.

    Call :meth:`begin_epoch` after ``loader.set_epoch`` and ``loss_fn.set_epoch``, then :meth:`run` for each step
    (it writes the learning rate and EMA weight of the step and replays); the epoch's losses are in :attr:`losses`.
    :meth:`evaluate` evaluates a model (the trained one, its EMA) in fixed-size batches.

    Args:
        model: The model being trained (a multi-expert model with its expert training output on, for RIDE).
        loss_fn: A timm_cmo loss (made graph-safe here).
        optimizer: ``torch.optim.SGD`` (timm's ``momentum`` / ``sgd`` / ``nesterov``); its per-parameter momentum
            buffers are created (zeros: the same first step) or taken over (a resumed run) and kept in its state,
            so checkpoints hold them.
        loader: The :class:`~timm_cmo.data.device_loader.DeviceLoader`.
        model_ema: timm ``ModelEmaV3`` of ``model``, or None.
        autocast_dtype: ``torch.bfloat16`` for AMP (autocast with its cache off, as graphs need), or None.
        clip_grad, clip_mode: timm's gradient clipping (``norm``: the total 2-norm, or ``value``), or None.
        capture: Capture CUDA graphs; default: on a CUDA device.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, loader: DeviceLoader,
                 model_ema=None, autocast_dtype: Optional[torch.dtype] = None, clip_grad: Optional[float] = None,
                 clip_mode: str = 'norm', capture: Optional[bool] = None):
        check_graphable(model, loss_fn, optimizer, loader, model_ema, clip_mode)
        if autocast_dtype not in (None, torch.bfloat16):
            raise ValueError(f'AMP {autocast_dtype}: the graphed step has no loss scaling, use bfloat16')
        self.model, self.loss_fn, self.optimizer, self.model_ema = model, loss_fn, optimizer, model_ema
        self.batches = DrawnBatches(loader)
        self.device = loader.device
        self.capture = self.device.type == 'cuda' if capture is None else bool(capture)
        if self.capture and self.device.type != 'cuda':
            raise ValueError(f'CUDA graphs need a CUDA device, got {self.device}')
        self.autocast_dtype = autocast_dtype
        self.clip_grad, self.clip_mode = clip_grad, clip_mode
        loss_fn.make_graph_safe()
        self.groups: List[_Group] = []
        for group in optimizer.param_groups:
            params = [p for p in group['params'] if p.requires_grad]
            bufs = []
            if group['momentum'] != 0:
                for p in params:
                    state = optimizer.state[p]
                    if state.get('momentum_buffer') is None:  # zeros: m * 0 + g is the first step's g exactly
                        state['momentum_buffer'] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    bufs.append(state['momentum_buffer'])
            self.groups.append(_Group(group, params, bufs, torch.zeros((), device=self.device)))
        self.params = [p for g in self.groups for p in g.params]
        self.ema_float: List[torch.Tensor] = []
        self.model_float: List[torch.Tensor] = []
        self.ema_copy: List[Any] = []
        if model_ema is not None:
            for ema_v, model_v in zip(model_ema.module.state_dict().values(), model.state_dict().values()):
                if ema_v.is_floating_point():
                    if ema_v.dtype != model_v.dtype or ema_v.dtype == torch.bfloat16:
                        raise ValueError('the EMA update is graphed for float32 / float64 weights of the model dtype')
                    self.ema_float.append(ema_v)
                    self.model_float.append(model_v)
                else:
                    self.ema_copy.append((ema_v, model_v))
        self.ema_weight = torch.ones((), device=self.device)
        self.step_index = torch.zeros((), dtype=torch.int64, device=self.device)
        self.row0 = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.losses: Optional[torch.Tensor] = None  # the epoch's step losses
        self.loss_sum = torch.zeros((), device=self.device)  # their running sum
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._static: Dict[int, _Static] = {}
        self._plan: List[Any] = []
        self._host: Dict[str, Any] = {}
        self._eval: Dict[int, Any] = {}

    # --- the step

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def step_function(self, batch_size: int) -> Callable[[], None]:
        """The step of the epoch's batches of ``batch_size`` (after :meth:`begin_epoch`): one training step of the
        batch at the device step counter, no host work. What is captured; public for tests (``torch.compile``)."""
        static = self._static[batch_size]

        def step():
            row = self.row0 if static.fixed_row else self.step_index.view(1)
            d = {k: v.index_select(0, row).squeeze(0) for k, v in static.draws.items()}
            x, y, mix = self.batches.batch(d)
            with self._autocast():
                output = self.model(x)
                loss = self.loss_fn(output, y) if mix is None else self.loss_fn(output, y, mix=mix)
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            with torch.no_grad():
                self._update(list(grads))
                self.losses.index_copy_(0, self.step_index.view(1), loss.detach().float().view(1))
                self.loss_sum.add_(loss.detach())  # as train_one_epoch sums them (float32, in step order)
                self.step_index.add_(1)

        return step

    def _update(self, grads: List[Optional[torch.Tensor]]) -> None:
        """Clip, SGD and EMA, as timm's train loop with torch's SGD (a parameter without a gradient is skipped)."""
        per_group, start = [], 0
        for g in self.groups:
            gg = grads[start:start + len(g.params)]
            start += len(g.params)
            keep = [i for i, x in enumerate(gg) if x is not None]
            per_group.append((g, keep, [gg[i] for i in keep]))
        every = [x for _, _, gs in per_group for x in gs]
        if self.clip_grad is not None and every:
            if self.clip_mode == 'norm':  # torch.nn.utils.clip_grad_norm_
                total = torch.nn.utils.get_total_norm(every, 2.0)
                torch._foreach_mul_(every, torch.clamp(self.clip_grad / (total + 1e-6), max=1.0))
            else:  # torch.nn.utils.clip_grad_value_
                torch._foreach_clamp_min_(every, -self.clip_grad)
                torch._foreach_clamp_max_(every, self.clip_grad)
        for g, keep, gs in per_group:
            if not gs:
                continue
            params = [g.params[i] for i in keep]
            hp = g.group
            if hp['weight_decay'] != 0:
                gs = torch._foreach_add(gs, params, alpha=hp['weight_decay'])
            if hp['momentum'] != 0:
                bufs = [g.bufs[i] for i in keep]
                torch._foreach_mul_(bufs, hp['momentum'])
                torch._foreach_add_(bufs, gs, alpha=1 - hp['dampening'])
                gs = torch._foreach_add(gs, bufs, alpha=hp['momentum']) if hp['nesterov'] else bufs
            # p - lr * g with a device lr: addcmul rounds as torch SGD's add_(g, alpha=-lr) (tested bit for bit)
            torch._foreach_addcmul_(params, gs, [g.neg_lr] * len(params))
        if self.ema_float:
            torch._foreach_lerp_(self.ema_float, self.model_float, [self.ema_weight] * len(self.ema_float))
        for ema_v, model_v in self.ema_copy:
            ema_v.copy_(model_v)

    # --- per epoch

    def begin_epoch(self) -> int:
        """Draw the epoch (the loader's and the loss's epochs set), load the draws into the static buffers (the
        first time: allocate them and capture); returns the number of steps."""
        self.model.train()
        groups = self.batches.draw()
        steps = sum(g.steps for g in groups)
        if self.losses is None:
            self.losses = torch.zeros(steps, device=self.device)
        elif steps != self.losses.shape[0]:
            raise RuntimeError(f'the epoch has {steps} steps, the graphs were captured for {self.losses.shape[0]}')
        self.step_index.zero_()
        self.loss_sum.zero_()
        self._plan = []
        for i, g in enumerate(groups):
            static = self._static.get(g.batch_size)
            if static is None:
                buffers = {k: torch.empty_like(v) for k, v in g.draws.items()}
                static = self._static[g.batch_size] = _Static(buffers, fixed_row=i > 0)
            for k, v in g.draws.items():
                static.draws[k].copy_(v)
            self._plan.append((g.batch_size, g.steps))
        return steps

    def _state(self) -> List[torch.Tensor]:
        """Everything a step changes (what the warm-up before a capture must leave as it was)."""
        bufs = [b for g in self.groups for b in g.bufs]
        return (self.params + bufs + list(self.model.buffers()) + self.ema_float + [e for e, _ in self.ema_copy]
                + [self.losses, self.loss_sum, self.step_index])

    def _ensure_captured(self, static: _Static, batch_size: int) -> None:
        if static.fn is not None:
            return
        static.fn = self.step_function(batch_size)
        if not self.capture:
            return
        state = self._state()
        saved = [t.detach().clone() for t in state]
        at = saved[-1]  # the step counter: every warm-up step (and the capture) reads this step's draws
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_STEPS):
                self.step_index.copy_(at)
                static.fn()
            self.step_index.copy_(at)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static.fn()
        with torch.no_grad():
            for t, s in zip(state, saved):
                t.copy_(s)
        static.graph = graph

    def _set_host_state(self, num_updates: int) -> None:
        """The step's learning rates and EMA weight, written to the device only when they change."""
        lrs = tuple(g.group['lr'] for g in self.groups)
        if lrs != self._host.get('lr'):
            for g, lr in zip(self.groups, lrs):
                g.neg_lr.fill_(-lr)
            self._host['lr'] = lrs
        if self.model_ema is not None:
            weight = 1. - self.model_ema.get_decay(num_updates)
            if weight != self._host.get('ema'):
                self.ema_weight.fill_(weight)
                self._host['ema'] = weight

    def run(self, index: int, num_updates: int) -> int:
        """Step ``index`` of the epoch (the ``num_updates``-th of the run: the EMA decay); returns its batch size."""
        start = 0
        for batch_size, steps in self._plan:
            if index < start + steps:
                break
            start += steps
        else:
            raise IndexError(f'step {index} of an epoch of {start}')
        static = self._static[batch_size]
        self._set_host_state(num_updates)
        self._ensure_captured(static, batch_size)
        if static.graph is not None:
            static.graph.replay()
        else:
            static.fn()
        return batch_size

    # --- evaluation

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DeviceEvalLoader, num_classes: int,
                 logit_scale: float = 1.) -> ClassAccuracy:
        """Per-class accuracy and calibration of ``model`` on the ``--data-on-device`` evaluation set, in batches of
        ``loader.batch_size`` (the last padded with zeros, the padding left out of every count); the forward pass
        is a CUDA graph per model when capturing."""
        model.eval()
        b = loader.batch_size
        entry = self._eval.get(id(model))
        if entry is None or entry[0] is not model:
            shape = (b, *loader.images.shape[1:])
            x_static = torch.zeros(shape, dtype=loader.img_dtype, device=self.device)
            if loader.channels_last:
                x_static = x_static.contiguous(memory_format=torch.channels_last)

            def forward():
                with self._autocast():
                    return model(x_static)

            graph = out = None
            if self.capture:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(WARMUP_STEPS):
                        forward()
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = forward()
            entry = self._eval[id(model)] = (model, x_static, forward, graph, out)
        _, x_static, forward, graph, out = entry
        acc = ClassAccuracy(num_classes, device=self.device, logit_scale=logit_scale)
        positions = torch.arange(b, device=self.device)
        n_total = loader.targets.shape[0]
        for i in range(math.ceil(n_total / b)):
            sl = slice(i * b, (i + 1) * b)
            images, target = loader.images[sl], loader.targets[sl]
            n = target.shape[0]
            x_static[:n].copy_(normalize(images, loader.mean, loader.std, loader.img_dtype, loader.channels_last))
            valid = None
            if n < b:
                x_static[n:].zero_()
                target = torch.cat([target, target.new_zeros(b - n)])
                valid = positions < n
            if graph is not None:
                graph.replay()
                output = out
            else:
                output = forward()
            acc.update(output.float(), target, valid)
        acc.all_reduce()
        acc.experts_used = None
        return acc
