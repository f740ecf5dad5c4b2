"""Post-hoc adjustments against float64 computations written from the papers' equations, tau chosen on validation
data only, and the adjusted model exported as a plain timm model."""
import json

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from timm.models import save_for_hf

import timm_cmo  # noqa: F401  (registers resnet*_cifar, head_norm)
from timm_cmo.models import NormedLinear
from timm_cmo.models.stage2 import add_weight_scaling
from timm_cmo.posthoc import (
    DEFAULT_TAU_GRID, LogitOffset, adjusted_classifier, apply_logit_offset, apply_post_hoc, collect_features,
    logit_adjust, prior_offset, select_tau, tau_normalize)

COUNTS = [500, 120, 40, 9, 3]
C, D = len(COUNTS), 6


def _linear(seed=0):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(D, C)
    with torch.no_grad():
        head.weight.copy_(torch.randn(C, D, generator=g) * torch.tensor([3., 2., 1., .5, .25])[:, None])
        head.bias.copy_(torch.randn(C, generator=g))
    return head


def _features(n=40, seed=1):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


# --- each adjustment against its equation, in float64 ---------------------------------------------------------------

@pytest.mark.parametrize('tau', [0., 0.5, 1., 1.7, 2.])
def test_tau_norm_is_kangs_equation(tau):
    """Kang et al.: w~_k = w_k / ||w_k||^tau, logits f . w~_k, no bias (the authors' tau_norm.py)."""
    head = _linear()
    x = _features()
    W = head.weight.detach().double().numpy()
    expected = x.double().numpy() @ (W / np.linalg.norm(W, axis=1, keepdims=True) ** tau).T
    got = tau_normalize(head, tau)(x)
    np.testing.assert_allclose(got.double().detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    # tau = 1: unit-norm class vectors; the input head is unchanged
    if tau == 1.:
        np.testing.assert_allclose(tau_normalize(head, 1.).weight.norm(dim=1).detach().numpy(), np.ones(C), rtol=1e-6)
    np.testing.assert_array_equal(head.weight.detach().double().numpy(), W)


@pytest.mark.parametrize('tau', [0., 1., 1.5])
def test_logit_adjustment_is_menons_equation(tau):
    """Menon et al. (post-hoc): logits - tau log pi, pi_k = n_k / N."""
    head = _linear()
    x = _features()
    logits = x.double().numpy() @ head.weight.detach().double().numpy().T + head.bias.detach().double().numpy()
    pi = np.asarray(COUNTS, dtype=np.float64) / sum(COUNTS)
    expected = logits - tau * np.log(pi)
    got = logit_adjust(head, tau, COUNTS)(x)
    np.testing.assert_allclose(got.double().detach().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_logit_adjustment_of_a_cosine_head_is_in_trained_units():
    """A cosine head's logits are trained as s * cos: s * adjusted = s * cos - tau log pi."""
    torch.manual_seed(0)
    head = NormedLinear(D, C)
    x = _features()
    s, tau = 30., 1.
    adjusted = logit_adjust(head, tau, COUNTS, logit_scale=s)
    assert isinstance(adjusted, LogitOffset)
    cos = (x.double() / x.double().norm(dim=1, keepdim=True)) @ (
        head.weight.detach().double() / head.weight.detach().double().norm(dim=0, keepdim=True))
    expected = s * cos.numpy() - tau * np.log(np.asarray(COUNTS, dtype=np.float64) / sum(COUNTS))
    np.testing.assert_allclose(s * adjusted(x).double().detach().numpy(), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match='identity'):
        tau_normalize(head, 1.)


def test_prior_correction_is_bayes_rule():
    """logits + log p_test - log p_train (train), + log p_test (balanced); p_test normalised first."""
    p_test = np.array([1., 2., 4., 8., 16.])
    offset = prior_offset(p_test, COUNTS).numpy()
    expected = np.log(p_test / p_test.sum()) - np.log(np.asarray(COUNTS, dtype=np.float64) / sum(COUNTS))
    np.testing.assert_allclose(offset, expected, rtol=1e-12)
    np.testing.assert_allclose(prior_offset(p_test).numpy(), np.log(p_test / p_test.sum()), rtol=1e-12)
    with pytest.raises(ValueError, match='classes \\[1\\] have test prior 0'):
        prior_offset([1., 0., 1., 1., 1.])
    with pytest.raises(ValueError, match='classes \\[2\\] have no training images'):
        prior_offset(p_test, [5, 4, 0, 2, 1])


def test_adjustments_bad_input():
    head = _linear()
    with pytest.raises(ValueError, match='tau must be a finite number >= 0'):
        tau_normalize(head, -1.)
    with pytest.raises(ValueError, match='tau must be a finite number >= 0'):
        logit_adjust(head, float('nan'), COUNTS)
    with pytest.raises(ValueError, match='unknown post-hoc adjustment'):
        adjusted_classifier('median', head, 1., COUNTS)
    model = timm.create_model('ride_resnet20_cifar', num_classes=C)
    with pytest.raises(ValueError, match='single nn.Linear or NormedLinear classifier'):
        apply_post_hoc(model, 'tau_norm', 1., COUNTS)


# --- tau from validation data --------------------------------------------------------------------------------------

def _reference_choice(kind, head, x, y, grid):
    """The grid search written out in float64 numpy: mean per-class top-1 of each tau, first maximum."""
    W = head.weight.detach().double().numpy()
    b = head.bias.detach().double().numpy()
    f = x.double().numpy()
    pi = np.asarray(COUNTS, dtype=np.float64) / sum(COUNTS)
    y = y.numpy()
    scores = []
    for tau in grid:
        if kind == 'tau_norm':
            logits = f @ (W / np.linalg.norm(W, axis=1, keepdims=True) ** tau).T
        else:
            logits = f @ W.T + b - tau * np.log(pi)
        pred = logits.argmax(1)
        scores.append(100. * np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))
    return grid[int(np.argmax(np.round(scores, 9)))], scores


@pytest.mark.parametrize('kind', ['tau_norm', 'logit_adjust'])
def test_select_tau_is_the_grid_search_on_validation_data(kind):
    head = _linear()
    g = torch.Generator().manual_seed(5)
    y = torch.arange(C).repeat(30)
    x = head.weight.detach()[y] * 0.3 + torch.randn(len(y), D, generator=g)  # a balanced validation set
    chosen = select_tau(kind, head, x, y, COUNTS)
    tau, scores = _reference_choice(kind, head, x, y, list(DEFAULT_TAU_GRID))
    assert chosen['grid'] == list(DEFAULT_TAU_GRID) and len(chosen['scores']) == 21
    np.testing.assert_allclose(chosen['scores'], scores, atol=1e-9)
    assert chosen['tau'] == tau and chosen['score'] == pytest.approx(max(scores))
    assert chosen['criterion'] == 'mean per-class top-1 (%)'


def test_select_tau_ties_go_to_the_first_value():
    head = _linear()
    x, y = _features(), torch.zeros(40, dtype=torch.long)
    chosen = select_tau('logit_adjust', head, x, y, COUNTS, grid=[0.0, 0.0, 0.0])
    assert chosen['scores'][0] == chosen['scores'][1] and chosen['tau'] == 0.0


# --- the adjusted model ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kind,tau', [('tau_norm', 1.2), ('logit_adjust', 0.8)])
def test_adjusted_model_exports_as_a_plain_timm_model(tmp_path, kind, tau):
    """apply_post_hoc changes the classifier in place; save_for_hf + create_model('local-dir:') give its logits."""
    torch.manual_seed(0)
    model = timm.create_model('resnet20_cifar', num_classes=C).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        expected = adjusted_classifier(kind, model.fc, tau, COUNTS)(feats)
        apply_post_hoc(model, kind, tau, COUNTS)
        torch.testing.assert_close(model(x), expected)
    assert isinstance(model.fc, nn.Linear)
    save_for_hf(model, tmp_path, safe_serialization=True)
    reloaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)


def test_weight_scaling_is_folded_before_adjusting():
    """A linear head with an LWS hook: the adjustment acts on the scaled logits, (W f + b) * s."""
    torch.manual_seed(0)
    model = timm.create_model('resnet20_cifar', num_classes=C).eval()
    scale = add_weight_scaling(model)
    with torch.no_grad():
        scale.copy_(torch.tensor([0.5, 1., 2., 3., 4.]))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        scaled = model(x)
        apply_post_hoc(model, 'logit_adjust', 1., COUNTS)
        pi = torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)
        torch.testing.assert_close(model(x).double(), scaled.double() - torch.log(pi), rtol=1e-4, atol=1e-4)
    assert not hasattr(model.fc, 'lws_scale')


def test_collect_features_are_the_classifier_inputs():
    torch.manual_seed(0)
    model = timm.create_model('resnet20_cifar', num_classes=C)
    x = torch.randn(10, 3, 32, 32)
    y = torch.arange(10) % C
    loader = [(x[:6], y[:6]), (x[6:], y[6:])]
    feats, targets = collect_features(model, loader)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(feats, model.forward_head(model.forward_features(x), pre_logits=True))
        torch.testing.assert_close(model.fc(feats), model(x))
    assert torch.equal(targets, y) and not model.training


def test_logit_offset_on_a_model():
    torch.manual_seed(0)
    model = timm.create_model('resnet20_cifar', num_classes=C, head_norm=True).eval()
    x = torch.randn(2, 3, 32, 32)
    offset = torch.arange(C, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        apply_logit_offset(model, offset, logit_scale=30.)
        torch.testing.assert_close(model(x), before + offset.float() / 30.)
    assert isinstance(model.fc, LogitOffset)
    json.dumps(prior_offset([1.] * C).tolist())  # the record is JSON
