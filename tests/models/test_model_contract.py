"""timm's model contract for every model the plugin registers: the checks of timm's own tests/test_models.py, written
here (forward and backward in train and eval mode, default-cfg keys and heads, reset_classifier, loading with another
class count or input channels, features_only / forward_intermediates, torch.fx, TorchScript).

The models are found in timm's registry: every entrypoint defined in a module of this package, so a model registered
later is checked without being listed here. Options that change a model's head or routing (``head_norm`` on the CIFAR
ResNets and on timm's ResNets, RIDE's router, expert counts, linear RIDE heads) are checked as well.
Inputs are small: a model's own input size up to 64 x 64 (the ImageNet models' 224 is cut to 64), batch 2.
"""
import copy
import functools
import math
from typing import Any, Dict, Tuple

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import get_notrace_functions, get_notrace_modules, model_entrypoint, save_for_hf
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

import timm_cmo  # noqa: F401  (registers the models)

MAX_SIZE = 64
BATCH = 2


def plugin_models():
    """Every model in timm's registry whose entrypoint is defined in this package."""
    return sorted(n for n in timm.list_models() if model_entrypoint(n).__module__.startswith(timm_cmo.__name__ + '.'))


PLUGIN_MODELS = plugin_models()
# factory options of the plugin: the cosine head on its CIFAR ResNets and on timm's ResNet class (patched in; resnet18
# stands for the class); RIDE's router (eval routes per sample, CIFAR and ImageNet layouts), expert counts other than
# the registered cfg's 3, linear heads
OPTIONS = [
    ('resnet20_cifar', dict(head_norm=True)),
    ('resnet18', dict(head_norm=True)),
    ('ride_resnet20_cifar', dict(router=True)),
    ('ride_resnet20_cifar', dict(num_experts=4)),
    ('ride_resnet20_cifar', dict(num_experts=2, head_norm=False)),
    ('ride_resnet10', dict(router=True)),
]
CASES = [(name, {}) for name in PLUGIN_MODELS] + OPTIONS
IDS = [name + ''.join(f'-{k}={v}' for k, v in kwargs.items()) for name, kwargs in CASES]


def _key(kwargs: Dict[str, Any]) -> Tuple:
    return tuple(sorted(kwargs.items()))


@functools.lru_cache(maxsize=None)
def _pristine(name: str, key: Tuple, num_classes: int = -1) -> nn.Module:
    torch.manual_seed(0)
    kwargs = dict(key, **({} if num_classes < 0 else dict(num_classes=num_classes)))
    return timm.create_model(name, pretrained=False, **kwargs)


def build(name: str, kwargs: Dict[str, Any], num_classes: int = -1) -> nn.Module:
    """A fresh copy of the model (created once per test session: the ImageNet RIDE models take seconds)."""
    return copy.deepcopy(_pristine(name, _key(kwargs), num_classes))


def input_size(model: nn.Module) -> Tuple[int, int, int]:
    c, h, w = model.pretrained_cfg['input_size']
    return c, min(h, MAX_SIZE), min(w, MAX_SIZE)


def inputs(model: nn.Module, batch: int = BATCH) -> torch.Tensor:
    return torch.randn((batch, *input_size(model)), generator=torch.Generator().manual_seed(1))


def routed(model: nn.Module) -> bool:
    return getattr(model, 'router', None) is not None


def check_gradients(model: nn.Module, routed_model: bool) -> None:
    """Every parameter has a gradient; a router none (its routing decisions are hard thresholds: the ``ride_ea``
    loss trains it from the multi-expert training output)."""
    for n, p in model.named_parameters():
        if routed_model and n.split('.')[0] == 'router':
            assert p.grad is None, n
        else:
            assert p.grad is not None, f'No gradient for {n}'


def classifier_names(model: nn.Module) -> Tuple[str, ...]:
    names = model.pretrained_cfg['classifier']
    return (names,) if isinstance(names, str) else tuple(names)


def test_every_plugin_model_is_checked():
    """The enumeration finds the plugin's models in timm's registry (and so will find the next one registered)."""
    known = {f'{kind}{d}_cifar' for kind in ('resnet', 'ride_resnet') for d in (20, 32, 44, 56, 110)}
    known |= {'ride_resnet10', 'ride_resnet50', 'ride_resnext50_32x4d'}
    assert known <= set(PLUGIN_MODELS)
    assert {n for n, _ in CASES} >= set(PLUGIN_MODELS)
    assert not any(n.startswith('resnet') and not n.endswith('_cifar') for n in PLUGIN_MODELS)  # timm's own


# --- forward / backward ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name,kwargs', CASES, ids=IDS)
def test_forward(name, kwargs):
    """One logits tensor (B, num_classes) without NaN in eval and train mode; grad checkpointing keeps it."""
    model = build(name, kwargs).eval()
    x = inputs(model)
    with torch.no_grad():
        out = model(x)
        assert isinstance(out, torch.Tensor) and out.shape == (BATCH, model.num_classes)
        assert not torch.isnan(out).any()
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)
        model.set_grad_checkpointing(False)
        model.train()
        out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (BATCH, model.num_classes)


@pytest.mark.parametrize('name,kwargs', CASES, ids=IDS)
def test_backward(name, kwargs):
    """Train mode, 42 classes from the factory: a (B, 42) tensor whose mean back-propagates to every parameter."""
    model = build(name, kwargs, num_classes=42).train()
    out = model(inputs(model))
    assert isinstance(out, torch.Tensor) and out.shape == (BATCH, 42)
    out.mean().backward()
    check_gradients(model, routed(model))
    assert not torch.isnan(out).any()


# --- default cfg, heads --------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name,kwargs', CASES, ids=IDS)
def test_default_cfg(name, kwargs):
    """timm's test_model_default_cfgs: feature and pooled sizes against the cfg and num_features / head_hidden_size,
    the heads removed by reset_classifier(0) and at creation, the cfg's classifier and first conv in the params."""
    model = build(name, kwargs).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    cfg = model.pretrained_cfg
    state_dict = model.state_dict()
    output_fmt = getattr(model, 'output_fmt', 'NCHW')
    spatial, feat_axis = get_spatial_dim(output_fmt), get_channel_dim(output_fmt)
    size = input_size(model)
    # the cfg's pool_size is the feature map at its input_size; at the smaller test input it scales the same way
    reduction = [cfg['input_size'][1 + i] / cfg['pool_size'][i] for i in range(2)]
    expected = tuple(math.ceil(size[1 + i] / reduction[i]) for i in range(2))
    x = inputs(model, 1)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert (feats.shape[spatial[0]], feats.shape[spatial[1]]) == expected
        assert feats.shape[feat_axis] == model.num_features
        assert pre.shape == (1, model.head_hidden_size)

        model.reset_classifier(0)
        assert model.num_classes == 0
        out = model(x)
        assert out.shape == pre.shape
        model.reset_classifier(0, '')
        out = model(x)
        assert out.ndim == 4 and (out.shape[spatial[0]], out.shape[spatial[1]]) == expected

        bare = timm.create_model(name, pretrained=False, num_classes=0, global_pool='', **kwargs).eval()
        out = bare(x)
        assert out.ndim == 4 and (out.shape[spatial[0]], out.shape[spatial[1]]) == expected

    assert cfg['num_classes']
    for c in classifier_names(model):
        assert c + '.weight' in state_dict, f'{c} not in model params'
    first_conv = cfg['first_conv']
    for c in (first_conv,) if isinstance(first_conv, str) else first_conv:
        assert c + '.weight' in state_dict, f'{c} not in model params'


@pytest.mark.parametrize('name,kwargs', CASES, ids=IDS)
def test_reset_classifier(name, kwargs):
    """reset_classifier to another class count gives new heads of that size (the cfg's classifier names them) in
    both modes; to 0, the pooled features."""
    model = build(name, kwargs)
    x = inputs(model)
    model.reset_classifier(7)
    assert model.num_classes == 7
    for c in classifier_names(model):
        assert 7 in model.get_submodule(c).weight.shape, c
    out = model.train()(x)
    assert out.shape == (BATCH, 7)
    out.mean().backward()
    check_gradients(model, routed(model))
    with torch.no_grad():
        assert model.eval()(x).shape == (BATCH, 7)
        model.reset_classifier(0)
        assert model(x).shape == (BATCH, model.head_hidden_size)


@pytest.mark.parametrize('name,kwargs', CASES, ids=IDS)
def test_load_with_other_classes_and_channels(name, kwargs, tmp_path):
    """timm's test_model_load_pretrained / test_model_features_pretrained, from an exported folder (``local-dir:``):
    another class count drops every head named by the cfg and keeps the rest, one input channel adapts the first
    conv, and features_only loads the trunk."""
    source = build(name, kwargs).eval()
    save_for_hf(source, tmp_path, safe_serialization=True)
    own = source.state_dict()
    heads = classifier_names(source)
    for num_classes, in_chans in ((5, 1), (0, 1)):  # timm's pair
        model = timm.create_model(f'local-dir:{tmp_path}', pretrained=True, num_classes=num_classes, in_chans=in_chans)
        assert model.num_classes == num_classes
        loaded = model.state_dict()
        first = source.pretrained_cfg['first_conv'] + '.weight'
        for k, v in own.items():
            if k.rsplit('.', 1)[0] in heads or k.startswith('router.'):  # new heads; a router rebuilt for them
                continue
            if k == first and in_chans == 1:
                assert loaded[k].shape[1] == 1
                torch.testing.assert_close(loaded[k], v.sum(dim=1, keepdim=True))
            else:
                assert torch.equal(loaded[k], v), k
        with torch.no_grad():
            out = model.eval()(torch.randn(1, in_chans, *input_size(source)[1:]))
        assert out.shape[:2] == (1, num_classes or model.head_hidden_size)
    same = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    x = inputs(source)
    features = timm.create_model(f'local-dir:{tmp_path}', pretrained=True, features_only=True).eval()
    with torch.no_grad():
        assert torch.equal(same(x), source(x))
        maps = features(x)
        ref = source.forward_intermediates(x, indices=len(maps), intermediates_only=True)
    assert len(maps) == len(ref)
    for a, b in zip(maps, ref):
        assert torch.equal(a, b)


# --- features ------------------------------------------------------------------------------------------------------

def _check_maps(feature_info, maps, size):
    channels, reductions = feature_info.channels(), feature_info.reduction()
    assert len(channels) >= 3 and len(maps) == len(channels)
    for c, r, o in zip(channels, reductions, maps):
        assert o.shape[0] == BATCH and o.shape[1] == c
        assert o.shape[2] <= math.ceil(size[1] / r) + 1 and o.shape[3] <= math.ceil(size[2] / r) + 1
        assert not torch.isnan(o).any()


@pytest.mark.parametrize('feature_cls', [None, 'getter'])
@pytest.mark.parametrize('name,kwargs', CASES, ids=IDS)
def test_features_only(name, kwargs, feature_cls):
    """timm's test_model_forward_features (the model's default feature class) and
    test_model_forward_intermediates_features (``feature_cls='getter'``): one map per feature_info entry, of its
    channels and reduction."""
    extra = {} if feature_cls is None else dict(feature_cls=feature_cls)
    model = timm.create_model(name, pretrained=False, features_only=True, **kwargs, **extra).eval()
    size = input_size(model)
    with torch.no_grad():
        maps = model(torch.randn(BATCH, *size))
    _check_maps(model.feature_info, maps, size)


@pytest.mark.parametrize('name,kwargs', CASES, ids=IDS)
def test_forward_intermediates(name, kwargs):
    """timm's test_model_forward_intermediates: every feature_info map, the final one equal to forward_features, and
    the same with grad checkpointing."""
    model = build(name, kwargs).eval()
    info = timm.models.FeatureInfo(model.feature_info, list(range(len(model.feature_info))))
    x = inputs(model)
    with torch.no_grad():
        output, intermediates = model.forward_intermediates(x, output_fmt='NCHW')
        _check_maps(info, intermediates, input_size(model))
        assert torch.equal(output, model.forward_features(x))
        last = model.forward_intermediates(x, indices=1, intermediates_only=True)
        assert len(last) == 1 and torch.equal(last[0], intermediates[-1])
        model.set_grad_checkpointing()
        output2, _ = model.forward_intermediates(x, output_fmt='NCHW')
        torch.testing.assert_close(output2, output, rtol=1e-4, atol=1e-5)


# --- torch.fx, TorchScript -------------------------------------------------------------------------------------------

def _create_fx_model(model: nn.Module, train: bool = False) -> nn.Module:
    """timm's tests' ``_create_fx_model``: torchvision's feature extractor on the graph's output node(s)."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    eval_return_nodes, train_return_nodes = [eval_nodes[-1]], [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**tracer_kwargs).trace(model)
        graph_nodes = list(reversed(graph.nodes))
        output_names = [n.name for n in graph_nodes[0]._input_nodes.keys()]
        names = [n.name for n in graph_nodes]
        train_return_nodes = [train_nodes[-names.index(n)] for n in output_names]
    return create_feature_extractor(model, train_return_nodes=train_return_nodes, eval_return_nodes=eval_return_nodes,
                                    tracer_kwargs=tracer_kwargs)


@pytest.fixture
def fast_jit():
    """The profiling executor without its profiling runs, as timm's tests set it (the optimisation passes over a
    large graph would otherwise dominate the test); restored afterwards."""
    executor = torch._C._jit_set_profiling_executor(True)
    mode = torch._C._jit_set_profiling_mode(False)
    yield
    torch._C._jit_set_profiling_mode(mode)
    torch._C._jit_set_profiling_executor(executor)


@pytest.mark.parametrize('name,kwargs', CASES, ids=IDS)
def test_fx_forward_backward_and_torchscript(name, kwargs, fast_jit):
    """timm's test_model_forward_fx, test_model_forward_fx_torchscript and test_model_backward_fx: the traced model
    gives the module's output (a routed RIDE model's graph routes densely: the same logits), scripted too, and
    back-propagates to every parameter in train mode."""
    model = build(name, kwargs).eval()
    x = inputs(model)
    with torch.no_grad():
        out = model(x)
        fx_model = _create_fx_model(model)
        fx_out = torch.cat(tuple(fx_model(x).values()))
        if routed(model):  # dense vs per-sample computation of the experts: equal up to the conv kernels' rounding
            torch.testing.assert_close(fx_out, out, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(fx_out, out)
        scripted = torch.jit.script(fx_model)
        torch.testing.assert_close(torch.cat(tuple(scripted(x).values())), out, rtol=1e-5, atol=1e-5)

    model = build(name, kwargs, num_classes=42).train()
    fx_model = _create_fx_model(model, train=True)
    outputs = torch.cat(tuple(fx_model(x).values()))
    assert outputs.shape == (BATCH, 42)
    outputs.mean().backward()
    check_gradients(fx_model, routed(model))


@pytest.mark.parametrize('name,kwargs', CASES, ids=IDS)
def test_torchscript(name, kwargs, fast_jit):
    """timm's test_model_forward_torchscript: the scripted model (built scriptable) gives the module's output."""
    with timm.set_scriptable(True):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=1e-5, atol=1e-5)
