"""Release a training run on the Hugging Face Hub.

Usage::

    python -m timm_cmo.hub export RUN_DIR OUT_DIR [--checkpoint last|best] [--ema] [--repo-id ORG/NAME]
        [--post-hoc tau_norm|logit_adjust --post-hoc-tau TAU | --post-hoc-from EVAL_DIR]
    python -m timm_cmo.hub push RUN_DIR ORG/NAME [--out-dir DIR] [--private] [--checkpoint last|best] [--ema]

``export`` rebuilds the run's model from ``args.yaml``, loads ``last.pth.tar`` / ``model_best.pth.tar``
(``weights_only``, strict) and writes a timm Hub folder: ``config.json`` (with ``head_norm`` / ``causal_norm`` and
its arguments, label names and the run's preprocessing), ``model.safetensors``, a model card ``README.md`` and
``results.json``.
``push`` exports to a persistent folder (default ``RUN_DIR/hub_export``) and uploads it.
``--post-hoc`` exports the classifier after a post-hoc adjustment (:mod:`timm_cmo.posthoc`: tau-normalised
weights, or the logit adjustment in the bias), so the plain timm model gives the adjusted logits;
``--post-hoc-from`` takes the adjustment and tau an ``--evaluate --post-hoc`` run chose (its folder or
results.json), and that evaluation's results for the model card. The token comes
from the ``token`` argument or huggingface_hub's own login (``HF_TOKEN``, ``hf auth login``); it is never
written anywhere. The result loads with ``timm.create_model('hf-hub:ORG/NAME', pretrained=True)``.
"""
import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import yaml

import timm
from timm.models import model_entrypoint, parse_model_name, save_for_hf

from .checkpoint import CheckpointError, load_checkpoint_file, state_dict_from_checkpoint
from .data.config import input_channels, resolve_run_data_config
from .data.dataset import shot_groups
from .files import write_text_atomic
from .models.stage2 import fold_weight_scaling_state_dict, match_weight_scaling
from .results import RESULTS_JSON, read_results, results_table_markdown

__all__ = ['export', 'push', 'main', 'model_card', 'load_run_args', 'create_run_model', 'run_data_config',
           'post_hoc_from',
           'HubUploadError', 'CHECKPOINT_FILES', 'ARGS_FILE', 'DEFAULT_EXPORT_DIR']

_logger = logging.getLogger(__name__)

ARGS_FILE = 'args.yaml'
CHECKPOINT_FILES = {'last': 'last.pth.tar', 'best': 'model_best.pth.tar'}
DEFAULT_EXPORT_DIR = 'hub_export'
POST_HOC_RESULTS_JSON = 'results_post_hoc.json'  # the evaluation that chose an exported post-hoc adjustment
CONFIG_KEY = 'timm_cmo'  # config.json section with the training class counts and the method (timm ignores it)
_DATA_CONFIG_KEYS = ('input_size', 'img_size', 'mean', 'std', 'crop_pct', 'crop_mode', 'interpolation')
_PLACEHOLDER_REPO = '<org>/<name>'
_PROG = 'python -m timm_cmo.hub'

PathLike = Union[str, os.PathLike]

_LOSSES = {
    'ce': 'cross-entropy',
    'ldam': 'the label-distribution-aware margin loss (LDAM, Cao et al., NeurIPS 2019)',
    'bs': 'Balanced Softmax (Ren et al., NeurIPS 2020)',
    'focal': 'the focal loss (Lin et al., ICCV 2017)',
    'la': 'the logit-adjusted loss (Menon et al., ICLR 2021)',
    'lade': 'LADE (PC softmax with the LADE regulariser, Hong et al., CVPR 2021)',
    'ib': 'the influence-balanced loss (IB, Park et al., ICCV 2021)',
    'ib_focal': 'the influence-balanced focal loss (IB + focal, Park et al., ICCV 2021)',
    'bbn': "BBN's cumulative-learning loss (Zhou et al., CVPR 2020)",
}
_STAGE2_TEXT = {
    'crt': ('A second stage re-trained the classifier from scratch with class-balanced sampling on the frozen '
            'stage-1 backbone (cRT, Kang et al., ICLR 2020).'),
    'lws': ('A second stage learned a per-class scale of the frozen stage-1 logits with class-balanced sampling '
            '(LWS, Kang et al., ICLR 2020).'),
    'las': ("A second stage fine-tuned the classifier with MiSLAS's label-aware smoothing (Zhong et al., CVPR 2021)."),
    'router': "A second stage trained RIDE's expert-assignment router (Wang et al., ICLR 2021).",
}
_POST_HOC_TEXT = {
    'tau_norm': ('The exported classifier is tau-normalised (Kang et al., ICLR 2020): each class vector divided by '
                 'its norm to the power {tau}, the bias dropped.'),
    'logit_adjust': ('The exported classifier is logit-adjusted (Menon et al., ICLR 2021): its bias less {tau} times '
                     'the log of the training class prior.'),
}
_CITATION = """@inproceedings{park2022majority,
  title={The Majority Can Help the Minority: Context-rich Minority Oversampling for Long-tailed Classification},
  author={Park, Seulki and Hong, Youngkyu and Heo, Byeongho and Yun, Sangdoo and Choi, Jin Young},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2022}
}"""


class HubUploadError(RuntimeError):
    """The upload failed; the local export is intact."""


def _run_file(run_dir: Path, name: str, what: str) -> Path:
    path = run_dir / name
    if not path.is_file():
        raise FileNotFoundError(f'{what} {name!r} not found in the run folder {run_dir} (looked for {path})')
    return path


def load_run_args(run_dir: PathLike) -> Dict[str, Any]:
    """Read ``args.yaml`` (the training script's argparse namespace) of a run folder."""
    path = _run_file(Path(run_dir), ARGS_FILE, 'Training arguments')
    with path.open(encoding='utf-8') as f:
        args = yaml.safe_load(f)
    if not isinstance(args, dict) or not args.get('model'):
        raise ValueError(f'{path} does not hold the training arguments (a mapping with a "model" key)')
    return args


def _checkpoint_path(run_dir: Path, checkpoint: str) -> Path:
    name = CHECKPOINT_FILES.get(checkpoint, checkpoint)
    path = Path(name)
    if path.is_absolute():
        if not path.is_file():
            raise FileNotFoundError(f'Checkpoint {str(path)!r} not found')
        return path
    return _run_file(run_dir, name, 'Checkpoint')


def _load_state_dict(path: Path, use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """``(state dict, {'epoch', 'metric'})`` of a run checkpoint (``weights_only``; prefixes stripped)."""
    key = 'state_dict_ema' if use_ema else 'state_dict'
    try:
        return state_dict_from_checkpoint(load_checkpoint_file(path), path, keys=(key,))
    except CheckpointError as e:
        if use_ema and 'holds no state dict' in str(e):
            raise ValueError(f'{path} has no EMA weights ({key!r}): train with --model-ema or export without --ema') from None
        raise


def _source_config(model_name: str) -> Optional[Dict[str, Any]]:
    """config.json of a ``local-dir:`` / ``hf-hub:`` model (the local Hub cache for the latter), or None."""
    source, model_id = parse_model_name(model_name)
    try:
        if source == 'local-dir':
            path = Path(model_id) / 'config.json'
        elif source == 'hf-hub':
            from huggingface_hub import hf_hub_download
            repo, revision = (model_id.split('@', 1) + [None])[:2]
            path = Path(hf_hub_download(repo, 'config.json', revision=revision))
        else:
            return None
        with path.open(encoding='utf-8') as f:
            return json.load(f)
    except Exception as e:  # not there, not cached and offline, not JSON
        _logger.debug(f'No config.json for {model_name}: {e}')
        return None


def exported_class_counts(model_name: str) -> Optional[List[int]]:
    """The training class counts an export of timm-cmo recorded in its config.json (``local-dir:`` / ``hf-hub:``)."""
    config = _source_config(model_name) or {}
    counts = (config.get(CONFIG_KEY) or {}).get('train_class_counts')
    return [int(n) for n in counts] if isinstance(counts, list) else None


def exported_post_hoc(model_name: str) -> Optional[Dict[str, Any]]:
    """The post-hoc adjustment (``{'kind', 'tau'}``) an export's classifier already carries, or None."""
    record = ((_source_config(model_name) or {}).get(CONFIG_KEY) or {}).get('post_hoc')
    return record if isinstance(record, dict) else None


def model_build(model: torch.nn.Module) -> Dict[str, Any]:
    """How to rebuild ``model`` without its source: timm architecture and the factory arguments (JSON types)."""
    args = {k: v for k, v in (getattr(model, '_model_args', None) or {}).items()
            if v is not None and k not in ('pretrained', 'num_classes') and _json_type(v)}
    return dict(architecture=model.pretrained_cfg.get('architecture'), model_args=args)


def _json_type(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def create_run_model(args: Dict[str, Any], num_classes: Optional[int] = None,
                     build: Optional[Dict[str, Any]] = None) -> torch.nn.Module:
    """Build the run's timm model (no weights).

    ``build`` (results.json's ``model_build``: architecture and factory arguments) rebuilds exactly what
    was trained, also for runs started from ``local-dir:`` / ``hf-hub:`` models; without it the model
    comes from ``args`` (``model``, ``model_kwargs``, ``head_norm``, ``head`` and ``causal_*``, ``in_chans`` /
    ``input_size``).
    """
    num_classes = int(num_classes if num_classes is not None else args['num_classes'])
    if build and build.get('architecture'):
        return timm.create_model(build['architecture'], pretrained=False,
                                 **dict(build.get('model_args') or {}, num_classes=num_classes))
    kwargs: Dict[str, Any] = dict(args.get('model_kwargs') or {})
    kwargs['num_classes'] = num_classes
    if args.get('head_norm'):
        kwargs['head_norm'] = True
    if args.get('head') == 'causal':
        from .models import CAUSAL_ARGS
        kwargs['causal_norm'] = True
        kwargs.update({k: args[k] for k in CAUSAL_ARGS if args.get(k) is not None})
    channels = input_channels(args)
    if channels != 3:
        kwargs['in_chans'] = channels
    return timm.create_model(args['model'], pretrained=False, **kwargs)


def run_data_config(args: Dict[str, Any], model: Optional[torch.nn.Module] = None) -> Dict[str, Any]:
    """The preprocessing options set in ``args`` (input_size, mean, std, crop_pct, interpolation, ...).

    With ``model`` and other than 3 input channels, input_size, mean and std are the run's (the model's
    pretrained config holds 3-channel values).
    """
    out = {}
    for key in _DATA_CONFIG_KEYS:
        value = args.get(key)
        if value is None or value == '':
            continue
        out[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    resolved = resolve_run_data_config(args, model) if model is not None else None
    if resolved is not None and resolved['input_size'][0] != 3:
        out.update({key: resolved[key] for key in ('input_size', 'mean', 'std')})
    return out


def _is_plugin_model(model_name: str) -> bool:
    """Whether ``model_name`` (an architecture) is one of timm-cmo's own (e.g. ``resnet32_cifar``)."""
    try:
        return model_entrypoint(model_name).__module__.split('.')[0] == __name__.split('.')[0]
    except (KeyError, RuntimeError):
        return False


def _fmt(value: Any, spec: str = 'g') -> str:
    if value is None or value == '' or (isinstance(value, float) and not math.isfinite(value)):
        return '–'
    if isinstance(value, bool):
        return 'yes' if value else 'no'
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def _used(used: Optional[int], epochs: Optional[int], what: str = 'applied') -> str:
    """``'; applied in 40 of 200 epochs'`` (``'; never applied ...'`` when 0); '' when unknown."""
    if used is None or not epochs:
        return ''
    if used == 0:
        return f'; never {what}: 0 of {epochs} epochs'
    return f'; {what} in {used} of {epochs} epochs'


def _rows(rows: Sequence[Tuple[str, Any]]) -> str:
    return '\n'.join(['| | |', '|---|---|'] + [f'| {k} | {v} |' for k, v in rows])


def model_card(
        args: Dict[str, Any],
        results: Dict[str, Any],
        repo_id: Optional[str] = None,
        checkpoint: str = 'last',
        use_ema: bool = False,
        checkpoint_meta: Optional[Dict[str, Any]] = None,
) -> str:
    """The ``README.md`` model card of an export (front matter, method, data, recipe, results, usage)."""
    repo_id = repo_id or _PLACEHOLDER_REPO
    dataset = results.get('dataset') if isinstance(results.get('dataset'), dict) else {}
    method = results.get('method') if isinstance(results.get('method'), dict) else {}
    opt = {**args, **{k: v for k, v in method.items() if v is not None}}
    model_name = results.get('model') or args['model']
    head_norm = bool(args.get('head_norm'))
    causal = method.get('causal') if isinstance(method.get('causal'), dict) else None
    per_class = results.get('per_class') or {}
    counts = dataset.get('class_counts') or per_class.get('train_images') or []
    data_name = (dataset.get('name') or args.get('dataset')
                 or os.path.basename(str(dataset.get('data_dir') or args.get('data_dir') or '').rstrip('/\\'))
                 or 'image folder')
    imb_ratio = dataset.get('imb_ratio', args.get('imb_ratio'))
    positive = [n for n in counts if n > 0]
    measured = max(positive) / min(positive) if positive else None

    # method
    loss = opt.get('loss') or 'ce'
    loss_text = _LOSSES.get(loss, f'the {loss!r} loss')
    reweight = opt.get('reweight') or 'none'
    if reweight == 'drw':
        reweight_text = (f'deferred re-weighting (DRW, Cao et al., NeurIPS 2019): class-balanced loss weights '
                         f'from epoch {_fmt(opt.get("drw_epoch"))}')
    elif reweight == 'cb':
        reweight_text = 'class-balanced loss weights from the effective number of samples (Cui et al., CVPR 2019)'
    else:
        reweight_text = 'no loss re-weighting'
    cmo_paper = ('Park et al., "The Majority Can Help the Minority: Context-rich Minority Oversampling for '
                 'Long-tailed Classification", CVPR 2022')
    if opt.get('cmo') and opt.get('cmo_variant') in ('blur', 'jitter'):
        method_text = (
            f'Trained with the {opt["cmo_variant"]} variant of Context-rich Minority Oversampling ({cmo_paper}, its '
            f'Table 12): with probability {_fmt(opt.get("cmo_prob"))} a batch is replaced by images drawn with '
            f'per-sample weight n_k^-r (r = {_fmt(opt.get("cmo_r"))}, which favours minority classes), '
            f'{"Gaussian-blurred" if opt["cmo_variant"] == "blur" else "colour-jittered"} instead of pasted onto '
            f'a majority background (mode `{_fmt(opt.get("cmo_mode"))}`). Loss: {loss_text}, with {reweight_text}.')
    elif opt.get('cmo'):
        method_text = (
            f'Trained with Context-rich Minority Oversampling (CMO; {cmo_paper}). With probability '
            f'{_fmt(opt.get("cmo_prob"))} a batch is mixed: a box cut from an image drawn with per-sample weight '
            f'n_k^-r (r = {_fmt(opt.get("cmo_r"))}, which favours minority classes) is pasted CutMix-style, with '
            f'lambda ~ Beta({_fmt(opt.get("cmo_beta"))}, {_fmt(opt.get("cmo_beta"))}), onto an image drawn from the '
            f'original long-tailed distribution, so minority samples borrow the rich context of majority images; '
            f'labels are mixed by area (variant `{_fmt(opt.get("cmo_variant"))}`, mode `{_fmt(opt.get("cmo_mode"))}`). '
            f'Loss: {loss_text}, with {reweight_text}.')
    else:
        method_text = (f'A long-tailed baseline trained without CMO (the oversampling method of {cmo_paper}, '
                       f'implemented by timm-cmo). Loss: {loss_text}, with {reweight_text}.')
    if head_norm:
        method_text += (' The classifier is a cosine-normalised `NormedLinear` head (`head_norm=True`): its logits '
                        'are cosine similarities in [-1, 1] (the loss scales them during training).')
    if causal:
        method_text += (
            f' The classifier is Causal Norm\'s (Tang et al., NeurIPS 2020; `causal_norm=True`): {causal.get("heads")} '
            f'cosine heads scaled by tau = {_fmt(causal.get("tau"))} (gamma = {_fmt(causal.get("gamma"))}), and a '
            f'moving average of the feature kept in the model (buffer `embed_mean`, decay '
            f'{_fmt(causal.get("momentum"))}); in eval mode the model returns the TDE logits, the counterfactual '
            f'logits along that average removed with alpha = {_fmt(causal.get("alpha"))} '
            f'(`model.get_classifier().alpha` changes it).')
    bbn = method.get('bbn') if isinstance(method.get('bbn'), dict) else None
    if bbn:
        method_text += (
            f' The model is a Bilateral-Branch Network (BBN, Zhou et al., CVPR 2020): a conventional branch trained '
            f'on the ordinary batch and a re-balancing branch trained on a batch drawn with per-sample weight n_k^-r '
            f'(r = {_fmt(bbn.get("r"))}; 2 is its reversed sampler), their features mixed by alpha = 1 - (t / '
            f'{_fmt(bbn.get("alpha_epochs"))})^2 in epoch t and the loss alpha * CE(y_c) + (1 - alpha) * CE(y_r); '
            f'at test time both branches see the image with equal weight.')
    stage2 = opt.get('stage2')
    if stage2 in _STAGE2_TEXT:
        method_text += ' ' + _STAGE2_TEXT[stage2]
    post_hoc = results.get('post_hoc') if isinstance(results.get('post_hoc'), dict) else None
    if post_hoc and post_hoc.get('kind') in _POST_HOC_TEXT and post_hoc.get('tau') is not None:
        validation = post_hoc.get('validation') or {}
        method_text += (' ' + _POST_HOC_TEXT[post_hoc['kind']].format(tau=_fmt(post_hoc['tau']))
                        + (f' tau was chosen on held-out validation data ({validation["source"]}), not on the test set.'
                           if validation.get('source') else ''))

    groups = shot_groups(counts) if counts else None
    data_rows = [
        ('Dataset', f'`{data_name}`'),
        ('Imbalance ratio (n_max / n_min)', _fmt(imb_ratio) + (f' (measured {measured:.1f})' if measured else '')),
        ('Training images', _fmt(dataset.get('train_images', sum(counts) if counts else None))),
        ('Classes', _fmt(dataset.get('num_classes', args.get('num_classes')))
         + (f' ({len(groups.many)} many / {len(groups.medium)} medium / {len(groups.few)} few-shot)' if groups else '')),
        ('Images per class', f'{max(counts)} ... {min(counts)}' if counts else '–'),
    ]
    test_images = per_class.get('test_images')
    if test_images:
        data_rows.append(('Test images', _fmt(sum(test_images))))

    epochs = results.get('epochs') or args.get('epochs')
    recipe_rows = [
        ('Architecture', f'`{args["model"]}`' + (' + `NormedLinear` head' if head_norm else '')
         + (' + Causal Norm head' if causal else '')),
        ('Epochs', _fmt(args.get('epochs'))),
        ('Optimizer', _fmt(args.get('opt'))),
        ('Learning rate', _fmt(args.get('lr'))),
        ('Weight decay', _fmt(args.get('weight_decay'))),
        ('Schedule', _fmt(args.get('sched'))),
        ('Batch size', _fmt(args.get('batch_size'))),
        ('Loss / re-weighting', f'{loss} / {reweight}' + (f' (epoch {opt.get("drw_epoch")}'
                                                          f'{_used(method.get("drw_epochs"), epochs)})'
                                                          if reweight == 'drw' else '')),
        ('CMO', (f'yes: prob {_fmt(opt.get("cmo_prob"))}, beta {_fmt(opt.get("cmo_beta"))}, r {_fmt(opt.get("cmo_r"))}, '
                 f'mode {_fmt(opt.get("cmo_mode"))}, variant {_fmt(opt.get("cmo_variant"))}'
                 f'{_used(method.get("cmo_epochs"), epochs, "mixing")}') if opt.get('cmo') else 'no'),
        ('ROS', f'yes: r {_fmt(opt.get("ros_r"))}' if opt.get('ros') else 'no'),
        ('Mixup / CutMix', (f'yes (timm\'s, each batch with itself reversed): mixup {_fmt(opt.get("mixup"))}, '
                            f'cutmix {_fmt(opt.get("cutmix"))}, prob {_fmt(opt.get("mixup_prob"))}, '
                            f'mode {_fmt(opt.get("mixup_mode"))}'
                            f'{_used(method.get("mixup_epochs"), epochs, "mixing")}')
         if method.get('mixup_epochs') is not None else 'no'),
        ('Model EMA', _fmt(bool(args.get('model_ema')))),
    ]
    # the recipe file is args.yaml's `config` (results.json's `config` is the whole run configuration)
    config = args.get('config') or (results.get('config') if isinstance(results.get('config'), str) else None)
    if config:
        recipe_rows.append(('Recipe file', f'`{os.path.basename(str(config))}`'))

    metrics = results.get('metrics') or {}
    weights = f'`{CHECKPOINT_FILES.get(checkpoint, checkpoint)}`' + (' (EMA weights)' if use_ema else '')
    meta = checkpoint_meta or {}
    if 'epoch' in meta:
        weights += f', epoch {meta["epoch"]}'
    if post_hoc and post_hoc.get('validation') is not None:
        what = 'Top-1 accuracy (%) of the evaluation that chose the post-hoc adjustment, with it'
    elif post_hoc:
        what = 'Top-1 accuracy (%) of the run\'s final evaluation, before the post-hoc adjustment'
    else:
        what = 'Top-1 accuracy (%) of the run\'s final evaluation'
    results_text = [
        what
        + (f' (epoch {results["epoch"]})' if results.get('epoch') is not None else '')
        + (f' on {metrics["samples"]} test images' if metrics.get('samples') else '') + '. '
        'Many / Medium / Few: classes with > 100 / 20-100 / < 20 training images; Head / Middle / Tail: the first 30%, '
        'middle 40% and last 30% of the classes sorted by training images (mean per-class accuracy).',
        '',
        results_table_markdown(results).rstrip(),
        '',
        f'Top-5: {_fmt(metrics.get("top5"), ".1f")}. Exported weights: {weights}.',
    ]
    if metrics.get('ece') is not None:
        results_text[-1] += (f' Calibration: expected calibration error {_fmt(metrics.get("ece"), ".2f")} %, maximum '
                             f'{_fmt(metrics.get("mce"), ".2f")} % (15 equal-width confidence bins), NLL '
                             f'{_fmt(metrics.get("nll"), ".3f")}.')
    if metrics.get('experts_used') is not None:
        results_text[-1] += f' Experts used per image (expert assignment): {_fmt(metrics["experts_used"], ".2f")}.'
    best = results.get('best')
    if isinstance(best, dict) and best.get('value') is not None:
        results_text[-1] += (f' Best {best.get("metric", "top1")} during training: {_fmt(best["value"], ".2f")} '
                             f'(epoch {_fmt(best.get("epoch"))}).')

    arch = (results.get('model_build') or {}).get('architecture') or args['model']
    if _is_plugin_model(arch) or head_norm or causal:
        why = (f'`{arch}` is an architecture of the timm-cmo plugin' if _is_plugin_model(arch)
               else f'the model uses the plugin\'s `{"causal_norm" if causal else "head_norm"}` classifier')
        import_line = 'import timm_cmo  # registers the plugin\'s models and heads with timm\n'
        usage_note = f'`import timm_cmo` (`pip install timm-cmo`) is needed because {why}.'
    else:
        import_line = ''
        usage_note = 'Plain timm loads this model; `import timm_cmo` is not needed.'
    usage = (
        '```python\nimport timm\n' + import_line +
        f'\nmodel = timm.create_model(\'hf-hub:{repo_id}\', pretrained=True).eval()\n'
        'data_config = timm.data.resolve_model_data_config(model)\n'
        'transform = timm.data.create_transform(**data_config, is_training=False)\n'
        'logits = model(transform(img).unsqueeze(0))  # img: a PIL image\n```')

    title = f'{model_name} on long-tailed {data_name}' + (' with CMO' if opt.get('cmo') else '')
    parts = [
        '---\ntags:\n- image-classification\n- timm\n- long-tail\n- cmo\nlibrary_name: timm\nlicense: apache-2.0\n---',
        f'# {title}',
        '## Method\n\n' + method_text,
        '## Dataset and imbalance\n\n' + _rows(data_rows),
        '## Training recipe\n\n' + _rows(recipe_rows),
    ]
    if results.get('command'):
        command = results['command']
        command = ' '.join(command) if isinstance(command, (list, tuple)) else str(command)
        parts[-1] += f'\n\nCommand:\n\n```bash\n{command}\n```'
    parts += [
        '## Results\n\n' + '\n'.join(results_text),
        '## Usage\n\n' + usage_note + '\n\n' + usage,
        '## Citation\n\n```bibtex\n' + _CITATION + '\n```',
    ]
    return '\n\n'.join(parts) + '\n'


def post_hoc_from(path: PathLike) -> Tuple[str, float, Path]:
    """``(kind, tau, results.json path)`` of an ``--evaluate --post-hoc`` run (its folder or results.json).

    ValueError when it made no post-hoc adjustment, or evaluated under a shifted test prior / prior correction
    (an adjustment for that one test set, not for the exported model).
    """
    path = Path(path)
    results_path = path / RESULTS_JSON if path.is_dir() else path
    results = read_results(results_path)
    record = results.get('post_hoc')
    if not isinstance(record, dict) or record.get('kind') is None or record.get('tau') is None:
        raise ValueError(f'{results_path} records no post-hoc adjustment (an --evaluate --post-hoc run writes one)')
    if results.get('test_prior') or results.get('prior_correction'):
        raise ValueError(f'{results_path} evaluated under a shifted test prior or with a prior correction: export the '
                         f'adjustment of an evaluation on the test set as given')
    return str(record['kind']), float(record['tau']), results_path


def export(
        run_dir: PathLike,
        out_dir: PathLike,
        checkpoint: str = 'last',
        use_ema: bool = False,
        repo_id: Optional[str] = None,
        post_hoc: Optional[str] = None,
        post_hoc_tau: Optional[float] = None,
        post_hoc_results: Optional[PathLike] = None,
) -> Path:
    """Export a run folder as a timm Hub folder and return ``out_dir``.

    Args:
        run_dir: Training run folder with ``args.yaml``, the checkpoint and ``results.json``.
        out_dir: Output folder (created; files of an earlier export are replaced, each atomically).
        checkpoint: ``'last'`` (``last.pth.tar``), ``'best'`` (``model_best.pth.tar``) or a file name / path.
        use_ema: Export the checkpoint's ``state_dict_ema``.
        repo_id: Hub id used in the model card's usage example (placeholder ``<org>/<name>`` when None).
        post_hoc: Adjust the classifier first: ``'tau_norm'`` or ``'logit_adjust'`` (needs ``post_hoc_tau``;
            the training class counts come from the run's results.json). The export of a linear head gives
            the adjusted logits; a cosine head's logit adjustment is not exportable (ValueError).
        post_hoc_tau: The tau of ``post_hoc``.
        post_hoc_results: The results.json of the evaluation that chose it (:func:`post_hoc_from`): copied into
            the export and used for the model card instead of the run's own.

    Writes ``config.json``, ``model.safetensors``, ``README.md`` and ``results.json``.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f'Run folder {str(run_dir)!r} not found')
    if out_dir.resolve() == run_dir.resolve():
        raise ValueError('out_dir must differ from the run folder')
    if (post_hoc is None) != (post_hoc_tau is None):
        raise ValueError('post_hoc and post_hoc_tau go together: the adjustment and its tau')
    args = load_run_args(run_dir)
    ckpt_path = _checkpoint_path(run_dir, checkpoint)
    results_path = _run_file(run_dir, RESULTS_JSON, 'Results file')
    results = read_results(results_path)
    class_names = results.get('class_names')

    state_dict, meta = _load_state_dict(ckpt_path, use_ema=use_ema)
    num_classes = args.get('num_classes') or (results.get('dataset') or {}).get('num_classes') or len(class_names or [])
    model = create_run_model(args, num_classes=num_classes, build=results.get('model_build'))
    match_weight_scaling(model, state_dict)  # a cosine head keeps its weight scaling (head_lws)
    state_dict = fold_weight_scaling_state_dict(state_dict, keep=set(model.state_dict()))  # a linear head folds it
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ValueError(f'{ckpt_path} does not match {args["model"]}(num_classes={num_classes}, '
                         f'head_norm={bool(args.get("head_norm"))}): {" ".join(str(e).split())}') from None
    model.eval()
    if post_hoc is not None:
        from .posthoc import apply_post_hoc, classifier_of
        counts = ((results.get('dataset') or {}).get('class_counts')
                  or (results.get('per_class') or {}).get('train_images'))
        if post_hoc == 'logit_adjust' and not counts:
            raise ValueError(f'{results_path} records no training class counts for the logit adjustment')
        scale = float(args.get('ldam_s') or 30.) if bool(args.get('head_norm')) else 1.
        apply_post_hoc(model, post_hoc, post_hoc_tau, counts or [1] * model.num_classes, logit_scale=scale)
        if not isinstance(classifier_of(model)[0], torch.nn.Linear):
            raise ValueError(f'the {post_hoc} adjustment of a cosine-normalised head lives outside its weights: it '
                             f'is not exportable as a timm model (evaluate it with --evaluate --post-hoc instead)')
    card_results, post_hoc_copy = results, None
    if post_hoc is not None:
        card_results = dict(results, post_hoc=dict(kind=post_hoc, tau=post_hoc_tau))
        if post_hoc_results is not None:  # the figures of the adjusted model, and how its tau was chosen
            post_hoc_copy = Path(post_hoc_results)
            evaluated = read_results(post_hoc_copy)
            card_results.update({k: evaluated[k] for k in ('metrics', 'per_class', 'calibration', 'post_hoc')
                                 if k in evaluated})
            card_results['epoch'] = results.get('epoch')
    model_config = {}
    if class_names and len(class_names) == model.num_classes:
        model_config['label_names'] = list(class_names)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.', dir=out_dir.parent))
    try:
        save_for_hf(model, stage, model_config=model_config, safe_serialization=True,
                    data_config=run_data_config(args, model) or None)
        _add_run_record(stage / 'config.json', results,
                        post_hoc=dict(kind=post_hoc, tau=post_hoc_tau) if post_hoc is not None else None)
        card = model_card(args, card_results, repo_id=repo_id, checkpoint=checkpoint, use_ema=use_ema,
                          checkpoint_meta=meta)
        (stage / 'README.md').write_text(card, encoding='utf-8')
        shutil.copyfile(results_path, stage / RESULTS_JSON)
        if post_hoc_copy is not None:
            shutil.copyfile(post_hoc_copy, stage / POST_HOC_RESULTS_JSON)
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(stage.iterdir()):
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    _logger.info(f'Exported {ckpt_path}{" (EMA)" if use_ema else ""} -> {out_dir}')
    return out_dir


def _add_run_record(config_path: Path, results: Dict[str, Any], post_hoc: Optional[Dict[str, Any]] = None) -> None:
    """Add the training class counts, the method and a post-hoc adjustment of the classifier to an export's
    config.json (under ``timm_cmo``), so ``--evaluate`` of the exported model reports the same shot groups."""
    with config_path.open(encoding='utf-8') as f:
        config = json.load(f)
    dataset = results.get('dataset') if isinstance(results.get('dataset'), dict) else {}
    config[CONFIG_KEY] = {k: v for k, v in dict(
        train_class_counts=dataset.get('class_counts'), method=results.get('method'), post_hoc=post_hoc,
        version=__import__('timm_cmo').__version__).items() if v is not None}
    write_text_atomic(config_path, json.dumps(config, indent=4) + '\n')


def _redact(text: str, token: Optional[str]) -> str:
    """``text`` with the token used (given, ``HF_TOKEN`` or the login cache) replaced by ``***``."""
    secrets = {token, os.environ.get('HF_TOKEN')}
    try:
        from huggingface_hub import get_token
        secrets.add(get_token())
    except Exception:
        pass
    for secret in sorted((t for t in secrets if t), key=len, reverse=True):
        text = text.replace(secret, '***')
    return text


def push(
        run_dir: PathLike,
        repo_id: str,
        out_dir: Optional[PathLike] = None,
        checkpoint: str = 'last',
        use_ema: bool = False,
        private: bool = False,
        token: Optional[str] = None,
) -> str:
    """Export a run to ``out_dir`` (default ``<run_dir>/hub_export``) and upload it to the Hub model ``repo_id``.

    Args:
        run_dir, checkpoint, use_ema: As in :func:`export`.
        repo_id: ``'org/name'``; the repo is created if needed.
        out_dir: Persistent export folder, kept after the upload.
        private: Create the repo as private.
        token: Hub token; None uses huggingface_hub's login (``HF_TOKEN`` or the stored token). Never written.

    Returns:
        The repo URL.

    Raises:
        HubUploadError: the upload failed; the message names the intact export folder and the retry command.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / DEFAULT_EXPORT_DIR
    export(run_dir, out_dir, checkpoint=checkpoint, use_ema=use_ema, repo_id=repo_id)
    try:
        api = HfApi(token=token)
        repo_url = api.create_repo(repo_id, exist_ok=True, private=private, repo_type='model')
        api.upload_folder(repo_id=repo_id, folder_path=str(out_dir), repo_type='model',
                          commit_message=f'Upload {load_run_args(run_dir)["model"]} trained with timm-cmo')
    except Exception as e:
        retry = [_PROG, 'push', str(run_dir), repo_id, '--out-dir', str(out_dir), '--checkpoint', checkpoint]
        retry += ['--ema'] if use_ema else []
        retry += ['--private'] if private else []
        reason = _redact(' '.join(f'{type(e).__name__}: {e}'.split()), token)
        raise HubUploadError(
            f'Upload to {repo_id} failed ({reason}). The local export at {out_dir} is intact; '
            f'retry with: {" ".join(retry)}') from None
    url = str(repo_url) if isinstance(repo_url, str) else f'https://huggingface.co/{repo_id}'
    _logger.info(f'Uploaded {out_dir} to {url}')
    return url


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point (``export`` / ``push``); returns 0, or 1 after a one-line error on stderr."""
    parser = argparse.ArgumentParser(prog=_PROG, description='Export a timm-cmo training run for the Hugging Face '
                                                             'Hub, or export and upload it.')
    sub = parser.add_subparsers(dest='command', required=True)
    p_export = sub.add_parser('export', help='write a Hub folder (config.json, model.safetensors, README.md)')
    p_export.add_argument('run_dir', help='training run folder (args.yaml, last.pth.tar, results.json)')
    p_export.add_argument('out_dir', help='output folder')
    p_export.add_argument('--repo-id', default=None, help='Hub id for the model card usage (default <org>/<name>)')
    p_push = sub.add_parser('push', help='export to --out-dir, then upload (token: HF_TOKEN or hf auth login)')
    p_push.add_argument('run_dir', help='training run folder')
    p_push.add_argument('repo_id', help='Hub model repo, ORG/NAME')
    p_push.add_argument('--out-dir', default=None, help=f'export folder (default RUN_DIR/{DEFAULT_EXPORT_DIR})')
    p_push.add_argument('--private', action='store_true', help='create the repo as private')
    for p in (p_export, p_push):
        p.add_argument('--checkpoint', default='last', choices=sorted(CHECKPOINT_FILES),
                       help='last.pth.tar or model_best.pth.tar (default: last)')
        p.add_argument('--ema', action='store_true', help='export the EMA weights (state_dict_ema)')
    p_export.add_argument('--post-hoc', default=None, choices=('tau_norm', 'logit_adjust'),
                          help='export the classifier adjusted post hoc (with --post-hoc-tau)')
    p_export.add_argument('--post-hoc-tau', default=None, type=float, help='the tau of --post-hoc')
    p_export.add_argument('--post-hoc-from', default=None, metavar='EVAL_DIR',
                          help='the adjustment and tau an --evaluate --post-hoc run chose (its folder or results.json)')
    args = parser.parse_args(argv)

    try:
        if args.command == 'export':
            kind, tau, chosen_by = args.post_hoc, args.post_hoc_tau, None
            if args.post_hoc_from is not None:
                if kind is not None or tau is not None:
                    raise ValueError('--post-hoc-from takes the adjustment and tau from an evaluation: drop --post-hoc '
                                     '/ --post-hoc-tau')
                kind, tau, chosen_by = post_hoc_from(args.post_hoc_from)
            out = export(args.run_dir, args.out_dir, checkpoint=args.checkpoint, use_ema=args.ema,
                         repo_id=args.repo_id, post_hoc=kind, post_hoc_tau=tau, post_hoc_results=chosen_by)
            print(f'Exported {args.run_dir} ({args.checkpoint}{", EMA" if args.ema else ""}) -> {out}')
        else:
            url = push(args.run_dir, args.repo_id, out_dir=args.out_dir, checkpoint=args.checkpoint,
                       use_ema=args.ema, private=args.private)
            print(f'Uploaded {args.run_dir} ({args.checkpoint}{", EMA" if args.ema else ""}) -> {url}')
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        print(f'{_PROG}: error: {" ".join(str(e).split())}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
