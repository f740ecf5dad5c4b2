"""BBN models: BBN's layouts, the mixed-feature logits against a float64 computation from the paper's equations
(values and gradients), BatchNorm on each batch alone, inference at equal weight, TorchScript / fx, BBN's
checkpoints, features."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import torch.nn as nn

import timm_cmo  # noqa: F401  (registers the models)
from timm_cmo.models import BBNResNet, BBNResNetCifar, bbn_checkpoint_filter_fn
from timm_cmo.models.resnet_cifar import BasicBlockCifar


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_registered_and_bbns_layout():
    """bbn_res32_cifar: CMO's ResNet-32 with the 5th block of stage 3 once per branch (4 shared), 128 features;
    bbn_res50: ResNet-50 with the 3rd block of stage 4 once per branch (2 shared), 4096 features."""
    assert {'bbn_resnet32_cifar', 'bbn_resnet50'} <= set(timm.list_models('bbn_*'))
    model = timm.create_model('bbn_resnet32_cifar', num_classes=100)
    ref = timm.create_model('resnet32_cifar', num_classes=100)
    assert isinstance(model, BBNResNetCifar) and model.pretrained_cfg['classifier'] == 'fc'
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [5, 5, 4]
    for branch in (model.cb_block, model.rb_block):
        assert isinstance(branch, BasicBlockCifar)
        assert {k: v.shape for k, v in branch.state_dict().items()} == \
               {k: v.shape for k, v in ref.layer3[4].state_dict().items()}
    own = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(('cb_block', 'rb_block', 'fc'))}
    assert own == {k: v.shape for k, v in ref.state_dict().items() if not k.startswith(('layer3.4.', 'fc'))}
    assert model.num_features == 128 and model.fc.in_features == 128 and model.fc.bias is not None
    trunk = n_params(ref) - n_params(ref.fc)  # ResNet-32 plus one more 64-channel basic block
    assert n_params(model) - n_params(model.fc) == trunk + n_params(ref.layer3[4]) == 537_488

    big = timm.create_model('bbn_resnet50', num_classes=8142)
    res50 = timm.create_model('resnet50', num_classes=8142)
    assert isinstance(big, BBNResNet) and [len(big.layer1), len(big.layer2), len(big.layer3), len(big.layer4)] == \
           [3, 4, 6, 2]
    for branch in (big.cb_block, big.rb_block):
        assert {k: v.shape for k, v in branch.state_dict().items()} == \
               {k: v.shape for k, v in res50.layer4[2].state_dict().items()}
    assert big.num_features == 4096 and big.fc.weight.shape == (8142, 4096)
    assert n_params(big) - n_params(big.fc) == n_params(res50) - n_params(res50.fc) + n_params(res50.layer4[2])


def reference_logits_and_loss(model, x_c, x_r, alpha, y_c, y_r):
    """The paper's equations in float64, on a float64 copy of the model's trunk and branch blocks:
    f = GAP(block(trunk(x))) per branch, z = W [2 alpha f_c ; 2 (1 - alpha) f_r] + b,
    L = alpha * CE(z, y_c) + (1 - alpha) * CE(z, y_r), CE(z, y) = mean_i (logsumexp_k z_ik - z_iy)."""
    m = copy.deepcopy(model).double()
    f_c = m.cb_block(m.forward_trunk(x_c.double())).mean(dim=(2, 3))
    f_r = m.rb_block(m.forward_trunk(x_r.double())).mean(dim=(2, 3))
    W, b = m.fc.weight, m.fc.bias
    z = torch.cat([2 * alpha * f_c, 2 * (1 - alpha) * f_r], dim=1) @ W.T + b
    lse = torch.logsumexp(z, dim=1)
    ce = lambda y: (lse - z.gather(1, y[:, None]).squeeze(1)).mean()  # noqa: E731
    return m, z, alpha * ce(y_c) + (1 - alpha) * ce(y_r)


@pytest.mark.parametrize('alpha', [1.0, 0.75, 0.0])
def test_forward_bbn_is_the_papers_mixed_logits_values_and_gradients(alpha):
    """forward_bbn and the BBN loss against the float64 equations: logits, loss and the gradient of every
    parameter (the model run in float64 too: float32 round-off through 32 layers would hide a small error); at
    alpha = 1 the re-balancing branch gets no gradient, at alpha = 0 the conventional one none. In float32 the
    logits agree to round-off."""
    from timm_cmo.data import DualBatch
    torch.manual_seed(0)
    model = timm.create_model('bbn_resnet32_cifar', num_classes=7).train()
    g = torch.Generator().manual_seed(1)
    x_c, x_r = torch.randn(6, 3, 32, 32, generator=g), torch.randn(6, 3, 32, 32, generator=g)
    y_c, y_r = torch.randint(0, 7, (6,), generator=g), torch.randint(0, 7, (6,), generator=g)
    ref_model, ref_z, ref_loss = reference_logits_and_loss(model, x_c, x_r, alpha, y_c, y_r)
    ref_loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(copy.deepcopy(model)(x_c, x_r, alpha).double(), ref_z, rtol=1e-4, atol=1e-5)

    model = model.double()
    loss_fn = timm_cmo.create_loss('bbn', [9, 5, 4, 3, 2, 2, 1], epochs=10)
    loss_fn.set_epoch(round(10 * (1 - alpha) ** 0.5))  # alpha = 1 - (t / 10)^2: epochs 0, 5, 10
    assert loss_fn.alpha == alpha
    z = model(x_c.double(), x_r.double(), loss_fn.alpha)  # the training step's call: forward_bbn through __call__
    torch.testing.assert_close(z, ref_z, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(copy.deepcopy(model).forward_bbn(x_c.double(), x_r.double(), loss_fn.alpha), z,
                                   rtol=0, atol=0)
    loss = loss_fn(z, y_c, dual=DualBatch(x_r, y_r))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    loss.backward()
    ref_grads = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        ref = ref_grads[name].grad
        if name.startswith('rb_block') and alpha == 1.0 or name.startswith('cb_block') and alpha == 0.0:
            assert not p.grad.any() and not ref.any(), name  # the branch's features are multiplied by 0
            continue
        assert ref.abs().max() > 0, name
        torch.testing.assert_close(p.grad, ref, rtol=1e-8, atol=1e-12, msg=name)


def test_each_batch_through_batchnorm_alone_conventional_first():
    """BBN calls the model once per batch: every BatchNorm normalises each batch with its own statistics and
    updates its running mean twice per step, first with the conventional batch."""
    torch.manual_seed(0)
    model = timm.create_model('bbn_resnet32_cifar', num_classes=5).train()
    x_c, x_r = torch.randn(8, 3, 32, 32) + 1., torch.randn(8, 3, 32, 32) - 2.
    bn = model.bn1
    m = bn.momentum
    before = bn.running_mean.clone()
    with torch.no_grad():
        stem_c = model.conv1(x_c).mean(dim=(0, 2, 3))
        stem_r = model.conv1(x_r).mean(dim=(0, 2, 3))
        model(x_c, x_r, 0.3)
    expected = (1 - m) * ((1 - m) * before + m * stem_c) + m * stem_r
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 2
    # the conventional branch's output does not depend on the re-balancing batch (no shared batch statistics)
    probe = copy.deepcopy(model)
    with torch.no_grad():
        a = probe.forward_bbn(x_c, x_r, 1.0)
        b = copy.deepcopy(model).forward_bbn(x_c, torch.randn(8, 3, 32, 32), 1.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize('name,size', [('bbn_resnet32_cifar', 32), ('bbn_resnet50', 64)])
def test_inference_is_both_branches_at_equal_weight(name, size):
    """forward(x): fc(cat(f_c, f_r)) on the same input, BBN's inference, equal to forward_bbn(x, x, 0.5) (the factor 2
    cancels) in eval mode; one (B, C) tensor in train mode too; pre-logits and reset_classifier as timm's."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=6).eval()
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        out = model(x)
        t = model.forward_trunk(x)
        f = torch.cat([model.cb_block(t).mean(dim=(2, 3)), model.rb_block(t).mean(dim=(2, 3))], dim=1)
        torch.testing.assert_close(out, model.fc(f), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.forward_bbn(x, x, 0.5), out, rtol=1e-5, atol=1e-5)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (3, model.num_features)
        assert model.train()(x).shape == (3, 6)
    model.reset_classifier(11)
    assert model.fc.weight.shape == (11, model.num_features) and model(x).shape == (3, 11)
    assert model(x, x, 0.2).shape == (3, 11)
    model.reset_classifier(0)
    assert model(x).shape == (3, model.num_features)


def test_torchscript_and_fx():
    """TorchScript scripts both forwards (the dual batch as an Optional argument); a torch.fx trace records the
    one-batch forward, which a traced module then computes."""
    torch.manual_seed(0)
    with timm.set_scriptable(True):
        model = timm.create_model('bbn_resnet32_cifar', num_classes=4).eval()
    x, x_r = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scripted(x, x_r, 0.25), model.forward_bbn(x, x_r, 0.25), rtol=1e-5, atol=1e-5)
        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


def bbn_layout(state_dict):
    """A state dict as BBN's training script saves one: DataParallel's ``module.``, ``backbone.`` on the trunk and
    branches, the classifier named ``classifier``."""
    out = {}
    for k, v in state_dict.items():
        out[('module.classifier.' + k[3:]) if k.startswith('fc.') else 'module.backbone.' + k] = v
    return {'state_dict': out, 'epoch': 200, 'best_result': 0.5}


@pytest.mark.parametrize('name,size', [('bbn_resnet32_cifar', 32), ('bbn_resnet50', 64)])
def test_loads_bbns_checkpoint_layout(name, size, tmp_path):
    torch.manual_seed(0)
    source = timm.create_model(name, num_classes=5).eval()
    mapped = bbn_checkpoint_filter_fn(bbn_layout(source.state_dict()), source)
    assert mapped.keys() == source.state_dict().keys()
    path = tmp_path / 'best_model.pth'
    torch.save(bbn_layout(source.state_dict()), path)
    torch.manual_seed(1)
    model = timm.create_model(name, num_classes=5, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=5)).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_features_and_intermediates():
    """features_only reads forward_intermediates: the stem, the shared stages and the two branches joined; the last
    map is forward_features."""
    torch.manual_seed(0)
    model = timm.create_model('bbn_resnet32_cifar').eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert [m.shape[1:] for m in maps] == [(16, 32, 32), (16, 32, 32), (32, 16, 16), (128, 8, 8)]
        assert torch.equal(final, model.forward_features(x)) and torch.equal(maps[-1], final)
        torch.manual_seed(0)
        features = timm.create_model('bbn_resnet32_cifar', features_only=True, out_indices=(1, 3)).eval()
        features.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith('fc.')},
                                 strict=False)
        got = features(x)
        assert features.feature_info.channels() == [16, 128] and [g.shape[1] for g in got] == [16, 128]
        assert torch.equal(got[1], final)
        pruned = timm.create_model('bbn_resnet50', features_only=True, out_indices=(0, 2)).eval()
        assert pruned.feature_info.channels() == [64, 512]
        assert [m.shape[1:] for m in pruned(torch.randn(1, 3, 64, 64))] == [(64, 32, 32), (512, 8, 8)]


@pytest.mark.parametrize('name,ref,pairs', [
    ('bbn_resnet32_cifar', 'resnet32_cifar', [('conv1.weight', 'conv1.weight'),
                                              ('layer2.4.bn1.bias', 'layer2.4.bn1.bias'),
                                              ('layer3.3.conv2.weight', 'layer3.3.conv2.weight'),
                                              ('cb_block.conv1.weight', 'layer3.4.conv1.weight'),
                                              ('rb_block.bn2.bias', 'layer3.4.bn2.bias'), ('fc.weight', 'fc.weight')]),
    ('bbn_resnet50', 'resnet50', [('layer4.1.conv1.weight', 'layer4.1.conv1.weight'),
                                  ('cb_block.conv3.weight', 'layer4.2.conv3.weight'),
                                  ('rb_block.bn1.weight', 'layer4.2.bn1.weight'), ('fc.weight', 'fc.weight')]),
])
def test_layer_decay_groups_are_the_one_branch_resnets(name, ref, pairs):
    """group_matcher puts both branch blocks where the duplicated block sits in the one-branch ResNet: timm's
    layer-wise lr decay (--layer-decay) gives every parameter the scale of its counterpart there."""
    from timm.optim import create_optimizer_v2
    scales = []
    for n in (name, ref):
        model = timm.create_model(n)
        opt = create_optimizer_v2(model, 'sgd', lr=0.1, layer_decay=0.5)
        by_id = {id(p): g['lr_scale'] for g in opt.param_groups for p in g['params']}
        scales.append({k: by_id[id(p)] for k, p in model.named_parameters()})
    for ours, theirs in pairs:
        assert scales[0][ours] == scales[1][theirs], ours
    assert scales[0]['cb_block.conv1.weight'] == 0.5 and scales[0]['fc.weight'] == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match='layers_per_stage must be >= 2'):
        BBNResNetCifar(layers_per_stage=1)
    with pytest.raises(ValueError, match='the last >= 2'):
        BBNResNet(layers=(3, 4, 6, 1))
    with pytest.raises(TypeError):
        timm.create_model('bbn_resnet32_cifar', head_norm=True)  # no cosine head on BBN's classifier


def test_ddp_two_batch_forward_averages_the_gradients(tmp_path):
    """Under DistributedDataParallel the two-batch forward (``ddp(x_c, x_r, alpha)``, what the training step calls)
    synchronises the gradients: both ranks end with the mean of their local gradients, every parameter's."""
    script = tmp_path / 'worker.py'
    script.write_text(textwrap.dedent(f'''
        import copy, os
        import torch, torch.distributed as dist
        import timm, timm_cmo
        from timm_cmo.data import DualBatch
        dist.init_process_group('gloo')
        rank = dist.get_rank()
        torch.manual_seed(0)
        model = timm.create_model('bbn_resnet32_cifar', num_classes=5)
        local = copy.deepcopy(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        loss_fn = timm_cmo.create_loss('bbn', [50, 20, 9, 4, 2], epochs=4)
        loss_fn.set_epoch(2)
        g = torch.Generator().manual_seed(rank)
        x_c, x_r = torch.randn(6, 3, 32, 32, generator=g), torch.randn(6, 3, 32, 32, generator=g)
        y_c, y_r = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)
        loss_fn(ddp(x_c, x_r, loss_fn.alpha), y_c, dual=DualBatch(x_r, y_r)).backward()
        loss_fn(local(x_c, x_r, loss_fn.alpha), y_c, dual=DualBatch(x_r, y_r)).backward()
        torch.save(dict(ddp={{n: p.grad for n, p in model.named_parameters()}},
                        local={{n: p.grad for n, p in local.named_parameters()}}),
                   os.path.join(r"{tmp_path}", f"rank{{rank}}.pt"))
        dist.destroy_process_group()
    '''))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2))
    for name, grad in r0['ddp'].items():
        mean = (r0['local'][name] + r1['local'][name]) / 2
        assert not torch.equal(r0['local'][name], r1['local'][name]), name  # the ranks' batches differ
        torch.testing.assert_close(grad, mean, rtol=1e-5, atol=1e-7, msg=name)
        assert torch.equal(grad, r1['ddp'][name]), name
