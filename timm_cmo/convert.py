"""Convert a checkpoint released with the CMO / LDAM-DRW code into a timm model folder.

Usage::

    python -m timm_cmo.convert ckpt.pth.tar out_dir --model resnet32_cifar [--num-classes 100]

The checkpoint is a dict ``{'state_dict': ..., 'epoch': ..., 'best_acc1': ...}`` (or ``'model'`` /
``'state_dict_ema'``, or a bare state dict). Keys may carry a ``module.`` prefix (DataParallel/DDP);
CIFAR models call their classifier ``linear`` (renamed to the timm model's classifier, ``fc``).
A classifier with a weight but no bias is LDAM's ``NormedLinear`` (weight ``(in, out)``): the model is
then built with ``head_norm=True``. The output folder (``config.json`` + ``model.safetensors``) loads with
``timm.create_model('local-dir:<out_dir>', pretrained=True)`` after ``import timm_cmo``.
The checkpoint is read with ``torch.load(weights_only=True)``: no pickled code is ever executed.
"""
import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_pretrained_cfg_value, is_model, model_entrypoint, save_for_hf

from .checkpoint import load_checkpoint_file, state_dict_from_checkpoint
from .models import is_head_norm

__all__ = ['convert_checkpoint', 'load_checkpoint_state_dict', 'main']

_PAPER_CLASSIFIER = 'linear'
PAPER_IMAGENET_EVAL = dict(
    input_size=(3, 224, 224), crop_pct=0.875, interpolation='bilinear', mean=IMAGENET_DEFAULT_MEAN,
    std=IMAGENET_DEFAULT_STD)
"""The evaluation preprocessing of the paper's ImageNet-LT / iNaturalist models (resize 256, centre crop 224)."""


def load_checkpoint_state_dict(checkpoint_path: Union[str, Path]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a checkpoint safely and return ``(state_dict with prefixes stripped, metadata)``.

    Metadata holds ``epoch`` / ``best_acc1`` when present. Raises ``ValueError`` (a
    :class:`~timm_cmo.checkpoint.CheckpointError`) naming the file when it is not a checkpoint, is
    truncated, holds pickled Python objects or has no recognisable state dict.
    """
    return state_dict_from_checkpoint(load_checkpoint_file(checkpoint_path), checkpoint_path)


def _check_model_name(model_name: str) -> None:
    if not is_model(model_name.split('.')[0]):
        raise ValueError(f'Unknown timm model {model_name!r} (did you import timm_cmo?).')


def _is_ride(model_name: str) -> bool:
    """Whether ``model_name`` is one of the RIDE architectures (:mod:`timm_cmo.models.ride`)."""
    from .models import ride
    _check_model_name(model_name)
    return model_entrypoint(model_name.split('.')[0]).__module__ == ride.__name__


def _classifier_name(model_name: str) -> str:
    _check_model_name(model_name)
    classifier = get_pretrained_cfg_value(model_name, 'classifier') or 'fc'
    if not isinstance(classifier, str):
        raise ValueError(f'Model {model_name!r} has several classifiers {classifier}; not supported.')
    return classifier


def _key_errors(
        checkpoint: Dict[str, torch.Tensor],
        model_sd: Dict[str, torch.Tensor],
) -> Tuple[List[str], List[str], List[Tuple[str, tuple, tuple]]]:
    missing = [k for k in model_sd if k not in checkpoint]
    unexpected = [k for k in checkpoint if k not in model_sd]
    mismatched = [(k, tuple(v.shape), tuple(model_sd[k].shape))
                  for k, v in checkpoint.items() if k in model_sd and v.shape != model_sd[k].shape]
    return missing, unexpected, mismatched


def _paper_model(state_dict: Dict[str, torch.Tensor], model_name: str, num_classes: Optional[int]):
    """The timm model for a CMO / LDAM-DRW checkpoint and its state dict with the classifier renamed."""
    classifier = _classifier_name(model_name)
    w_key, b_key = f'{classifier}.weight', f'{classifier}.bias'
    if w_key not in state_dict and f'{_PAPER_CLASSIFIER}.weight' in state_dict:
        state_dict = {(classifier + k[len(_PAPER_CLASSIFIER):] if k.split('.')[0] == _PAPER_CLASSIFIER else k): v
                      for k, v in state_dict.items()}

    weight = state_dict.get(w_key)
    head_norm = weight is not None and b_key not in state_dict
    if weight is None:
        # backbone only: a model without classifier, or with --num-classes one whose keys are then missing
        ckpt_classes = num_classes or 0
    elif weight.ndim != 2:
        raise ValueError(f'Classifier weight {w_key!r} has shape {tuple(weight.shape)}, expected 2 dims.')
    else:
        # NormedLinear stores (in_features, out_features), nn.Linear (out_features, in_features)
        ckpt_classes = weight.shape[1] if head_norm else weight.shape[0]
    if weight is not None and num_classes is not None and num_classes != ckpt_classes:
        raise ValueError(
            f'num_classes={num_classes} disagrees with the checkpoint classifier {w_key!r} '
            f'(shape {tuple(weight.shape) if weight is not None else None}): {ckpt_classes} classes.')

    kwargs = dict(num_classes=ckpt_classes)
    if head_norm:
        kwargs['head_norm'] = True
    try:
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    except TypeError as e:
        if head_norm and 'head_norm' in str(e):
            raise ValueError(
                f'The checkpoint has a normalised classifier ({w_key!r} without bias) but model '
                f'{model_name!r} does not accept head_norm=True.') from e
        raise
    if head_norm:
        in_features = getattr(model, 'head_hidden_size', None) or model.num_features
        if weight.shape[0] != in_features:
            raise ValueError(
                f'Normalised classifier {w_key!r} (no bias) has shape {tuple(weight.shape)} = (in_features, '
                f'num_classes), but {model_name} has {in_features} features.')

    return model, state_dict, head_norm, w_key, weight


def _ride_model(state_dict: Dict[str, torch.Tensor], model_name: str, num_classes: Optional[int]):
    """The RIDE model a RIDE checkpoint (its model-zoo layout or this package's) describes, and its state dict
    mapped to the model's keys: experts from the heads, classes from their shape, a router when there is one."""
    from .models.ride import ride_checkpoint_filter_fn
    heads = sorted({int(k.split('.')[1]) for k in state_dict
                    if k.split('.')[0] in ('linears', 'heads') or k.startswith(('backbone.linears.', 'backbone.heads.'))
                    for k in [k[len('backbone.'):] if k.startswith('backbone.') else k]})
    if not heads:
        raise ValueError(f'No expert classifiers (linears.<i> / heads.<i>) in the checkpoint for {model_name!r}: '
                         f'not a RIDE checkpoint.')
    plain = {(k[len('backbone.'):] if k.startswith('backbone.') else k): v for k, v in state_dict.items()}
    prefix = 'linears' if 'linears.0.weight' in plain else 'heads'
    w_key, weight = f'{prefix}.0.weight', plain.get(f'{prefix}.0.weight')
    head_norm = f'{prefix}.0.bias' not in plain
    ckpt_classes = weight.shape[1] if head_norm else weight.shape[0]
    if num_classes is not None and num_classes != ckpt_classes:
        raise ValueError(f'num_classes={num_classes} disagrees with the checkpoint classifier {w_key!r} '
                         f'(shape {tuple(weight.shape)}): {ckpt_classes} classes.')
    router = any(k.startswith(('expert_help_pred', 'router.')) for k in plain)
    model = timm.create_model(model_name, pretrained=False, num_classes=ckpt_classes, num_experts=len(heads),
                              head_norm=head_norm, router=router)
    return model, ride_checkpoint_filter_fn(plain, model, lenient=False), head_norm, w_key, weight


def convert_checkpoint(
        checkpoint_path: Union[str, Path],
        out_dir: Union[str, Path],
        model_name: str,
        num_classes: Optional[int] = None,
) -> Path:
    """Convert a paper checkpoint to a timm folder and return ``out_dir``.

    Args:
        checkpoint_path: ``.pth.tar`` / ``.pth`` file saved by the paper code (or any plain state dict).
        out_dir: Output folder (created), receives ``config.json`` and ``model.safetensors``.
        model_name: timm model name, e.g. ``resnet32_cifar``, ``resnet50``, ``wide_resnet50_2``.
        num_classes: Expected class count; inferred from the checkpoint's classifier when None.

    Raises:
        ValueError: pickled objects in the file, classes disagreeing, missing/unexpected keys or shape mismatches.
    """
    ride = _is_ride(model_name)
    # RIDE's released files pickle their whole configuration: it is loaded inert (never executed) and ignored
    checkpoint = load_checkpoint_file(checkpoint_path, ignore_objects=ride)
    state_dict, meta = state_dict_from_checkpoint(checkpoint, checkpoint_path)
    if ride:
        model, state_dict, head_norm, w_key, weight = _ride_model(state_dict, model_name, num_classes)
    else:
        model, state_dict, head_norm, w_key, weight = _paper_model(state_dict, model_name, num_classes)

    model_sd = model.state_dict()
    # BN step counters are unused in eval and absent from checkpoints of PyTorch < 0.4.1: keep the model's
    for k in model_sd:
        if k.endswith('.num_batches_tracked') and k not in state_dict:
            state_dict[k] = model_sd[k]
    missing, unexpected, mismatched = _key_errors(state_dict, model_sd)
    if missing or unexpected or mismatched:
        lines = [f'Checkpoint {checkpoint_path} does not match timm model {model_name!r}'
                 f'(num_classes={model.num_classes}{", head_norm=True" if head_norm else ""}):']
        if weight is None and w_key in missing:
            lines.append(f'  it has no classifier ({w_key!r}, or the paper code\'s '
                         f'{_PAPER_CLASSIFIER + ".weight"!r}); convert without --num-classes for the backbone alone')
        if missing:
            lines.append(f'  missing keys ({len(missing)}): {", ".join(missing)}')
        if unexpected:
            lines.append(f'  unexpected keys ({len(unexpected)}): {", ".join(unexpected)}')
        for k, ckpt_shape, model_shape in mismatched:
            lines.append(f'  shape mismatch for {k}: checkpoint {ckpt_shape}, model {model_shape}')
        raise ValueError('\n'.join(lines))
    model.load_state_dict(state_dict, strict=True)
    model.eval()

    out_dir = Path(out_dir)
    # CIFAR models keep their own 32x32 config; the paper's ImageNet-LT / iNaturalist models were
    # evaluated at 224 after a 256 resize, which differs from timm's defaults for these architectures
    small_input = model.pretrained_cfg.get('input_size', (3, 224, 224))[-1] <= 32
    save_for_hf(model, out_dir, safe_serialization=True, data_config=None if small_input else PAPER_IMAGENET_EVAL)

    info = [f'model={model_name}', f'num_classes={model.num_classes}',
            f'head={"NormedLinear" if is_head_norm(model) else type(model.get_classifier()).__name__}']
    if 'epoch' in meta:
        info.append(f'epoch={meta["epoch"]}')
    if 'best_acc1' in meta:
        info.append(f'best_acc1={meta["best_acc1"]:.2f}')
    print(f'Converted {checkpoint_path} -> {out_dir}: {", ".join(info)}')
    return out_dir


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point: ``python -m timm_cmo.convert CHECKPOINT OUT_DIR --model NAME [--num-classes N]``."""
    parser = argparse.ArgumentParser(
        prog='python -m timm_cmo.convert',
        description='Convert a CMO / LDAM-DRW checkpoint into a timm folder (config.json + model.safetensors).')
    parser.add_argument('checkpoint', help='checkpoint saved by the paper code (.pth.tar / .pth)')
    parser.add_argument('out_dir', help='output folder, load with timm.create_model("local-dir:OUT_DIR", pretrained=True)')
    parser.add_argument('--model', required=True, help='timm model name, e.g. resnet32_cifar, resnet50')
    parser.add_argument('--num-classes', type=int, default=None, help='expected classes (default: from checkpoint)')
    args = parser.parse_args(argv)

    try:
        convert_checkpoint(args.checkpoint, args.out_dir, args.model, num_classes=args.num_classes)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f'{parser.prog}: error: {e}\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
