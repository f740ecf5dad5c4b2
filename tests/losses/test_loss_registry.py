"""The loss registry and factory."""
import pytest
import torch

import timm_cmo
from timm_cmo.losses import registry

COUNTS = [100, 30, 10, 3]
FIVE = ['bs', 'ce', 'focal', 'la', 'ldam']


def test_import_registers_losses():
    names = timm_cmo.list_losses()
    assert names == sorted(names)
    assert set(FIVE) <= set(names)
    assert all(timm_cmo.losses.is_loss(n) for n in FIVE)
    assert not timm_cmo.losses.is_loss('nope')


def test_unknown_name_lists_known():
    with pytest.raises(ValueError) as e:
        timm_cmo.create_loss('ldma', COUNTS)
    msg = str(e.value)
    assert "'ldma'" in msg and all(f"'{n}'" in msg for n in FIVE)


def test_create_loss_passes_kwargs():
    ldam = timm_cmo.create_loss('ldam', COUNTS, s=16.0, max_m=0.3)
    assert ldam.s == 16.0 and ldam.max_m == 0.3
    assert float(ldam.margins.max()) == pytest.approx(0.3)
    assert timm_cmo.create_loss('focal', COUNTS, gamma=2.5).gamma == 2.5
    assert timm_cmo.create_loss('la', COUNTS, tau=0.5).tau == 0.5
    bs = timm_cmo.create_loss('bs', COUNTS, reweight='drw', drw_epoch=4, cb_beta=0.99, reduction='sum')
    assert (bs.reweight, bs.drw_epoch, bs.cb_beta, bs.reduction) == ('drw', 4, 0.99, 'sum')
    assert bs.validate and not timm_cmo.create_loss('ce', COUNTS, validate=False).validate
    assert isinstance(timm_cmo.create_loss('ce', torch.tensor(COUNTS)), torch.nn.Module)


def test_unknown_kwarg_named():
    with pytest.raises(TypeError, match=r"\['gama'\]"):
        timm_cmo.create_loss('focal', COUNTS, gama=2.0)
    with pytest.raises(TypeError, match=r"\['tau'\]"):
        timm_cmo.create_loss('ldam', COUNTS, tau=1.0)


def test_register_custom_loss():
    @timm_cmo.register_loss('_test_mse')
    class MSE(torch.nn.Module):
        def __init__(self, class_counts, reweight='none', drw_epoch=None, epochs=None,
                     cb_beta=0.9999, scale=1.0):
            super().__init__()
            self.scale = scale

        def forward(self, logits, target):
            return self.scale * ((logits - target) ** 2).mean()

    try:
        assert '_test_mse' in timm_cmo.list_losses()
        loss = timm_cmo.create_loss('_test_mse', COUNTS, scale=2.0)
        assert isinstance(loss, MSE) and loss.scale == 2.0
        with pytest.raises(TypeError, match='bad'):
            timm_cmo.create_loss('_test_mse', COUNTS, bad=1)
    finally:
        registry._loss_entrypoints.pop('_test_mse', None)
    assert '_test_mse' not in timm_cmo.list_losses()


def test_register_loss_needs_name():
    with pytest.raises(TypeError, match='name'):
        timm_cmo.register_loss(lambda *a, **k: None)
