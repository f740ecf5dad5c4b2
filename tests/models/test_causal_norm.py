"""Causal Norm head: logits, moving average and TDE against float64 references from the paper's equations; the
``causal_norm`` model argument on CIFAR and timm ResNets; the buffer through checkpoints, Hub exports,
torch.compile and DDP (two gloo processes)."""
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import save_for_hf
from timm.models.resnet import ResNet

import timm_cmo  # noqa: F401  (patches ResNet and the CIFAR ResNets)
from timm_cmo.models import CausalNormClassifier, add_causal_norm_arg, is_causal_norm, set_causal_norm_lr

REPO = Path(__file__).resolve().parents[2]
D64 = torch.float64


def reference_logits(x, weight, heads, tau, gamma, alpha=0.0, x_bar=None):
    """The paper's Eq. (training logits) and, with alpha and x_bar, its TDE logits, one class and head at a time:

        y_i = tau/K sum_k [ w_ik.x_k / ((|w_ik| + gamma) |x_k|)  -  alpha cos(x_k, d_k) w_ik.d_k / (|w_ik| + gamma) ]

    with d_k = x_bar_k / |x_bar_k| (the TDE term only when alpha > 0). Plain torch ops, so autograd gives gradients.
    """
    n, dim = x.shape
    size = dim // heads
    rows = []
    for b in range(n):
        row = []
        for i in range(weight.shape[0]):
            total = x.new_zeros(())
            for k in range(heads):
                xk = x[b, k * size:(k + 1) * size]
                wk = weight[i, k * size:(k + 1) * size]
                wnorm = torch.sqrt((wk * wk).sum()) + gamma
                xnorm = torch.sqrt((xk * xk).sum())
                total = total + (wk * xk).sum() / (wnorm * xnorm)
                if alpha:
                    ck = x_bar[k * size:(k + 1) * size]
                    dk = ck / torch.sqrt((ck * ck).sum())
                    cos = (xk * dk).sum() / xnorm
                    total = total - alpha * cos * (wk * dk).sum() / wnorm
            row.append(total * tau / heads)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def make_head(dim=6, classes=4, heads=2, seed=0, **kwargs):
    torch.manual_seed(seed)
    return CausalNormClassifier(dim, classes, heads=heads, **kwargs).to(D64)


@pytest.mark.parametrize('heads,tau,gamma', [(2, 16.0, 1 / 32), (3, 10.0, 0.5), (1, 16.0, 0.0)])
def test_training_logits_and_gradients_match_the_paper(heads, tau, gamma):
    head = make_head(heads=heads, tau=tau, gamma=gamma).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, generator=g, dtype=D64).abs() + 0.05  # pooled ReLU features are non-negative
    y = torch.randint(0, 4, (5,), generator=g)
    x_mod = x.clone().requires_grad_(True)
    out = head(x_mod)
    x_ref = x.clone().requires_grad_(True)
    w_ref = head.weight.detach().clone().requires_grad_(True)
    ref = reference_logits(x_ref, w_ref, heads, tau, gamma)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    F.cross_entropy(out, y).backward()
    F.cross_entropy(ref, y).backward()
    torch.testing.assert_close(x_mod.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, w_ref.grad, rtol=1e-10, atol=1e-12)
    assert out.abs().max() <= tau * (1 + 1e-12)  # each head's term is a cosine shrunk by gamma, times tau / K


def test_moving_average_accumulates_the_batch_means_with_the_momentum():
    head = make_head(momentum=0.9).train()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(n, 6, generator=g, dtype=D64) for n in (4, 7, 3)]
    for x in batches:
        head(x)
    expected = [0.0] * 6
    for x in batches:  # x_bar <- mu x_bar + mean(x), from 0
        expected = [0.9 * e + sum(float(x[b, j]) for b in range(x.shape[0])) / x.shape[0]
                    for j, e in enumerate(expected)]
    torch.testing.assert_close(head.embed_mean, torch.tensor(expected, dtype=D64), rtol=1e-12, atol=1e-12)
    before = head.embed_mean.clone()
    head.eval()(batches[0])
    with torch.no_grad():
        head.train()  # no_grad does not stop the update: train mode does it
        head(batches[1])
    torch.testing.assert_close(head.embed_mean, 0.9 * before + batches[1].mean(0), rtol=1e-12, atol=1e-12)


def test_lr_tied_momentum_is_the_authors_imagenet_rule():
    """mu = 1 - (1 - 0.9) * min(50 * lr, 1), set per epoch; lr_scale 0 keeps mu."""
    head = make_head(momentum=0.9, lr_scale=50.0).train()
    for lr, mu in ((0.2, 0.9), (0.02, 0.9), (0.01, 0.95), (0.002, 0.99), (0.0, 1.0)):
        model = nn.Sequential(nn.Identity(), head)
        set_causal_norm_lr(model, lr)
        assert float(head.decay) == pytest.approx(mu, abs=1e-15), lr
    x = torch.ones(2, 6, dtype=D64)
    head.embed_mean.fill_(2.0)
    set_causal_norm_lr(head, 0.01)
    head(x)
    torch.testing.assert_close(head.embed_mean, torch.full((6,), 0.95 * 2 + 1, dtype=D64))
    fixed = make_head(momentum=0.8)
    set_causal_norm_lr(fixed, 0.0)
    assert float(fixed.decay) == pytest.approx(0.8)
    assert 'decay' not in fixed.state_dict() and 'embed_mean' in fixed.state_dict()


@pytest.mark.parametrize('heads,alpha', [(2, 3.0), (2, 1.5), (3, 1.0)])
def test_tde_logits_and_gradients_match_the_paper(heads, alpha):
    head = make_head(heads=heads, alpha=alpha, gamma=1 / 32, tau=16.0)
    g = torch.Generator().manual_seed(3)
    head.embed_mean.copy_(torch.rand(6, generator=g, dtype=D64) * 5)
    head.eval()
    x = torch.randn(4, 6, generator=g, dtype=D64)
    x_mod = x.clone().requires_grad_(True)
    out = head(x_mod)
    x_ref = x.clone().requires_grad_(True)
    w_ref = head.weight.detach().clone().requires_grad_(True)
    ref = reference_logits(x_ref, w_ref, heads, 16.0, 1 / 32, alpha, head.embed_mean.clone())
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x_mod.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, w_ref.grad, rtol=1e-10, atol=1e-12)
    # numerical gradients of the TDE logits (finite differences) agree too
    mean = head.embed_mean.clone()
    assert torch.autograd.gradcheck(lambda a, w: torch.func.functional_call(head, {'weight': w}, (a,)),
                                    (x.clone().requires_grad_(), head.weight.detach().clone().requires_grad_()))
    # the counterfactual term changes the logits; alpha 0 gives the training logits; eval leaves x_bar alone
    plain = reference_logits(x, head.weight.detach(), heads, 16.0, 1 / 32)
    assert (out - plain).abs().max() > 1e-3
    head.alpha = 0.0
    torch.testing.assert_close(head(x), plain, rtol=1e-12, atol=1e-12)
    assert torch.equal(head.embed_mean, mean)


def test_untrained_average_gives_the_training_logits_not_nan():
    head = make_head().eval()
    x = torch.randn(3, 6, dtype=D64)
    out = head(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference_logits(x, head.weight.detach(), 2, 16.0, 1 / 32))


def test_authors_init_layout_and_repr():
    torch.manual_seed(0)
    head = CausalNormClassifier(64, 10)
    assert head.weight.shape == (10, 64) and dict(head.named_parameters()).keys() == {'weight'}
    assert head.weight.abs().max() <= 1 / 8 and head.weight.abs().max() > 0.1  # uniform(+-1/sqrt(64))
    assert torch.equal(head.embed_mean, torch.zeros(64))
    assert (head.heads, head.tau, head.gamma, head.alpha, head.momentum) == (2, 16.0, 1 / 32, 3.0, 0.9)
    assert 'heads=2' in repr(head) and 'alpha=3' in repr(head)


def test_amp_keeps_the_buffer_in_float32():
    head = CausalNormClassifier(8, 3).train()
    x = torch.rand(4, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = head(x.bfloat16())
    assert head.embed_mean.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(head.embed_mean, x.bfloat16().float().mean(0))


@pytest.mark.parametrize('kwargs,message', [
    (dict(heads=3), 'heads 3 must divide the feature size 8'),
    (dict(heads=0), 'heads must be an integer >= 1, got 0'),
    (dict(heads=2.0), 'heads must be an integer >= 1, got 2.0'),
    (dict(tau=0.0), 'tau must be > 0, got 0.0'),
    (dict(gamma=-1.0), 'gamma must be >= 0, got -1.0'),
    (dict(alpha=float('nan')), 'alpha must be >= 0, got nan'),
    (dict(momentum=1.5), 'momentum must be in [0, 1], got 1.5'),
    (dict(lr_scale=-1), 'lr_scale must be >= 0, got -1'),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError) as e:
        CausalNormClassifier(8, 3, **kwargs)
    assert message in str(e.value)


# --- the causal_norm model argument ------------------------------------------------------------------------------

def test_cifar_resnet_with_causal_norm():
    model = timm.create_model('resnet32_cifar', num_classes=100, causal_norm=True, causal_alpha=1.5, causal_heads=4)
    assert is_causal_norm(model) and model.fc.weight.shape == (100, 64)
    assert (model.fc.heads, model.fc.alpha, model.fc.tau) == (4, 1.5, 16.0)
    assert model._model_args['causal_norm'] is True and model._model_args['causal_alpha'] == 1.5
    x = torch.randn(3, 3, 32, 32)
    model.train()
    out = model(x)
    assert out.shape == (3, 100) and model.fc.embed_mean.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        assert pre.shape == (3, 64)
        torch.testing.assert_close(model(x), model.fc(pre))
    assert not is_causal_norm(timm.create_model('resnet20_cifar'))


def test_timm_resnets_take_causal_norm():
    model = timm.create_model('resnet50', num_classes=7, causal_norm=True)
    assert isinstance(model.fc, CausalNormClassifier) and model.fc.weight.shape == (7, 2048)
    model.reset_classifier(4)
    assert isinstance(model.fc, CausalNormClassifier) and model.fc.weight.shape == (4, 2048)
    model.reset_classifier(0)
    assert isinstance(model.fc, nn.Identity)
    model.reset_classifier(3, global_pool='catavgmax')
    assert model.fc.weight.shape == (3, 4096)
    rx = timm.create_model('resnext50_32x4d', num_classes=5, causal_norm=True, causal_lr_scale=50.0)
    assert rx.fc.lr_scale == 50.0 and rx.fc.in_features == 2048
    plain = timm.create_model('resnet18', num_classes=3)
    assert isinstance(plain.fc, nn.Linear) and plain.causal_norm is False
    feats = timm.create_model('resnet18', causal_norm=True, features_only=True, out_indices=(4,))
    assert [tuple(o.shape) for o in feats(torch.randn(1, 3, 64, 64))] == [(1, 512, 2, 2)]


def test_patch_is_idempotent_advertised_and_checks_the_feature_split():
    init = ResNet.__init__
    timm_cmo.models.patch_causal_norm()
    add_causal_norm_arg(ResNet)
    assert ResNet.__init__ is init
    params = inspect.signature(ResNet.__init__).parameters
    assert {'causal_norm', 'causal_heads', 'causal_tau', 'causal_gamma', 'causal_alpha', 'causal_momentum',
            'causal_lr_scale', 'head_norm'} <= set(params)

    class NoSplit(nn.Module):
        def __init__(self, num_classes=3):
            super().__init__()
            self.fc = nn.Linear(4, num_classes)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(TypeError, match='does not split forward_features / forward_head'):
        add_causal_norm_arg(NoSplit)
    with pytest.raises(ValueError, match='head_norm and causal_norm are two classifier heads'):
        timm.create_model('resnet20_cifar', head_norm=True, causal_norm=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'causal_norm'"):
        timm.create_model('ride_resnet20_cifar', causal_norm=True)


def _trained_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model('resnet20_cifar', num_classes=10, causal_norm=True, causal_alpha=1.5, **kwargs)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 32, 32))
    return model.eval()


def test_buffer_through_checkpoint_and_hub_export_bit_for_bit(tmp_path):
    model = _trained_model(causal_heads=4, causal_momentum=0.8)
    mean = model.fc.embed_mean.clone()
    assert mean.abs().sum() > 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    # a checkpoint (weights only)
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'ckpt.pth')
    sd = torch.load(tmp_path / 'ckpt.pth', map_location='cpu', weights_only=True)['state_dict']
    assert torch.equal(sd['fc.embed_mean'], mean)
    fresh = timm.create_model('resnet20_cifar', num_classes=10, causal_norm=True, causal_alpha=1.5, causal_heads=4,
                              causal_momentum=0.8)
    fresh.load_state_dict(sd, strict=True)
    assert torch.equal(fresh.fc.embed_mean, mean)
    # a Hub folder: config.json carries the head's arguments, model.safetensors the buffer
    save_for_hf(model, tmp_path / 'hub', safe_serialization=True)
    cfg = json.loads((tmp_path / 'hub' / 'config.json').read_text())
    assert cfg['model_args']['causal_norm'] is True and cfg['model_args']['causal_heads'] == 4
    assert cfg['model_args']['causal_alpha'] == 1.5 and cfg['model_args']['causal_momentum'] == 0.8
    reloaded = timm.create_model(f'local-dir:{tmp_path / "hub"}', pretrained=True).eval()
    assert is_causal_norm(reloaded) and reloaded.fc.heads == 4 and reloaded.fc.alpha == 1.5
    assert torch.equal(reloaded.fc.embed_mean, mean)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=0)
    # alpha is a test-time choice: an argument at load time
    other = timm.create_model(f'local-dir:{tmp_path / "hub"}', pretrained=True, causal_alpha=0.0).eval()
    with torch.no_grad():
        assert not torch.allclose(other(x), expected)


def test_torch_compile_updates_the_buffer_like_eager():
    """Training steps of a compiled model (aot_eager: no C compiler needed) mutate the buffer as eager ones do."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), CausalNormClassifier(8, 3, alpha=1.0))

    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(3)]
    states, evals = [], []
    for compiled in (False, True):
        model = build()
        run = torch.compile(model, backend='aot_eager') if compiled else model
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model.train()
        for x, y in batches:
            loss = F.cross_entropy(run(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            evals.append(run(batches[0][0]))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert states[1]['2.embed_mean'].abs().sum() > 0
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=1e-6, atol=1e-6, msg=k)
    torch.testing.assert_close(evals[1], evals[0], rtol=1e-6, atol=1e-6)


_DDP_SCRIPT = '''
import sys
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm_cmo.models import CausalNormClassifier

dist.init_process_group('gloo')
rank = dist.get_rank()
data = torch.load(sys.argv[1], weights_only=True)
torch.manual_seed(0)
head = CausalNormClassifier(6, 4, momentum=0.9)
model = torch.nn.parallel.DistributedDataParallel(head)
model.train()
for step in range(2):
    x, y = data['x'][step][rank], data['y'][step][rank]
    F.cross_entropy(model(x), y).backward()
torch.save(head.embed_mean, sys.argv[2] + f'.{rank}')
dist.destroy_process_group()
'''


def test_ddp_two_processes_average_over_every_rank(tmp_path):
    """Under DDP the average takes every process's samples (unequal shares: 5 and 3), the same on both ranks."""
    g = torch.Generator().manual_seed(5)
    xs = [[torch.randn(5, 6, generator=g), torch.randn(3, 6, generator=g)] for _ in range(2)]
    ys = [[torch.randint(0, 4, (5,), generator=g), torch.randint(0, 4, (3,), generator=g)] for _ in range(2)]
    torch.save(dict(x=xs, y=ys), tmp_path / 'data.pt')
    (tmp_path / 'script.py').write_text(textwrap.dedent(_DDP_SCRIPT))
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])))
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         str(tmp_path / 'script.py'), str(tmp_path / 'data.pt'), str(tmp_path / 'mean')],
        capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = torch.zeros(6, dtype=D64)
    for step in range(2):
        expected = 0.9 * expected + torch.cat(xs[step]).double().mean(0)  # the global batch of 8
    for rank in (0, 1):
        got = torch.load(tmp_path / f'mean.{rank}', weights_only=True)
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
