"""Logits with the penultimate features through timm's forward_features / forward_head(pre_logits) / get_classifier."""
import pytest
import timm
import torch
import torch.nn as nn

import timm_cmo  # noqa: F401  (registers the models)
from timm_cmo.models import LogitsAndFeatures, WithFeatures, check_feature_split, logits_and_features


@pytest.mark.parametrize('name,kwargs,size', [
    ('resnet32_cifar', {}, 32),
    ('resnet20_cifar', {'head_norm': True}, 32),
    ('resnet18', {}, 64),
    ('resnet18', {'head_norm': True}, 64),
])
@pytest.mark.parametrize('train', [False, True])
def test_split_gives_the_models_logits_and_its_pooled_features(name, kwargs, size, train):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, **kwargs).train(train)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        state = {k: v.clone() for k, v in model.state_dict().items()}
        expected = model(x)
        model.load_state_dict(state)  # the same BatchNorm statistics for the second pass
        out = logits_and_features(model, x)
    assert isinstance(out, LogitsAndFeatures)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)
    assert out.features.shape == (3, model.num_features)
    model.load_state_dict(state)
    with torch.no_grad():
        pooled = model.forward_features(x).mean(dim=(2, 3))  # the average-pooled feature map
    torch.testing.assert_close(out.features, pooled, rtol=1e-6, atol=1e-6)


def test_wrapper_returns_the_pair_and_keeps_the_model_state():
    model = timm.create_model('resnet20_cifar', num_classes=4)
    wrapped = WithFeatures(model).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, features = wrapped(x)
        torch.testing.assert_close(logits, model.eval()(x), rtol=0, atol=0)
    assert features.shape == (2, 64)
    assert list(wrapped.state_dict()) == [f'model.{k}' for k in model.state_dict()]
    assert [p is q for p, q in zip(wrapped.parameters(), model.parameters())] == [True] * len(list(model.parameters()))


class NoPreLogits(nn.Module):
    num_classes = 3

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward_features(self, x):
        return x

    def forward_head(self, x):
        return self.fc(x)

    def get_classifier(self):
        return self.fc


def test_models_without_the_split_are_refused():
    with pytest.raises(ValueError, match='ride_resnet20_cifar|RIDEResNetCifar is a multi-expert model'):
        check_feature_split(timm.create_model('ride_resnet20_cifar', num_classes=10))
    with pytest.raises(ValueError, match='NoPreLogits.forward_head has no pre_logits argument'):
        WithFeatures(NoPreLogits())
    with pytest.raises(ValueError, match=r'Linear has no forward_features\(\)'):
        check_feature_split(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r'get_classifier\(\) is Identity'):
        check_feature_split(timm.create_model('resnet20_cifar', num_classes=0))
    check_feature_split(timm.create_model('resnet18', num_classes=3))  # timm's ResNet: fine
