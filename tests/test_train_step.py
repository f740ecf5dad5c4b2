"""The graph-safe ``--data-on-device`` step (``--cuda-graph``): on the CPU (its stand-in, run eagerly) it trains the
weights train_cmo.py's ``train_one_epoch`` trains, on every option; compiled with ``torch.compile(fullgraph=True)``
it has no graph break (nothing in it reads a tensor on the host); what it cannot hold is refused by name."""
import argparse

import pytest
import timm
import torch
from timm.utils import ModelEmaV3

import train_cmo
from timm_cmo.data import CMOConfig
from timm_cmo.data.device_loader import DeviceEvalLoader, DeviceLoader
from timm_cmo.data.mixup import MixupCutmix
from timm_cmo.data.remix import RemixMixup
from timm_cmo.losses import create_loss
from timm_cmo.train_step import GraphedTrainStep, check_graphable

COUNTS = [24, 12, 6, 3]
C = len(COUNTS)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def tiny_data():
    """45 random 16x16 uint8 images, classes with COUNTS images each."""
    g = torch.Generator().manual_seed(0)
    targets = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])
    return torch.randint(0, 256, (len(targets), 3, 16, 16), dtype=torch.uint8, generator=g), targets


def build(loader_opts, loss_name, reweight, ema=False, opt='momentum', seed=3):
    """(model, loader, loss, optimizer, EMA) of a case, the model seeded alike each time."""
    opts = dict(loader_opts)
    cmo, remix, mixup = opts.pop('cmo', None), opts.pop('remix', None), opts.pop('mixup', None)
    smoothing = opts.get('label_smoothing', 0.)
    images, targets = tiny_data()
    loader = DeviceLoader(
        images, targets, 8, MEAN, STD, num_classes=C, seed=seed, epochs=4,
        cmo=CMOConfig.from_flags(cmo_start_epoch=-1, **cmo) if cmo is not None else None,
        remix=RemixMixup(C, COUNTS, label_smoothing=smoothing, **remix) if remix is not None else None,
        mixup=MixupCutmix(C, label_smoothing=smoothing, **mixup) if mixup is not None else None, **opts)
    torch.manual_seed(0)
    if loss_name == 'ride':
        model = timm.create_model('ride_resnet20_cifar', num_classes=C)
    else:
        model = timm.create_model('resnet20_cifar', num_classes=C, head_norm=loss_name == 'ldam')
    loss_fn = create_loss(loss_name, COUNTS, reweight=reweight, drw_epoch=1 if reweight == 'drw' else None)
    if loss_fn.needs_experts:
        model.set_expert_training(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4,
                                nesterov=opt == 'nesterov')
    return model, loader, loss_fn, optimizer, ModelEmaV3(model, decay=0.9) if ema else None


CASES = {  # (loader options, loss, reweight[, EMA, optimizer])
    'plain-ce': ({}, 'ce', 'none'),
    'cmo-batch-ce-drw': (dict(cmo=dict(cmo_prob=0.7)), 'ce', 'drw'),
    'cmo-elem-ldam-drw-head-norm': (dict(cmo=dict(cmo_mode='elem')), 'ldam', 'drw'),
    'cmo-smoothing-bs-cb-ema': (dict(cmo={}, label_smoothing=0.1), 'bs', 'cb', True),
    'smoothing-ce-drw-nesterov': (dict(label_smoothing=0.1), 'ce', 'drw', False, 'nesterov'),
    'ros-ce': (dict(ros_r=1.0), 'ce', 'none'),
    'cmo-back-keep-last-la-drw': (dict(cmo=dict(cmo_variant='back'), drop_last=False), 'la', 'drw'),
    'cmo-minor-ros-focal': (dict(cmo=dict(cmo_variant='minor'), ros_r=0.5), 'focal', 'none'),
    'remix-ce-drw': (dict(remix={}), 'ce', 'drw'),
    'remix-cutmix-ros-smoothing-ldam-drw': (dict(remix=dict(mode='cutmix'), ros_r=1.0, label_smoothing=0.1),
                                            'ldam', 'drw'),
    'ride-drw-ema': ({}, 'ride', 'drw', True),
    'remix-ride-drw-keep-last': (dict(remix={}, drop_last=False), 'ride', 'drw'),
    'mixup-pair-ce-drw': (dict(mixup=dict(mixup_alpha=1.0, mode='pair')), 'ce', 'drw'),
    'cutmix-minmax-elem-smoothing-bs': (dict(mixup=dict(mixup_alpha=0., cutmix_alpha=1.0, cutmix_minmax=(0.2, 0.8),
                                                        mode='elem'), label_smoothing=0.1), 'bs', 'none'),
    'mixup-cutmix-switch-batch-ce': (dict(mixup=dict(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.7)), 'ce', 'none'),
    'cmo-jitter-la-drw': (dict(cmo=dict(cmo_variant='jitter')), 'la', 'drw'),
    'cmo-blur-ce': (dict(cmo=dict(cmo_variant='blur')), 'ce', 'none'),
    'cmo-mixup-batch-ce': (dict(cmo=dict(cmo_variant='mixup')), 'ce', 'none'),
    'cmo-mixup-elem-ce-keep-last': (dict(cmo=dict(cmo_variant='mixup', cmo_mode='elem'), drop_last=False), 'ce',
                                    'none'),
    'cmo-lade': (dict(cmo={}), 'lade', 'none'),
    'cmo-elem-smoothing-lade-drw': (dict(cmo=dict(cmo_mode='elem'), label_smoothing=0.1), 'lade', 'drw'),
    'remix-focal-drw': (dict(remix={}), 'focal', 'drw'),
}
ARGS = argparse.Namespace(channels_last=False, clip_grad=None, clip_mode='norm', log_interval=2, rank=0,
                          world_size=1, distributed=False, grad_accum_steps=1)


def train(case, graphed: bool, epochs=(0, 1, 2), clip=None):
    """Weights (and EMA weights) after ``epochs`` through either path; the lr changes every epoch."""
    model, loader, loss_fn, optimizer, model_ema = build(*case)
    args = argparse.Namespace(**{**vars(ARGS), **(dict(clip_grad=clip[0], clip_mode=clip[1]) if clip else {})})
    step = GraphedTrainStep(model, loss_fn, optimizer, loader, model_ema=model_ema, clip_grad=args.clip_grad,
                            clip_mode=args.clip_mode) if graphed else None
    assert step is None or not step.capture
    losses = []
    for epoch in epochs:
        for group in optimizer.param_groups:
            group['lr'] = 0.05 / (epoch + 1)
        loader.set_epoch(epoch)
        loss_fn.set_epoch(epoch)
        if graphed:
            losses.append(train_cmo.train_one_epoch_graphed(epoch, step, args)['loss'])
        else:
            losses.append(train_cmo.train_one_epoch(epoch, model, loader, optimizer, loss_fn, args,
                                                    torch.device('cpu'), model_ema=model_ema)['loss'])
    state = dict(model.state_dict())
    if model_ema is not None:
        state.update({f'ema.{k}': v for k, v in model_ema.module.state_dict().items()})
    return state, losses


def assert_same(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], msg=k, **(tol or dict(rtol=1e-5, atol=1e-6)))


@pytest.mark.parametrize('case', list(CASES))
def test_graph_safe_step_equals_train_one_epoch(case):
    """Three epochs (DRW switching on at epoch 1, the lr changing between epochs) of the graph-safe step give the
    weights, EMA weights and epoch losses of train_cmo.py's ``train_one_epoch`` on the same loader (to fp
    round-off; on this machine they agree bit for bit)."""
    ref, ref_losses = train(CASES[case], graphed=False)
    got, got_losses = train(CASES[case], graphed=True)
    assert_same(ref, got)
    assert got_losses == pytest.approx(ref_losses, rel=1e-6)


@pytest.mark.parametrize('clip', [(0.5, 'norm'), (0.01, 'value')])
def test_graph_safe_step_clips_as_timm(clip):
    """``--clip-grad`` by norm and by value: the weights timm's ``dispatch_clip_grad`` gives."""
    ref, _ = train(CASES['cmo-batch-ce-drw'], graphed=False, epochs=(0, 1), clip=clip)
    got, _ = train(CASES['cmo-batch-ce-drw'], graphed=True, epochs=(0, 1), clip=clip)
    assert_same(ref, got)


@pytest.mark.parametrize('case', ['cmo-elem-ldam-drw-head-norm', 'cmo-smoothing-bs-cb-ema', 'remix-ride-drw-keep-last',
                                  'cutmix-minmax-elem-smoothing-bs', 'cmo-jitter-la-drw', 'cmo-mixup-elem-ce-keep-last',
                                  'cmo-elem-smoothing-lade-drw'])
def test_step_compiles_without_a_graph_break(case):
    """``torch.compile(fullgraph=True)`` of the whole step (batch from the drawn epoch, mixing, forward, loss,
    ``autograd.grad``, SGD, EMA) of every batch size compiles (a host read would be a graph break, an error
    under fullgraph) and the compiled step updates the weights as the eager one does."""
    import torch._dynamo
    states = []
    for compiled in (False, True):
        model, loader, loss_fn, optimizer, model_ema = build(*CASES[case])
        loader.set_epoch(1)
        loss_fn.set_epoch(1)
        step = GraphedTrainStep(model, loss_fn, optimizer, loader, model_ema=model_ema)
        step.begin_epoch()
        step._set_host_state(0)
        for batch_size, _ in step._plan:  # the full batches' step, then the last, smaller batch's
            fn = step.step_function(batch_size)
            if compiled:
                torch._dynamo.reset()
                with torch._dynamo.config.patch(trace_autograd_ops=True):  # autograd.grad inside the graph
                    torch.compile(fn, fullgraph=True, backend='eager')()
            else:
                fn()
        states.append(dict(model.state_dict()))
    assert_same(*states)


def test_evaluate_in_fixed_batches_equals_train_cmo_evaluate():
    """The graph-safe evaluation (fixed batches of 16, the last one padded and masked) counts what train_cmo.py's
    ``evaluate`` counts over the 45 images."""
    model, loader, loss_fn, optimizer, _ = build(*CASES['plain-ce'])
    step = GraphedTrainStep(model, loss_fn, optimizer, loader)
    images, targets = tiny_data()
    eval_loader = DeviceEvalLoader(images, targets, 16, MEAN, STD)
    args = argparse.Namespace(ldam_s=30., channels_last=False, log_interval=50, rank=0, distributed=False)
    ref = train_cmo.evaluate(model, eval_loader, args, torch.device('cpu'), num_classes=C)
    got = train_cmo.evaluate(model, eval_loader, args, torch.device('cpu'), num_classes=C, graphed=step)
    assert torch.equal(got._counts, ref._counts)
    ref, got = ref.summary(COUNTS), got.summary(COUNTS)
    assert ref.keys() == got.keys()
    for k, v in ref.items():
        assert got[k] == (v if v is None else pytest.approx(v, rel=1e-6)), k


def test_what_cannot_be_graphed_is_refused_by_name():
    model, loader, loss_fn, optimizer, _ = build(*CASES['plain-ce'])
    with pytest.raises(ValueError, match='--data-on-device loader'):
        check_graphable(model, loss_fn, optimizer, [(torch.zeros(1), torch.zeros(1))])
    adam = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match='Adam'):
        check_graphable(model, loss_fn, adam, loader)
    with pytest.raises(ValueError, match='--clip-mode agc'):
        check_graphable(model, loss_fn, optimizer, loader, clip_mode='agc')
    with pytest.raises(ValueError, match='IB'):
        check_graphable(model, create_loss('ib', COUNTS), optimizer, loader)
    with pytest.raises(ValueError, match='BBN'):
        check_graphable(model, create_loss('bbn', COUNTS), optimizer, loader)
    with pytest.raises(ValueError, match='no loss scaling'):
        GraphedTrainStep(model, loss_fn, optimizer, loader, autocast_dtype=torch.float16)
    with pytest.raises(ValueError, match='CUDA device'):
        GraphedTrainStep(model, loss_fn, optimizer, loader, capture=True)
    images, targets = tiny_data()
    erasing = DeviceLoader(images, targets, 8, MEAN, STD, num_classes=C, re_prob=0.25)
    with pytest.raises(ValueError, match='random erasing'):
        check_graphable(model, loss_fn, optimizer, erasing)


@pytest.mark.parametrize('case', ['cmo-batch-ce-drw', 'remix-ride-drw-keep-last'])
def test_graph_safe_step_under_bf16_autocast_equals_train_one_epoch(case):
    """``--amp --amp-dtype bfloat16``: the graph-safe step's autocast (its cache off, as graphs need) gives the
    weights of train_one_epoch under timm's autocast."""
    from functools import partial
    states = []
    for graphed in (False, True):
        model, loader, loss_fn, optimizer, _ = build(*CASES[case])
        step = GraphedTrainStep(model, loss_fn, optimizer, loader, autocast_dtype=torch.bfloat16) if graphed else None
        amp = partial(torch.autocast, device_type='cpu', dtype=torch.bfloat16)
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            loss_fn.set_epoch(epoch)
            if graphed:
                train_cmo.train_one_epoch_graphed(epoch, step, ARGS)
            else:
                train_cmo.train_one_epoch(epoch, model, loader, optimizer, loss_fn, ARGS, torch.device('cpu'),
                                          amp_autocast=amp)
        states.append(dict(model.state_dict()))
    assert_same(*states)
