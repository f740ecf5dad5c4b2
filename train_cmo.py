#!/usr/bin/env python3
""" timm-cmo training script: long-tailed recognition with CMO, built from timm's library parts.

Single process, CPU or GPU:
    python train_cmo.py -c hparams/cifar10_lt_r100_ce_cmo.yaml --data-dir ../data/cifar10
    timm-cmo-train -c cifar10_lt_r100_ce_cmo --data-dir ../data/cifar10   (recipes by name after pip install)
Multiple GPUs (one process each):
    torchrun --nproc_per_node=8 train_cmo.py --model resnet50 --cmo --cmo-r 1 ...
Evaluation only:
    python train_cmo.py --evaluate --model hf-hub:<org>/<name> --pretrained --data-dir ...

YAML recipes (``-c``) hold flag names as keys (``cmo_r`` or ``cmo-r``); the command line overrides
them. Every run writes ``args.yaml``, ``train.log``, ``summary.csv``, checkpoints (``last.pth.tar``,
``model_best.pth.tar``), and at the end ``results.json``, ``per_class_accuracy.csv`` and
``per_class_accuracy.png`` into its output folder.

The defaults are the paper's CIFAR-LT recipe: SGD momentum 0.9 (no Nesterov), lr 0.1, weight decay
2e-4 on all parameters, batch 128, 200 epochs, lr x0.01 from (0-based) epoch 160 and again from 180
(``--decay-milestones 161 181``: timm applies milestone m from epoch m - 1), and a linear warm-up
that gives lr * (e + 1) / 5 in epochs e = 0..4 (``--warmup-epochs 4``, ``--warmup-lr`` = lr / 5).
"""
import argparse
import difflib
import logging
import math
import os
import shlex
import shutil
import sys
import time
from collections import OrderedDict
from contextlib import suppress
from datetime import datetime
from functools import partial
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import yaml

import timm
from timm import utils
from timm.layers import convert_sync_batchnorm
from timm.models import create_model, model_parameters, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

import timm_cmo
from timm_cmo.checkpoint import (
    LAST, CheckpointError, CheckpointSaver, NonFiniteStateError, find_resume_checkpoint, load_checkpoint_file,
    remove_stale_temporaries, state_dict_from_checkpoint)
from timm_cmo.data import (
    CMO_VARIANTS, CMOConfig, CorruptImageError, LongTailDataset, MixInfo, create_cmo_loader, create_lt_dataset,
    dataset_targets)
from timm_cmo.data.config import input_channels, input_img_mode, resolve_run_data_config
from timm_cmo.data.decode import fast_decode_available
from timm_cmo.data.cmo import cmo_active
from timm_cmo.data.dual import DualBatch
from timm_cmo.data.mixup import MixupCutmix
from timm_cmo.data.remix import RemixMixup
from timm_cmo.data.sampler import derive_seed
from timm_cmo.data.splits import (
    PriorFileError, TEST_PRIORS, describe_prior, leftover_holdout_indices, read_prior_file, shifted_prior_counts,
    shifted_test_indices, stratified_holdout)
from timm_cmo.files import FileWriteError, write_text_atomic
from timm_cmo.loggers import LoggerStartError, RunLoggers, check_logger_packages, start_loggers
from timm_cmo.losses import create_loss, list_losses
from timm_cmo.losses.reweight import resolve_drw_epoch
from timm_cmo.metrics import ClassAccuracy
from timm_cmo.models import (
    CAUSAL_ARGS, CausalNormClassifier, LogitsAndFeatures, WithFeatures, check_feature_split, is_causal_norm,
    set_causal_norm_lr)
from timm_cmo.models.stage2 import fold_weight_scaling_state_dict, get_stage2, list_stage2, match_weight_scaling
from timm_cmo.posthoc import DEFAULT_TAU_GRID, POST_HOC, PRIOR_CORRECTIONS
from timm_cmo.pretrained import adapt_pretrained_state_dict, fetch_error_message, is_fetch_error, load_weights_file
from timm_cmo.recipes import resolve_recipe
from timm_cmo.results import SummaryWriter, cpu_model, peak_rss_mib, write_results

_logger = logging.getLogger('train_cmo')
_START = time.time()

LOSS_KWARGS = {
    'ldam': {'ldam_max_m': 'max_m', 'ldam_s': 's'},
    'focal': {'focal_gamma': 'gamma'},
    'la': {'la_tau': 'tau'},
    'ride': {'ldam_max_m': 'max_m', 'ldam_s': 's', 'ride_diversity_factor': 'additional_diversity_factor',
             'ride_reweight_factor': 'reweight_factor'},
    'ride_ea': {'ride_router_pos_weight': 'pos_weight'},
    'las': {'las_smooth_head': 'smooth_head', 'las_smooth_tail': 'smooth_tail', 'las_shape': 'shape'},
    'bbn': {'bbn_alpha_epochs': 'alpha_epochs'},
    'lade': {'lade_alpha': 'alpha', 'lade_remine_lambda': 'remine_lambda'},
    'ib': {'ib_alpha': 'alpha', 'ib_epsilon': 'epsilon', 'ib_start_epoch': 'start_epoch', 'ib_weighting': 'weighting'},
}
LOSS_KWARGS['ib_focal'] = dict(LOSS_KWARGS['ib'], focal_gamma='gamma')
IB_LOSSES = ('ib', 'ib_focal')
HEADS = ('linear', 'causal')
REWEIGHTS = ('none', 'cb', 'drw')
MODEL_PREFIXES = ('hf-hub:', 'local-dir:', 'hf_hub:', 'timm/')
# flags that may differ between a run and its resumption: how it runs, not what it trains
RESUME_MAY_CHANGE = frozenset({
    'config', 'data_dir', 'dataset_download', 'val_split', 'val_list', 'resume', 'no_resume_opt',
    'allow_config_change', 'start_epoch', 'initial_checkpoint', 'pretrained', 'pretrained_path', 'validation_batch_size',
    'channels_last', 'torchcompile', 'amp', 'amp_dtype', 'pin_mem', 'no_prefetcher', 'device', 'workers',
    'log_interval', 'checkpoint_hist', 'output', 'experiment', 'overwrite', 'eval_interval', 'evaluate',
    'data_on_device', 'cuda_graph', 'push_to_hub', 'hub_private', 'paper_top1', 'sync_bn', 'dist_bn', 'torchcompile_mode',
    'log_tensorboard', 'log_wandb', 'wandb_project', 'wandb_tags', 'wandb_resume_id', 'plot_format', 'fast_decode',
    'causal_alpha',  # Causal Norm's alpha acts at evaluation only
    # evaluation-time options (the held-out fraction, --tune-fraction / --tune-seed, shapes the training set)
    'post_hoc', 'post_hoc_tau', 'tune_holdout_per_class', 'tune_list', 'tune_split', 'test_prior', 'test_imb_ratio',
    'test_prior_seed', 'prior_correction'})
TUNE_SOURCES = ('tune_holdout_per_class', 'tune_list', 'tune_split', 'tune_fraction')


def create_parsers() -> Tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``-c`` recipe parser and the flag parser (new objects: YAML defaults never leak between parses)."""
    config_parser = argparse.ArgumentParser(description='Training config', add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                               help='YAML recipe whose keys are flag names; the command line overrides it')

    parser = argparse.ArgumentParser(description='timm-cmo: long-tailed training with CMO')

    group = parser.add_argument_group('Dataset')
    group.add_argument('--data-dir', metavar='DIR', default='',
                       help='data root: a folder with train/test sub-folders or train.tar/test.tar, a .tar, '
                            'the torchvision download folder, or the root that list-file paths are relative to')
    group.add_argument('--dataset', metavar='NAME', default='',
                       help="'' for folders/tars/list files, torch/cifar10, torch/cifar100")
    group.add_argument('--train-split', metavar='NAME', default='train')
    group.add_argument('--val-split', metavar='NAME', default='validation')
    group.add_argument('--train-list', metavar='FILE', default=None, help='ImageNet-LT/iNaturalist list of training images')
    group.add_argument('--val-list', metavar='FILE', default=None, help='list of evaluation images')
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME')
    group.add_argument('--dataset-download', action='store_true', default=False, help='download torchvision CIFAR')
    group.add_argument('--imb-ratio', type=float, default=None, metavar='RHO',
                       help='make the training split long-tailed with imbalance ratio n_max/n_min')
    group.add_argument('--imb-seed', type=int, default=0, help='seed of the images each class keeps')
    group.add_argument('--imb-max', type=int, default=None, metavar='N', help='cap on the largest class')
    group.add_argument('--drop-last', action='store_true', default=True,
                       help="drop the last incomplete training batch (timm's default)")
    group.add_argument('--no-drop-last', action='store_false', dest='drop_last',
                       help="keep the last incomplete training batch, as the paper's loaders do")
    group.add_argument('--fast-decode', action='store_true', default=None,
                       help='decode plain JPEGs with simplejpeg (the same pixels as Pillow, faster; '
                            'default: when simplejpeg is installed)')
    group.add_argument('--no-fast-decode', action='store_false', dest='fast_decode', help='decode every image with Pillow')

    group = parser.add_argument_group('Model')
    group.add_argument('--model', default='resnet32_cifar', type=str, metavar='MODEL',
                       help='timm model name, or local-dir:<folder> / hf-hub:<org>/<name>')
    group.add_argument('--pretrained', action='store_true', default=False,
                       help="start from the model's pretrained weights (the Hub, or the HF cache offline)")
    group.add_argument('--pretrained-path', default=None, type=str, metavar='FILE',
                       help='start from the weights of this local checkpoint or .safetensors file (a classifier '
                            'for another class count is replaced by a new one)')
    group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH', help='load weights before training')
    group.add_argument('--resume', default='', type=str, metavar='PATH', help='resume model and optimizer state')
    group.add_argument('--no-resume-opt', action='store_true', default=False)
    group.add_argument('--allow-config-change', action='store_true', default=False,
                       help='resume even where the checkpoint was trained with other data, model, loss, lr or seed')
    group.add_argument('--num-classes', type=int, default=None, metavar='N', help='defaults to the dataset classes')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs,
                       help='extra model arguments, e.g. num_experts=3 for the RIDE models')
    group.add_argument('--gp', default=None, type=str, metavar='POOL', help='global pool type')
    group.add_argument('--img-size', type=int, default=None, metavar='N')
    group.add_argument('--in-chans', type=int, default=None, metavar='N')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N')
    group.add_argument('--input-img-mode', default=None, type=str, metavar='MODE',
                       help="PIL mode images are decoded to (default: 'L' for --in-chans 1, else 'RGB')")
    group.add_argument('--crop-pct', default=None, type=float, metavar='N')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME')
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N')
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='accumulate the gradients of N batches per optimizer step (the step of one batch N times '
                            'larger, its loss normalised over all N; BatchNorm still sees each batch alone)')
    group.add_argument('--channels-last', action='store_true', default=False)
    group.add_argument('--head-norm', action='store_true', default=False,
                       help='cosine-normalised classifier (NormedLinear), for LDAM')
    group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                       help='torch.compile the model (backend, default inductor)')
    group.add_argument('--torchcompile-mode', type=str, default=None, metavar='MODE',
                       help='torch.compile mode: default | reduce-overhead | max-autotune | ... (with --torchcompile)')
    group.add_argument('--cuda-graph', action='store_true', default=False,
                       help='with --data-on-device: the whole training step (augmenting, mixing, forward, loss, '
                            'backward, SGD, EMA) and the evaluation forward pass as CUDA graphs, the epoch\'s random '
                            'draws made ahead on the device; on the CPU the same graph-safe step runs eagerly')

    group = parser.add_argument_group('Causal Norm head (Tang et al., NeurIPS 2020)')
    group.add_argument('--head', default='linear', type=str, metavar='KIND',
                       help="classifier: linear (the model's own; cosine with --head-norm) | causal (multi-head cosine "
                            "classifier with a moving-average feature, TDE logits in evaluation)")
    group.add_argument('--causal-heads', type=int, default=None, metavar='K', help='--head causal: heads (2)')
    group.add_argument('--causal-tau', type=float, default=None, help='--head causal: logit scale tau (16)')
    group.add_argument('--causal-gamma', type=float, default=None, help='--head causal: class-norm offset gamma (1/32)')
    group.add_argument('--causal-alpha', type=float, default=None,
                       help='--head causal: TDE strength at evaluation (3.0; the authors use 1.5 on CIFAR-100-LT, '
                            '1.0 on CIFAR-10-LT); test-time only, it may differ at --evaluate')
    group.add_argument('--causal-momentum', type=float, default=None, metavar='MU',
                       help='--head causal: decay of the moving-average feature (default --momentum)')
    group.add_argument('--causal-lr-scale', type=float, default=None, metavar='S',
                       help='--head causal: 0 (default) keeps the decay; S > 0 sets it each epoch to '
                            '1 - (1 - MU) * min(S * lr, 1) (the authors use 50 on ImageNet-LT)')

    group = parser.add_argument_group('Long tail')
    group.add_argument('--loss', default='ce', type=str, help=f'one of {", ".join(list_losses())}')
    group.add_argument('--reweight', default='none', type=str, help='none | cb | drw')
    group.add_argument('--drw-epoch', type=int, default=None, help='DRW start epoch (default 80%% of --epochs)')
    group.add_argument('--cb-beta', type=float, default=0.9999, help='class-balanced beta')
    group.add_argument('--ldam-max-m', type=float, default=0.5)
    group.add_argument('--ldam-s', type=float, default=30.)
    group.add_argument('--focal-gamma', type=float, default=1.0)
    group.add_argument('--la-tau', type=float, default=1.0)
    group.add_argument('--ride-diversity-factor', type=float, default=-0.2,
                       help="RIDE's additional_diversity_factor (-0.45 in its CIFAR-100-LT config)")
    group.add_argument('--ride-reweight-factor', type=float, default=0.05,
                       help="RIDE's diversity-temperature reweight_factor (0.02 ImageNet-LT, 0.015 iNat)")
    group.add_argument('--ride-router-pos-weight', type=float, default=100.,
                       help='--stage2 router: pos_weight of the router loss (ride_ea)')
    group.add_argument('--lade-alpha', type=float, default=0.1,
                       help="--loss lade: weight of LADE's regulariser (0.05 ImageNet-LT, iNaturalist)")
    group.add_argument('--lade-remine-lambda', type=float, default=0.1,
                       help="--loss lade: ReMINE penalty of the regulariser (0.01 CIFAR-100-LT, 0.5 ImageNet-LT, iNat)")
    group.add_argument('--ib-alpha', type=float, default=1000., help='--loss ib / ib_focal: influence factor numerator')
    group.add_argument('--ib-epsilon', type=float, default=1e-3, help='--loss ib / ib_focal: added to the influence')
    group.add_argument('--ib-start-epoch', type=int, default=None,
                       help='--loss ib / ib_focal: 0-based epoch from which IB replaces CE (default --epochs // 2)')
    group.add_argument('--ib-weighting', type=str, default='inverse',
                       help='--loss ib / ib_focal class weights: inverse (n_k^-1, the authors\') | none '
                            '(then --reweight cb / drw may set them)')
    group.add_argument('--las-smooth-head', type=float, default=0.3, help='LAS smoothing of the largest class')
    group.add_argument('--las-smooth-tail', type=float, default=0.0, help='LAS smoothing of the smallest class')
    group.add_argument('--las-shape', type=str, default='concave', help='LAS head-to-tail curve: concave | linear | convex | exp')
    group.add_argument('--las-lr-factor', type=float, default=1.0,
                       help="--stage2 las: lr scale of the classifier (MiSLAS's lr_factor; its weight scaling keeps 1)")
    group.add_argument('--las-shift-bn', action='store_true', default=True,
                       help='--stage2 las: BatchNorm layers update their running statistics (default)')
    group.add_argument('--no-las-shift-bn', action='store_false', dest='las_shift_bn',
                       help='--stage2 las: the whole backbone in eval mode')
    group.add_argument('--stage2', type=str, default=None, metavar='KIND',
                       help='a second stage started from --initial-checkpoint (a stage-1 run): crt (classifier '
                            're-trained from scratch, all else frozen) | lws (a per-class scale of the frozen '
                            'logits) | las (MiSLAS label-aware smoothing, classifier only, BN shift) | router (RIDE '
                            'expert assignment, router only); class-balanced sampling with --ros --ros-r 1')

    group = parser.add_argument_group('BBN (Zhou et al., CVPR 2020; --loss bbn with a bbn_* model)')
    group.add_argument('--bbn-r', type=float, default=None, metavar='R',
                       help="--loss bbn: the re-balancing branch's sampler, per-sample weight n_k^-R (2, default: "
                            "BBN's reversed sampler, class k drawn with probability proportional to n_max / n_k; 1: "
                            "class-balanced; 0: the data distribution)")
    group.add_argument('--bbn-alpha-epochs', type=int, default=None, metavar='T',
                       help='--loss bbn: the T of the cumulative-learning weight alpha = 1 - (t / T)^2 in 0-based '
                            'epoch t (default --epochs; BBN divides by 200 in its 180-epoch iNaturalist schedule)')

    group = parser.add_argument_group('Post-hoc adjustment, validation data and test prior (--evaluate)')
    group.add_argument('--post-hoc', type=str, default=None, metavar='KIND',
                       help='adjust the classifier before evaluating, no training: tau_norm (w_k / ||w_k||^tau, bias '
                            'dropped; Kang et al. 2020) | logit_adjust (logits - tau log p_train; Menon et al. 2021)')
    group.add_argument('--post-hoc-tau', type=float, nargs='+', default=None, metavar='TAU',
                       help='one tau, or a grid chosen from on the validation data (--tune-*), never on the test set '
                            '(default: the grid 0, 0.1, ..., 2.0)')
    group.add_argument('--tune-holdout-per-class', type=int, default=None, metavar='N',
                       help='validation data: N images per class (seeded) from the training images the long-tailed '
                            'subsampling left out, which the model never saw')
    group.add_argument('--tune-list', metavar='FILE', default=None, help='validation data: a list file '
                       '(e.g. ImageNet_LT_val.txt, 20 images per class held out of ImageNet-LT)')
    group.add_argument('--tune-split', metavar='NAME', default=None,
                       help='validation data: a split folder or tar under --data-dir (not the evaluation split)')
    group.add_argument('--tune-fraction', type=float, default=None, metavar='F',
                       help='validation data: a stratified fraction of the training set, held out of training (pass '
                            'it when training and again at --evaluate)')
    group.add_argument('--tune-seed', type=int, default=0, help='seed of the --tune-holdout-per-class / '
                       '--tune-fraction choice')
    group.add_argument('--test-prior', type=str, default=None, metavar='PRIOR',
                       help='evaluate under a shifted label prior: uniform | forward | backward (long-tailed like the '
                            'training set, or inverted, with --test-imb-ratio) | FILE of per-class weights; the test '
                            'set is subsampled (seeded) to it')
    group.add_argument('--test-imb-ratio', type=float, default=None, metavar='RHO',
                       help='imbalance ratio of the forward / backward test prior (n_max / n_min)')
    group.add_argument('--test-prior-seed', type=int, default=0, help='seed of the test-set subsampling')
    group.add_argument('--prior-correction', type=str, default=None, metavar='FROM',
                       help='with --test-prior: add log p_test to the logits, less log p_train ("train": logits of '
                            'the training posterior, e.g. CE) or not ("balanced": BS, LA, cRT, LWS, --post-hoc)')

    group = parser.add_argument_group('CMO')
    group.add_argument('--cmo', action='store_true', default=False, help='context-rich minority oversampling')
    group.add_argument('--cmo-r', type=float, default=1.0, help='foreground weight n_k^-r (1: class-balanced)')
    group.add_argument('--cmo-effective', action='store_true', default=False,
                       help='foreground weight 1/E(k) with the effective number')
    group.add_argument('--cmo-prob', type=float, default=0.5)
    group.add_argument('--cmo-beta', type=float, default=1.0)
    group.add_argument('--cmo-start-epoch', type=int, default=3, help='CMO when start < epoch < epochs - end')
    group.add_argument('--cmo-end-epochs', type=int, default=3)
    group.add_argument('--cmo-mode', default='batch', type=str, help='batch | elem')
    group.add_argument('--cmo-variant', default='cmo', type=str, help=' | '.join(CMO_VARIANTS))

    group = parser.add_argument_group('Other oversampling')
    group.add_argument('--ros', action='store_true', default=False,
                       help='random oversampling: draw training images with per-sample weight n_k^-r')
    group.add_argument('--ros-r', type=float, default=1.0, help='ROS weight exponent (1: class-balanced, 0.5: sqrt)')
    group.add_argument('--remix', action='store_true', default=False,
                       help='Remix: mix each batch with itself, labels rebalanced towards the minority (not with --cmo)')
    group.add_argument('--remix-kappa', type=float, default=3.0, help='Remix count-ratio threshold (> 1)')
    group.add_argument('--remix-tau', type=float, default=0.5, help='Remix lambda threshold in (0, 1)')
    group.add_argument('--remix-alpha', type=float, default=1.0, help='Remix lambda ~ Beta(alpha, alpha)')
    group.add_argument('--remix-mode', type=str, default='mixup', help='mixup | cutmix')

    group = parser.add_argument_group("Mixup and CutMix (timm's; each batch with itself reversed, not with --cmo / --remix)")
    group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha, mixup enabled if > 0')
    group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha, cutmix enabled if > 0')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None,
                       help='cutmix min/max box-side ratio, overrides alpha and enables cutmix if set')
    group.add_argument('--mixup-prob', type=float, default=1.0,
                       help='probability of mixup or cutmix per batch / pair / sample')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5,
                       help='probability of cutmix instead of mixup when both are enabled')
    group.add_argument('--mixup-mode', type=str, default='batch', help='batch | pair | elem: one draw per ...')
    group.add_argument('--mixup-off-epoch', type=int, default=0, metavar='N',
                       help='no mixup / cutmix from this (0-based) epoch on; 0: never off')

    group = parser.add_argument_group('Optimizer')
    group.add_argument('--opt', default='momentum', type=str, metavar='OPTIMIZER',
                       help="timm optimizer; 'momentum' is SGD without Nesterov as in the paper")
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M')
    group.add_argument('--weight-decay', type=float, default=2e-4)
    group.add_argument('--wd-bias-bn', action='store_true', default=True,
                       help='weight decay on biases and norm layers too, as the paper code does (default)')
    group.add_argument('--no-wd-bias-bn', action='store_false', dest='wd_bias_bn',
                       help="timm's default: no weight decay on biases and norm layers")
    group.add_argument('--layer-decay', type=float, default=None, metavar='RATE',
                       help="layer-wise lr decay: layer i of L gets lr * RATE^(L - 1 - i) (timm's param groups; "
                            "the model's group_matcher defines the layers, the classifier is the last)")
    group.add_argument('--layer-decay-min-scale', type=float, default=0, metavar='SCALE',
                       help='--layer-decay: the smallest lr scale (clamp)')
    group.add_argument('--layer-decay-no-opt-scale', type=float, default=None, metavar='SCALE',
                       help='--layer-decay: freeze the layers whose lr scale is below this')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM')
    group.add_argument('--clip-mode', type=str, default='norm', help='norm | value | agc')

    group = parser.add_argument_group('Learning rate schedule')
    group.add_argument('--sched', type=str, default='multistep', metavar='SCHEDULER')
    group.add_argument('--sched-on-updates', action='store_true', default=False)
    group.add_argument('--lr', type=float, default=0.1, metavar='LR')
    group.add_argument('--warmup-lr', type=float, default=None, metavar='LR', help='default lr / 5')
    group.add_argument('--min-lr', type=float, default=0, metavar='LR')
    group.add_argument('--epochs', type=int, default=200, metavar='N')
    group.add_argument('--start-epoch', default=None, type=int, metavar='N')
    group.add_argument('--decay-milestones', default=[161, 181], type=int, nargs='+', metavar='MILESTONES',
                       help="timm applies milestone m from epoch m - 1: 161 181 = the paper's decays at 160, 180")
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N')
    group.add_argument('--warmup-epochs', type=int, default=4, metavar='N')
    group.add_argument('--warmup-prefix', action='store_true', default=False)
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.01, metavar='RATE')

    group = parser.add_argument_group('Augmentation and regularization')
    group.add_argument('--no-aug', action='store_true', default=False)
    group.add_argument('--train-crop-mode', type=str, default=None, help="'pad' (CIFAR: pad + random crop), rrc, ...")
    group.add_argument('--crop-padding', type=int, default=4)
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO')
    group.add_argument('--hflip', type=float, default=0.5)
    group.add_argument('--vflip', type=float, default=0.)
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT', help='0 disables')
    group.add_argument('--train-interpolation', type=str, default='random', help="training resize interpolation ('random')")
    group.add_argument('--aa', type=str, default=None, metavar='NAME', help='auto augment, e.g. rand-m10-n2-mstd0.5')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT')
    group.add_argument('--remode', type=str, default='pixel')
    group.add_argument('--recount', type=int, default=1)
    group.add_argument('--smoothing', type=float, default=0.0, help='label smoothing')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT')

    group = parser.add_argument_group('Batch norm and EMA')
    group.add_argument('--sync-bn', action='store_true', default=False)
    group.add_argument('--dist-bn', type=str, default='reduce', help='reduce | broadcast | "" (after each epoch)')
    group.add_argument('--model-ema', action='store_true', default=False)
    group.add_argument('--model-ema-decay', type=float, default=0.9998)

    group = parser.add_argument_group('Miscellaneous')
    group.add_argument('--seed', type=int, default=42, metavar='S')
    group.add_argument('--log-interval', type=int, default=50, metavar='N')
    group.add_argument('--checkpoint-hist', type=int, default=3, metavar='N')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N')
    group.add_argument('--amp', action='store_true', default=False)
    group.add_argument('--amp-dtype', default='float16', type=str, help='float16 | bfloat16')
    group.add_argument('--pin-mem', action='store_true', default=False)
    group.add_argument('--no-prefetcher', action='store_true', default=False)
    group.add_argument('--device', default=None, type=str, help='cuda when available, else cpu')
    group.add_argument('--output', default='', type=str, metavar='PATH', help='parent folder of runs (./output/train)')
    group.add_argument('--experiment', default='', type=str, metavar='NAME', help='run folder name')
    group.add_argument('--overwrite', action='store_true', default=False,
                       help='start a new run in an existing, non-empty run folder (its files are replaced)')
    group.add_argument('--eval-metric', default='top1', type=str)
    group.add_argument('--eval-interval', type=int, default=1, metavar='N',
                       help='evaluate every N epochs (and always after the last)')
    group.add_argument('--evaluate', action='store_true', default=False, help='evaluate only')
    group.add_argument('--data-on-device', action='store_true', default=False,
                       help='decode the data once into device memory and augment/mix there (small datasets)')
    group.add_argument('--plot-format', default='png', type=str, metavar='FORMAT',
                       help='file format of the result plots: png | svg | pdf')
    group.add_argument('--log-tensorboard', action='store_true', default=False,
                       help='TensorBoard event files in <run>/tensorboard (needs the tensorboard package)')
    group.add_argument('--log-wandb', action='store_true', default=False,
                       help='log training and evaluation metrics to wandb (WANDB_MODE=offline without network)')
    group.add_argument('--wandb-project', default=None, type=str, help='wandb project name')
    group.add_argument('--wandb-tags', default=[], type=str, nargs='+', help='wandb tags')
    group.add_argument('--wandb-resume-id', default='', type=str, metavar='ID',
                       help='with --resume: the id of the wandb run to continue')
    group.add_argument('--push-to-hub', default='', type=str, metavar='ORG/NAME', help='upload the final model')
    group.add_argument('--hub-private', action='store_true', default=False)
    group.add_argument('--paper-top1', type=float, default=None, help='the paper number this recipe targets (recorded)')
    return config_parser, parser


def error(message: str) -> None:
    """Exit like argparse does for a bad flag value (status 2), naming the flag."""
    print(f'{os.path.basename(sys.argv[0])}: error: {message}', file=sys.stderr)
    raise SystemExit(2)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class RankZeroStopped(RuntimeError):
    """Rank 0 could not save (non-finite state, write error): the other ranks stop with it."""


def parse_args(argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, str]:
    """Parse ``-c recipe`` (a YAML file or a packaged recipe's name) then the command line; validate;
    return (args, args as YAML text)."""
    config_parser, parser = create_parsers()
    args_config, remaining = config_parser.parse_known_args(argv)
    config = ''
    if args_config.config:
        try:
            config = resolve_recipe(args_config.config)
        except FileNotFoundError as e:
            error(str(e))
        try:
            with open(config, 'r') as f:
                cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            error(f'{config}: not valid YAML: {" ".join(str(e).split())}')
        if not isinstance(cfg, dict):
            error(f'{config}: expected a mapping of flag names to values')
        known = {a.dest for a in parser._actions}
        normalized = {}
        for key, value in cfg.items():
            dest = str(key).lstrip('-').replace('-', '_')
            if dest not in known:
                error(f'{config}: unknown key {key!r} (not a flag of train_cmo.py)')
            normalized[dest] = value
        parser.set_defaults(**normalized)
    args = parser.parse_args(remaining)
    args.config = config
    validate_args(args)
    resolve_causal_args(args)
    if trains_on_dual(args) and args.bbn_r is None:
        args.bbn_r = 2.0  # BBN's reversed sampler, recorded in args.yaml
    return args, yaml.safe_dump(vars(args), default_flow_style=False)


def validate_args(args: argparse.Namespace) -> None:
    """Reject bad values before any work, naming the flag (values from YAML skip argparse's checks)."""
    def bad(flag, value, why):
        error(f'--{flag.replace("_", "-")} {value!r}: {why}')

    if args.loss not in list_losses():
        bad('loss', args.loss, f'unknown loss, choose from {", ".join(list_losses())}')
    if args.fast_decode and not fast_decode_available():
        bad('fast_decode', args.fast_decode, 'needs simplejpeg: pip install simplejpeg (or timm-cmo[fast]), or drop the flag')
    if args.reweight not in REWEIGHTS:
        bad('reweight', args.reweight, f'choose from {", ".join(REWEIGHTS)}')
    try:
        CMOConfig.from_flags(**vars(args))  # the CMO options are checked where they are defined
    except ValueError as e:
        field = str(e).split()[0]
        bad(f'cmo_{field}', getattr(args, f'cmo_{field}', None), str(e))
    if args.ros and not args.ros_r >= 0:
        bad('ros_r', args.ros_r, 'must be >= 0')
    if args.remix:
        if args.cmo:
            error('--remix and --cmo are two ways of mixing: choose one')
        try:  # the Remix options are checked where they are defined
            RemixMixup(2, [1, 1], **remix_kwargs(args))
        except ValueError as e:
            field = str(e).split()[0]
            bad(f'remix_{field}', getattr(args, f'remix_{field}', None), str(e))
    if mixup_active(args):
        if args.cmo or args.remix:
            error(f'--mixup / --cutmix and {"--cmo" if args.cmo else "--remix"} are two ways of mixing a batch '
                  f'(the paper never combines them): choose one')
        try:  # the Mixup / CutMix options are checked where they are defined
            MixupCutmix(2, **mixup_kwargs(args))
        except ValueError as e:
            flag = MIXUP_FLAGS.get(str(e).split()[0])
            if flag is None:
                error(f'--mixup {args.mixup!r} / --cutmix {args.cutmix!r}: {e}')
            bad(flag, getattr(args, flag), str(e))
    try:  # a Hub model's channels are known once it is built; here the flags are checked against each other
        input_img_mode(args.input_img_mode, input_channels(vars(args), default=None))
    except ValueError as e:
        error(str(e))
    if args.imb_ratio is not None and not args.imb_ratio >= 1:
        bad('imb_ratio', args.imb_ratio, 'must be >= 1 (n_max / n_min)')
    if args.imb_max is not None and args.imb_max < 1:
        bad('imb_max', args.imb_max, 'must be >= 1')
    if not 0 <= args.smoothing < 1:
        bad('smoothing', args.smoothing, 'must be in [0, 1)')
    for flag in ('epochs', 'batch_size', 'log_interval', 'eval_interval', 'grad_accum_steps'):
        if getattr(args, flag) < 1:
            bad(flag, getattr(args, flag), 'must be >= 1')
    if not args.lr > 0:
        bad('lr', args.lr, 'must be > 0')
    if args.drw_epoch is not None and args.drw_epoch < 0:
        bad('drw_epoch', args.drw_epoch, 'must be >= 0')
    if args.amp_dtype not in ('float16', 'bfloat16'):
        bad('amp_dtype', args.amp_dtype, 'choose from float16, bfloat16')
    if args.train_crop_mode not in (None, 'pad', 'rrc', 'rkrc', 'rkrr'):
        bad('train_crop_mode', args.train_crop_mode, 'choose from pad, rrc, rkrc, rkrr')
    if not isinstance(args.model_kwargs, dict):
        bad('model_kwargs', args.model_kwargs, 'expected key=value pairs (a mapping in YAML)')
    if not args.model.startswith(MODEL_PREFIXES) and not timm.is_model(args.model):
        close = difflib.get_close_matches(args.model, timm.list_models(), n=3)
        bad('model', args.model, 'unknown model' + (f'; did you mean {", ".join(close)}?' if close else
                                                    ' (timm.list_models() lists the known ones)'))
    if args.data_on_device:
        unsupported = {'aa': args.aa, 'color_jitter': args.color_jitter, 'vflip': args.vflip, 'no_aug': args.no_aug}
        for flag, value in unsupported.items():
            if value:
                bad(flag, value, 'not supported with --data-on-device')
        if args.train_crop_mode != 'pad':
            bad('train_crop_mode', args.train_crop_mode,
                "--data-on-device augments with the paper's CIFAR pad crop only: add --train-crop-mode pad "
                "(timm's random-resized crop, used without it, runs in the ordinary loader)")
    if args.cuda_graph:
        validate_cuda_graph_args(args)
    if args.layer_decay is not None:
        if not 0 < args.layer_decay <= 1:
            bad('layer_decay', args.layer_decay, 'must be in (0, 1] (the lr scale from one layer to the one below)')
        if args.stage2 is not None:
            error(f'--layer-decay and --stage2 {args.stage2}: a second stage trains its own parameter groups')
    if args.torchcompile_mode is not None:
        if not args.torchcompile:
            error(f'--torchcompile-mode {args.torchcompile_mode}: add --torchcompile (the mode of its compilation)')
        from torch._inductor import list_mode_options
        if args.torchcompile_mode not in list_mode_options():
            bad('torchcompile_mode', args.torchcompile_mode, f'choose from {", ".join(list_mode_options())}')
    if args.stage2 is not None:
        if args.stage2 not in list_stage2():
            bad('stage2', args.stage2, f'choose from {", ".join(list_stage2())}')
        stage = get_stage2(args.stage2)
        if not args.initial_checkpoint and not args.resume and not args.evaluate:
            error(f'--stage2 {args.stage2} starts from a stage-1 model: add --initial-checkpoint <stage-1 run>/last.pth.tar')
        if args.loss != stage.loss:
            bad('loss', args.loss, f'--stage2 {args.stage2} trains with --loss {stage.loss}')
        if args.cmo or args.remix or mixup_active(args):
            error(f'--stage2 {args.stage2} re-trains {stage.trains} without mixing: drop --cmo / --remix / --mixup / '
                  f'--cutmix')
    elif args.loss in ('ride_ea',):
        bad('loss', args.loss, 'the router loss is for --stage2 router')
    if args.loss == 'lade':
        for flag in ('lade_alpha', 'lade_remine_lambda'):
            if not getattr(args, flag) >= 0:
                bad(flag, getattr(args, flag), 'must be >= 0')
    if args.loss in IB_LOSSES:
        from timm_cmo.losses.ib import IB_WEIGHTINGS
        if not args.ib_alpha > 0:
            bad('ib_alpha', args.ib_alpha, 'must be > 0')
        if not args.ib_epsilon >= 0:
            bad('ib_epsilon', args.ib_epsilon, 'must be >= 0')
        if args.ib_start_epoch is not None and args.ib_start_epoch < 0:
            bad('ib_start_epoch', args.ib_start_epoch, 'must be >= 0')
        if args.ib_weighting not in IB_WEIGHTINGS:
            bad('ib_weighting', args.ib_weighting, f'choose from {", ".join(IB_WEIGHTINGS)}')
        if args.ib_weighting == 'inverse' and args.reweight != 'none':
            error(f'--reweight {args.reweight} with --loss {args.loss}: the IB loss has its own inverse-frequency '
                  f'class weights (--ib-weighting inverse); add --ib-weighting none to use the {args.reweight} weights')
    validate_causal_args(args, bad)
    validate_bbn_args(args, bad)
    validate_evaluation_args(args)
    if args.resume and args.initial_checkpoint:
        error('--resume and --initial-checkpoint: pass one (--resume continues a run, --initial-checkpoint '
              'starts a new one from weights)')
    if args.pretrained_path and args.initial_checkpoint:
        error('--pretrained-path and --initial-checkpoint: pass one (--pretrained-path adapts the head to the '
              'class count, --initial-checkpoint loads a run of this model as it is)')
    if not args.data_dir and not args.evaluate:
        error('--data-dir is required')
    from timm_cmo.plot import PLOT_FORMATS
    if args.plot_format not in PLOT_FORMATS:
        bad('plot_format', args.plot_format, f'choose from {", ".join(PLOT_FORMATS)}')
    if args.wandb_resume_id and not args.resume:
        error(f'--wandb-resume-id {args.wandb_resume_id}: continues the wandb run of a resumed run; add --resume')
    if (args.wandb_project or args.wandb_tags or args.wandb_resume_id) and not args.log_wandb:
        error('--wandb-project / --wandb-tags / --wandb-resume-id: add --log-wandb')
    if not isinstance(args.wandb_tags, (list, tuple)):
        bad('wandb_tags', args.wandb_tags, 'expected a list of tags')
    try:
        check_logger_packages(args.log_tensorboard and not args.evaluate, args.log_wandb and not args.evaluate)
    except LoggerStartError as e:
        error(str(e))


GRAPH_OPTS = ('momentum', 'sgd', 'nesterov')  # timm's names of torch SGD (without / with Nesterov momentum)


def validate_cuda_graph_args(args: argparse.Namespace) -> None:
    """``--cuda-graph``: the options the graph-safe step cannot hold, refused with the flag named."""
    if args.evaluate:
        return
    if not args.data_on_device:
        error('--cuda-graph needs --data-on-device: the ordinary loader decodes, augments and mixes the batches on '
              'the host (in worker processes), which a CUDA graph cannot replay')
    refused = (
        ('grad_accum_steps', args.grad_accum_steps if args.grad_accum_steps > 1 else None,
         'a graphed step is one optimizer step of one batch'),
        ('reprob', args.reprob or None, 'random erasing draws inside the step from the global generator'),
        ('stage2', args.stage2, 'a second stage trains with its own frozen parts and modes: train it without '
                                '--cuda-graph (it is short)'),
        ('loss', args.loss if args.loss in IB_LOSSES else None,
         'IB takes the penultimate features and switches loss at --ib-start-epoch'),
        ('loss', args.loss if trains_on_dual(args) else None,
         "BBN's dual (re-balancing) batch is not drawn ahead"),
        ('amp_dtype', args.amp_dtype if args.amp and args.amp_dtype == 'float16' else None,
         'float16 needs loss scaling, which reads the host every step: use --amp-dtype bfloat16'),
        ('torchcompile', args.torchcompile, 'two ways of cutting the launch cost: choose --cuda-graph or --torchcompile'),
        ('opt', args.opt if args.opt.lower() not in GRAPH_OPTS else None,
         f'the graphed update is torch SGD\'s: --opt {", ".join(GRAPH_OPTS)}'),
        ('clip_mode', args.clip_mode if args.clip_grad is not None and args.clip_mode not in ('norm', 'value') else None,
         'the graphed step clips by norm or value'),
        ('head', args.head if args.head == 'causal' else None,
         'the Causal Norm head sets its moving-average decay from the lr on the host'),
        ('sync_bn', args.sync_bn or None, 'the graphed step runs in one process'),
    )
    for flag, value, why in refused:
        if value is not None:
            error(f'--cuda-graph with --{flag.replace("_", "-")} {value!r}: {why}')


def validate_causal_args(args: argparse.Namespace, bad) -> None:
    """``--head`` and the ``--causal-*`` flags: values checked where the head defines them, combinations here."""
    if args.head not in HEADS:
        bad('head', args.head, f'choose from {", ".join(HEADS)}')
    given = {k: getattr(args, k) for k in CAUSAL_ARGS if getattr(args, k) is not None}
    if args.head != 'causal':
        if given and not args.model.startswith(MODEL_PREFIXES):  # a Hub model may hold a Causal Norm head
            flag = next(iter(given))
            bad(flag, given[flag], 'sets the Causal Norm head: add --head causal')
        return
    if args.head_norm:
        error('--head causal and --head-norm are two classifier heads: choose one')
    if args.stage2 is not None:
        error(f'--stage2 {args.stage2} re-trains a linear or cosine classifier; Causal Norm (--head causal) is '
              f'trained in one stage')
    try:  # the head checks its own arguments; their names follow --causal-
        kwargs = dict({'heads': 1}, **{CAUSAL_ARGS[k][0]: v for k, v in given.items()})
        heads = kwargs['heads']
        CausalNormClassifier(heads if isinstance(heads, int) and heads > 0 else 1, 2, **kwargs)
    except ValueError as e:
        field = str(e).split()[0]
        bad(f'causal_{field}', getattr(args, f'causal_{field}', None), str(e))


def trains_on_dual(args: argparse.Namespace) -> bool:
    """Whether ``--loss`` trains on a dual batch beside each batch (BBN's re-balancing batch)."""
    return bool(getattr(_loss_class(args.loss), 'needs_dual', False))


def validate_bbn_args(args: argparse.Namespace, bad) -> None:
    """``--loss bbn`` and the ``--bbn-*`` flags, and what BBN's two branches cannot take: the conventional branch
    samples the data distribution (CMO pastes onto it, with its backgrounds ~ P), the re-balancing branch the
    reversed sampler, and the cumulative learning weighs the two."""
    if not trains_on_dual(args):
        for flag in ('bbn_r', 'bbn_alpha_epochs'):
            if getattr(args, flag) is not None:
                bad(flag, getattr(args, flag), "sets BBN's re-balancing branch: add --loss bbn (and a bbn_* model)")
        return
    if args.bbn_r is not None and not args.bbn_r >= 0:
        bad('bbn_r', args.bbn_r, 'must be >= 0 (the per-sample weight n_k^-R of the re-balancing sampler)')
    if args.bbn_alpha_epochs is not None and args.bbn_alpha_epochs < args.epochs:
        bad('bbn_alpha_epochs', args.bbn_alpha_epochs, f'must be >= --epochs {args.epochs}: alpha = 1 - (t / T)^2 '
            f'would turn negative')
    if args.reweight != 'none':
        bad('reweight', args.reweight, 'BBN re-balances with its re-balancing branch and cumulative learning, not with '
            'class weights: use --reweight none with --loss bbn')
    if args.cmo and CMOConfig.from_flags(**vars(args)).background_from_q:
        bad('cmo_variant', args.cmo_variant, "draws the ordinary batch's backgrounds from Q, but with --loss bbn that "
            "batch is the conventional branch's, drawn from the data distribution (the re-balancing branch draws "
            "the minority already): use --cmo-variant cmo, mixup, blur or jitter")
    for on, what in ((args.remix, '--remix'), (mixup_active(args), '--mixup / --cutmix'), (args.ros, '--ros')):
        if on:
            error(f'{what} with --loss bbn: BBN\'s conventional branch trains on the ordinary batch as drawn (CMO is '
                  f'the mixing it takes, pasting minority foregrounds onto that batch) and its re-balancing branch '
                  f'on the reversed sampler\'s (--bbn-r): drop {what}')


def check_dual_training(args: argparse.Namespace, model: nn.Module) -> None:
    """A two-branch model (BBN) trains with a loss that takes the dual batch (``--loss bbn``), and such a loss
    with such a model only; evaluation takes either alone."""
    if args.evaluate:
        return
    model_dual = bool(getattr(model, 'needs_dual', False))
    if trains_on_dual(args) and not model_dual:
        error(f'--loss {args.loss} trains the two branches of a BBN model (bbn_resnet32_cifar, bbn_resnet50) on the '
              f'ordinary and the re-balancing batch; --model {args.model} has one branch')
    if model_dual and not trains_on_dual(args):
        error(f'--model {args.model} is a BBN model: its branches train on the ordinary and the re-balancing batch '
              f'with --loss bbn (alpha * L(y_c) + (1 - alpha) * L(y_r)); --loss {args.loss} would train both on the '
              f'same images')


def resolve_causal_args(args: argparse.Namespace) -> None:
    """``--head causal`` on a model built here: the unset ``--causal-*`` flags take the authors' defaults
    (``--causal-momentum`` the optimizer's ``--momentum``), so args.yaml records the head that trains. A
    ``local-dir:`` / ``hf-hub:`` model keeps the values its config records for the flags left unset."""
    if args.head != 'causal' or args.model.startswith(MODEL_PREFIXES):
        return
    for key, (_, default) in CAUSAL_ARGS.items():
        if getattr(args, key) is None:
            setattr(args, key, args.momentum if key == 'causal_momentum' else default)


def causal_model_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The model arguments of ``--head causal`` (``causal_norm=True``) and of the ``--causal-*`` flags set."""
    kwargs = {k: getattr(args, k) for k in CAUSAL_ARGS if getattr(args, k) is not None}
    if args.head == 'causal':
        kwargs['causal_norm'] = True
    return kwargs


def _flag(dest: str) -> str:
    return '--' + dest.replace('_', '-')


def validate_evaluation_args(args: argparse.Namespace) -> None:
    """The post-hoc, validation-data and test-prior flags (checked before any data is read)."""
    def bad(flag, value, why):
        error(f'--{flag.replace("_", "-")} {value!r}: {why}')

    sources = [dest for dest in TUNE_SOURCES if getattr(args, dest) is not None]
    if len(sources) > 1:
        error(f'{" and ".join(_flag(d) for d in sources)}: give one source of validation data')
    if args.tune_holdout_per_class is not None and args.tune_holdout_per_class < 1:
        bad('tune_holdout_per_class', args.tune_holdout_per_class, 'must be >= 1')
    if args.tune_fraction is not None and not 0 < args.tune_fraction < 1:
        bad('tune_fraction', args.tune_fraction, 'must be in (0, 1)')
    if args.tune_split is not None and args.tune_split in (args.val_split, args.train_split):
        which = 'evaluation' if args.tune_split == args.val_split else 'training'
        bad('tune_split', args.tune_split, f'is the {which} split: the validation data must be held out of both')
    if args.tune_list is not None and args.tune_list in (args.val_list, args.train_list):
        which = 'evaluation' if args.tune_list == args.val_list else 'training'
        bad('tune_list', args.tune_list, f'is the {which} list: the validation data must be held out of both')
    if args.post_hoc is not None:
        if args.post_hoc not in POST_HOC:
            bad('post_hoc', args.post_hoc, f'choose from {", ".join(POST_HOC)}')
        if not args.evaluate:
            error(f'--post-hoc {args.post_hoc} adjusts a trained model: use it with --evaluate (e.g. --evaluate '
                  f'--resume <run>/last.pth.tar)')
    if args.post_hoc_tau is not None:
        if args.post_hoc is None:
            error('--post-hoc-tau: choose the adjustment with --post-hoc tau_norm|logit_adjust')
        for tau in args.post_hoc_tau:
            if not (math.isfinite(tau) and tau >= 0):
                bad('post_hoc_tau', tau, 'tau must be a finite number >= 0')
    if args.post_hoc is not None:
        grid = tuned_grid(args)
        if len(grid) > 1 and not sources:
            error(f'--post-hoc {args.post_hoc} with the tau grid {", ".join(f"{t:g}" for t in grid)}: tau is chosen on '
                  f'validation data held out of training, never on the test set: add --tune-holdout-per-class N '
                  f'(images the long-tailed subsampling left out), --tune-list FILE, --tune-split NAME or '
                  f'--tune-fraction F, or give one value with --post-hoc-tau')
    elif sources and args.evaluate and sources != ['tune_fraction']:
        error(f'{_flag(sources[0])}: the validation data is for choosing tau: add --post-hoc tau_norm|logit_adjust')
    elif sources and not args.evaluate and sources != ['tune_fraction']:
        error(f'{_flag(sources[0])} is validation data for --evaluate --post-hoc; to hold validation data out of '
              f'training use --tune-fraction')
    if args.test_prior is not None:
        if args.test_prior not in TEST_PRIORS and not os.path.isfile(args.test_prior):
            bad('test_prior', args.test_prior, f'choose from {", ".join(TEST_PRIORS)} or give a file of class weights '
                f'(no such file)')
        if args.test_prior in ('forward', 'backward'):
            if args.test_imb_ratio is None:
                error(f'--test-prior {args.test_prior} needs --test-imb-ratio RHO (e.g. 50: n_max / n_min)')
            if not args.test_imb_ratio >= 1:
                bad('test_imb_ratio', args.test_imb_ratio, 'must be >= 1 (n_max / n_min)')
        elif args.test_imb_ratio is not None:
            bad('test_imb_ratio', args.test_imb_ratio, f'is for --test-prior forward|backward, not {args.test_prior!r}')
        if args.test_prior not in TEST_PRIORS:
            try:
                read_prior_file(args.test_prior)
            except PriorFileError as e:
                error(f'--test-prior: {e}')
    elif args.test_imb_ratio is not None:
        error('--test-imb-ratio: choose the profile with --test-prior forward|backward')
    if args.prior_correction is not None:
        if args.prior_correction not in PRIOR_CORRECTIONS:
            bad('prior_correction', args.prior_correction, f'choose from {", ".join(PRIOR_CORRECTIONS)}')
        if not args.evaluate or args.test_prior is None:
            error(f'--prior-correction {args.prior_correction} corrects the logits for a known test prior: use it with '
                  f'--evaluate and --test-prior')
        if args.post_hoc is not None and args.prior_correction == 'train':
            error(f'--prior-correction train after --post-hoc {args.post_hoc} would remove the training prior twice: '
                  f'the adjusted logits are balanced, use --prior-correction balanced')


def tuned_grid(args) -> List[float]:
    """The values of tau ``--post-hoc`` tries: ``--post-hoc-tau``, or the authors' grid 0, 0.1, ..., 2."""
    return list(args.post_hoc_tau) if args.post_hoc_tau is not None else list(DEFAULT_TAU_GRID)


def remix_kwargs(args) -> Dict[str, Any]:
    return dict(kappa=args.remix_kappa, tau=args.remix_tau, alpha=args.remix_alpha, mode=args.remix_mode)


# MixupCutmix's arguments and the flags (timm's train.py names) that set them
MIXUP_FLAGS = {'mixup_alpha': 'mixup', 'cutmix_alpha': 'cutmix', 'cutmix_minmax': 'cutmix_minmax', 'prob': 'mixup_prob',
               'switch_prob': 'mixup_switch_prob', 'mode': 'mixup_mode', 'off_epoch': 'mixup_off_epoch'}


def mixup_active(args) -> bool:
    """Whether timm's Mixup / CutMix is asked for (as timm's train.py decides; a negative alpha is refused later)."""
    return args.mixup != 0 or args.cutmix != 0 or args.cutmix_minmax is not None


def mixup_kwargs(args) -> Dict[str, Any]:
    return {arg: getattr(args, flag) for arg, flag in MIXUP_FLAGS.items()}


def mixup_text(args) -> str:
    """', Mixup 1 / CutMix 0 (batch, prob 1)' for the start-of-run line; '' when off."""
    if not mixup_active(args):
        return ''
    cutmix = 'minmax ' + '-'.join(f'{v:g}' for v in args.cutmix_minmax) if args.cutmix_minmax else f'{args.cutmix:g}'
    return f', Mixup {args.mixup:g} / CutMix {cutmix} ({args.mixup_mode}, prob {args.mixup_prob:g})'


def method_epochs(args) -> Dict[str, Optional[int]]:
    """How many of the run's epochs mix with CMO and apply DRW weights (None where off), and with Mixup / CutMix
    (where on)."""
    drw_epoch = resolve_drw_epoch(args.drw_epoch, args.epochs) if args.reweight == 'drw' else None
    return dict(
        cmo_epochs=sum(cmo_active(e, args.epochs, args.cmo_start_epoch, args.cmo_end_epochs)
                       for e in range(args.epochs)) if args.cmo else None,
        drw_epochs=max(0, args.epochs - drw_epoch) if drw_epoch is not None else None,
        **({'mixup_epochs': min(args.epochs, args.mixup_off_epoch or args.epochs)} if mixup_active(args) else {}),
        **({'ib_epochs': max(0, args.epochs - ib_start_epoch(args))} if args.loss in IB_LOSSES else {}),
    )


def ib_start_epoch(args) -> int:
    """The 0-based epoch from which ``--loss ib`` / ``ib_focal`` applies (``--ib-start-epoch``, else epochs // 2)."""
    from timm_cmo.losses.ib import resolve_ib_start_epoch
    return resolve_ib_start_epoch(args.ib_start_epoch, args.epochs)


def warn_inactive_methods(args) -> None:
    """Say so at the start when a short run never enters the CMO window or reaches the DRW epoch."""
    used = method_epochs(args)
    if used['cmo_epochs'] == 0:
        _logger.warning(
            f'--cmo is on but no epoch of this run mixes: CMO mixes when {args.cmo_start_epoch} < epoch < '
            f'{args.epochs} - {args.cmo_end_epochs} (--cmo-start-epoch, --cmo-end-epochs, --epochs).')
    if used['drw_epochs'] == 0:
        _logger.warning(
            f'--reweight drw switches at epoch {resolve_drw_epoch(args.drw_epoch, args.epochs)}, after the last '
            f'epoch ({args.epochs - 1}): the class weights never apply.')
    if used.get('ib_epochs') == 0:
        _logger.warning(
            f'--loss {args.loss} starts at epoch {ib_start_epoch(args)} (--ib-start-epoch), after the last epoch '
            f'({args.epochs - 1}): the run trains with plain cross-entropy.')


def compute_loss(loss_fn: nn.Module, output, target: torch.Tensor, mix_info: Optional[MixInfo],
                 norm: Optional[Tuple[torch.Tensor, float]] = None, dual: Optional[DualBatch] = None) -> torch.Tensor:
    """The training loss of a batch: ``loss_fn(output, target, mix=mix_info)`` (``dual=dual`` with a dual batch).

    A batch the loader mixed (CMO) or smoothed gets the loss of its mix, the paper's per-term form
    ``lam * L(y_b) + (1 - lam) * L(y_f)`` (see :mod:`timm_cmo.losses.long_tail`), exactly what the
    README's library loop computes. ``output`` is the model's: (B, C) logits, or the multi-expert
    training output for a loss that ``needs_experts`` (``_main`` switches it on for those). ``norm``: a
    micro-batch's share of an accumulated batch, from :func:`accumulation_norm`. A
    :class:`~timm_cmo.models.LogitsAndFeatures` output (the model trained through ``WithFeatures``) hands its
    features to losses with ``needs_features`` as ``features=``. A batch with a dual batch (BBN's re-balancing
    batch, ``loader.dual``) gives it to the loss, which weighs its labels in (:mod:`timm_cmo.losses.bbn`).
    """
    kwargs = {} if mix_info is None else dict(mix=mix_info)
    if dual is not None:
        kwargs['dual'] = dual
    if isinstance(output, LogitsAndFeatures):
        if getattr(loss_fn, 'needs_features', False):
            kwargs['features'] = output.features
        output = output.logits
    elif getattr(loss_fn, 'needs_features', False):
        raise ValueError(f'{type(loss_fn).__name__} needs the penultimate features: train the model through '
                         f'timm_cmo.models.WithFeatures (a LogitsAndFeatures output)')
    if norm is None:
        return loss_fn(output, target, **kwargs)
    denominators, share = norm
    if denominators is not None:
        return loss_fn(output, target, norm=denominators, **kwargs)
    return loss_fn(output, target, **kwargs) * share


def accumulation_norm(
        loss_fn: nn.Module, batches: List[Tuple[Any, torch.Tensor, Optional[MixInfo], Optional[DualBatch]]],
) -> List[Tuple[Optional[torch.Tensor], float]]:
    """Per micro-batch, the ``norm`` of :func:`compute_loss` that makes the micro-batch losses of one accumulated
    batch add up to the loss of their concatenation (and so their gradients to its gradient).

    The plugin's losses divide by the summed denominators of all the micro-batches (``loss_fn.normalizer``: class
    weights, the two terms of a mix, the dual batch's term, see :mod:`timm_cmo.losses.long_tail`); another loss,
    taken to be a batch mean, is scaled by the micro-batch's share of the samples, ``B_j / sum_j B_j``.
    """
    if getattr(loss_fn, 'normalizer', None) is not None:
        denominators = sum(loss_fn.normalizer(target, mix, **({} if dual is None else dict(dual=dual)))
                           for _, target, mix, dual in batches)
        return [(denominators, 1.)] * len(batches)
    sizes = [target.shape[0] for _, target, _, _ in batches]
    return [(None, b / sum(sizes)) for b in sizes]


def accumulated_batches(loader, accum_steps: int
                        ) -> Iterator[List[Tuple[Any, torch.Tensor, Optional[MixInfo], Optional[DualBatch]]]]:
    """The loader's batches, ``accum_steps`` at a time (the epoch's last group may be shorter), each as
    ``(input, target, mix_info, dual)`` with the loader's ``mix_info`` and ``dual`` read as the batch arrives."""
    group = []
    for input, target in loader:
        group.append((input, target, getattr(loader, 'mix_info', None), getattr(loader, 'dual', None)))
        if len(group) == accum_steps:
            yield group
            group = []
    if group:
        yield group


def format_seconds(seconds: float) -> str:
    seconds = int(round(max(0., seconds)))
    h, rem = divmod(seconds, 3600)
    return f'{h}:{rem // 60:02d}:{rem % 60:02d}'


def run_eta(epoch_times: List[float], left: int) -> float:
    """Seconds for ``left`` more epochs: the mean epoch time of this process, leaving out its first epoch
    (start-up, ``--torchcompile`` compilation) once later ones are timed."""
    timed = epoch_times[1:] or epoch_times
    return sum(timed) / len(timed) * left if timed else 0.


def log_train_step(epoch: int, step_idx: int, steps: int, loss: float, step_time: float, samples_per_s: float,
                   lr: float, elapsed: float) -> None:
    """The training log line of step ``step_idx`` of ``steps`` (the ETA from the ``elapsed`` seconds of the epoch)."""
    eta = elapsed / (step_idx + 1) * (steps - step_idx - 1)
    _logger.info(
        f'Train: {epoch} [{step_idx:>4d}/{steps} ({100. * (step_idx + 1) / steps:>3.0f}%)]  '
        f'Loss: {loss:#.4g}  '
        f'Time: {step_time:.3f}s, {samples_per_s:>7.1f}/s  '
        f'LR: {lr:.3e}  ETA: {format_seconds(eta)}')


def train_one_epoch(
        epoch: int, model: nn.Module, loader, optimizer, loss_fn, args, device, lr_scheduler=None,
        amp_autocast=suppress, loss_scaler=None, model_ema=None, train_mode=None,
) -> Dict[str, float]:
    """One epoch of training; ``train_mode(model)`` replaces ``model.train()`` (a second stage's mode).

    With ``args.grad_accum_steps`` = k > 1 each optimizer step accumulates the gradients of k loader batches (the
    epoch's last step those left over), their losses normalised together (:func:`accumulation_norm`): the step
    is the one of the loss of their concatenation. The scheduler, the EMA and the log count optimizer steps.
    BatchNorm layers still see each loader batch on its own (their statistics are per forward pass).

    A batch with a dual batch (``loader.dual``, BBN's re-balancing batch) trains the model's two-branch forward,
    ``model(input, dual.x, loss_fn.alpha)``, its branches mixed with the weight the loss gives the dual labels;
    it goes through the model's ``__call__``, so DistributedDataParallel and ``torch.compile`` see it.
    """
    if train_mode is not None:
        train_mode(model)
    else:
        model.train()
    accum_steps = max(1, int(getattr(args, 'grad_accum_steps', 1) or 1))
    batch_time_m = utils.AverageMeter()
    num_batches = len(loader)
    updates_per_epoch = (num_batches + accum_steps - 1) // accum_steps
    num_updates = epoch * updates_per_epoch
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    last_logged_sum, last_logged_count = 0., 0
    no_sync = getattr(model, 'no_sync', None) if accum_steps > 1 else None
    start = end = time.time()
    for update_idx, batches in enumerate(accumulated_batches(loader, accum_steps)):
        last_update = update_idx == updates_per_epoch - 1
        norms = accumulation_norm(loss_fn, batches) if len(batches) > 1 else [None]
        optimizer.zero_grad(set_to_none=True)
        step_loss, samples = 0., 0
        for j, ((input, target, mix_info, dual), norm) in enumerate(zip(batches, norms)):
            need_update = j == len(batches) - 1
            if args.channels_last:
                input = input.contiguous(memory_format=torch.channels_last)
                if dual is not None:
                    dual = dual._replace(x=dual.x.contiguous(memory_format=torch.channels_last))
            with (suppress() if need_update or no_sync is None else no_sync()):
                with amp_autocast():
                    output = model(input) if dual is None else model(input, dual.x, loss_fn.alpha)
                    loss = compute_loss(loss_fn, output, target, mix_info, norm, dual)
                if loss_scaler is not None:
                    loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                                parameters=model_parameters(model, exclude_head='agc' in args.clip_mode),
                                need_update=need_update)
                else:
                    loss.backward()
                    if need_update:
                        if args.clip_grad is not None:
                            utils.dispatch_clip_grad(model_parameters(model, exclude_head='agc' in args.clip_mode),
                                                     value=args.clip_grad, mode=args.clip_mode)
                        optimizer.step()
            step_loss = step_loss + loss.detach()
            samples += input.size(0)
        if model_ema is not None:
            model_ema.update(model, step=num_updates)
        num_updates += 1
        loss = step_loss
        nonfinite |= ~torch.isfinite(loss)
        loss_sum += loss
        loss_count += 1
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
        batch_time_m.update(time.time() - end)
        end = time.time()
        if last_update or update_idx % args.log_interval == 0:
            if args.distributed:  # every rank stops together, not only the one that saw it
                flag = nonfinite.to(torch.int32)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                nonfinite = flag.bool()
            if bool(nonfinite):  # host sync only at log points
                raise NonFiniteLossError(f'non-finite loss in epoch {epoch}, step {update_idx}')
            total = loss_sum.item()
            interval_loss = (total - last_logged_sum) / max(1, loss_count - last_logged_count)
            last_logged_sum, last_logged_count = total, loss_count
            if args.rank == 0:
                log_train_step(epoch, update_idx, updates_per_epoch, interval_loss, batch_time_m.val,
                               samples * args.world_size / batch_time_m.val, schedule_lr(optimizer), end - start)
    avg = loss_sum.item() / max(1, loss_count)
    if args.distributed:
        avg = utils.reduce_tensor(torch.tensor(avg, device=device), args.world_size).item()
    return OrderedDict(loss=avg)


def train_one_epoch_graphed(epoch: int, graphed, args, lr_scheduler=None) -> Dict[str, float]:
    """One epoch of the graph-safe step (``--cuda-graph``, a :class:`~timm_cmo.train_step.GraphedTrainStep`): what
    :func:`train_one_epoch` computes, each step one graph replay (on the CPU: the same step run eagerly). The
    losses stay on the device and are read at the log points only; the scheduler and the EMA count steps as
    there."""
    steps = graphed.begin_epoch()
    num_updates = epoch * steps
    batch_time_m = utils.AverageMeter()
    last_logged_sum, last_logged_count = 0., 0
    start = end = time.time()
    for step_idx in range(steps):
        samples = graphed.run(step_idx, num_updates)
        num_updates += 1
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
        batch_time_m.update(time.time() - end)
        end = time.time()
        if step_idx == steps - 1 or step_idx % args.log_interval == 0:
            total = float(graphed.loss_sum)  # host sync only at log points
            if not math.isfinite(total):
                raise NonFiniteLossError(f'non-finite loss in epoch {epoch}, step {step_idx}')
            interval_loss = (total - last_logged_sum) / max(1, step_idx + 1 - last_logged_count)
            last_logged_sum, last_logged_count = total, step_idx + 1
            if args.rank == 0:
                log_train_step(epoch, step_idx, steps, interval_loss, batch_time_m.val,
                               samples / max(batch_time_m.val, 1e-9), schedule_lr(graphed.optimizer), end - start)
    return OrderedDict(loss=float(graphed.loss_sum) / max(1, steps))


def build_graphed_step(args, model: nn.Module, loss_fn: nn.Module, optimizer, train_loader, model_ema):
    """``--cuda-graph``: the graph-safe training step (CUDA graphs on a GPU, the eager stand-in on the CPU)."""
    from timm_cmo.train_step import GraphedTrainStep
    try:
        graphed = GraphedTrainStep(model, loss_fn, optimizer, train_loader, model_ema=model_ema,
                                   autocast_dtype=torch.bfloat16 if args.amp else None, clip_grad=args.clip_grad,
                                   clip_mode=args.clip_mode)
    except ValueError as e:
        error(f'--cuda-graph: {e}')
    if args.rank == 0:
        _logger.info('--cuda-graph: the graph-safe training step, ' + (
            'captured as CUDA graphs (one per batch size)' if graphed.capture else
            f'run eagerly on {graphed.device} (CUDA graphs need a CUDA device)'))
    return graphed


@torch.no_grad()
def evaluate(model: nn.Module, loader, args, device, amp_autocast=suppress, num_classes: int = 0,
             num_samples: Optional[int] = None, label: str = 'Eval', graphed=None) -> ClassAccuracy:
    """Per-class accuracy and calibration over the evaluation set; padded duplicates of distributed loaders
    excluded. A cosine-normalised head's logits are scaled by ``--ldam-s`` for the calibration (as the loss
    scales them in training). ``graphed`` (``--cuda-graph``): evaluated by the graphed step, in fixed-size batches
    with the padding masked out."""
    model.eval()
    logit_scale = args.ldam_s if timm_cmo.models.is_head_norm(model) else 1.
    if graphed is not None:
        return graphed.evaluate(model, loader, num_classes, logit_scale)
    acc = ClassAccuracy(num_classes, device=device, logit_scale=logit_scale)
    inner = getattr(model, '_orig_mod', model)
    routed = getattr(inner, 'router', None) is not None  # RIDE with expert assignment: count the experts used
    experts = torch.zeros(2, dtype=torch.float64, device=device)
    seen = 0
    num_batches = len(loader)
    start = time.time()
    for batch_idx, (input, target) in enumerate(loader):
        input = input.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            if routed:
                output, used = inner.forward_with_experts_used(input)
            else:
                output = model(input)
        valid = None
        if args.distributed and num_samples is not None:
            # OrderedDistributedSampler gives rank r the samples r, r + W, ... of a padded list
            pos = args.rank + args.world_size * (seen + torch.arange(target.shape[0], device=device))
            valid = pos < num_samples
        acc.update(output.float(), target, valid)
        if routed:
            keep = valid if valid is not None else torch.ones_like(used, dtype=torch.bool)
            experts += torch.stack([(used * keep).sum(), keep.sum()]).double()
        seen += target.shape[0]
        if args.rank == 0 and batch_idx % args.log_interval == 0 and batch_idx + 1 < num_batches:
            elapsed = time.time() - start
            _logger.info(f'{label}: [{batch_idx:>4d}/{num_batches}]  '
                         f'ETA: {format_seconds(elapsed / (batch_idx + 1) * (num_batches - batch_idx - 1))}')
    acc.all_reduce()
    acc.experts_used = None
    if routed:
        if args.distributed:
            dist.all_reduce(experts)
        acc.experts_used = float(experts[0] / experts[1].clamp_min(1))
    return acc


def eval_summary(acc: ClassAccuracy, class_counts) -> Dict[str, Any]:
    """The metrics of an evaluation (:meth:`ClassAccuracy.summary`), with the mean number of experts a routed
    RIDE model used per image."""
    summary = acc.summary(class_counts)
    if getattr(acc, 'experts_used', None) is not None:
        summary['experts_used'] = acc.experts_used
    return summary


def compile_model(model: nn.Module, backend: str, input_size, device, mode: Optional[str] = None) -> nn.Module:
    """``torch.compile(model, backend=backend, mode=mode)``, or the eager model (with a warning) where compiling fails.

    Compilation is lazy, so one eval-mode call on a dummy batch (the graph evaluation uses) checks
    that the backend works here before training starts.
    """
    try:
        compiled = torch.compile(model, backend=backend, mode=mode)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            compiled(torch.zeros((2, *input_size), device=device))
        model.train(was_training)
        return compiled
    except Exception as e:  # no compiler toolchain, unsupported platform or backend
        model.train()
        _logger.warning(f'torch.compile (backend {backend!r}{f", mode {mode!r}" if mode else ""}) is unavailable here, '
                        f'training eagerly: '
                        f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}')
        return model


def resolve_output_dir(args) -> str:
    """The run folder (not created): ``--output``/``--experiment``, or the folder of ``--resume``."""
    if args.resume and not args.experiment:
        return os.path.dirname(os.path.abspath(args.resume))
    exp_name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), 'cmo' if args.cmo else 'base'])
    return os.path.join(args.output or './output/train', exp_name)


def check_output_dir(args, output_dir: str) -> bool:
    """Refuse to start a new run in a non-empty run folder (unless ``--overwrite``); True when resuming into it."""
    resuming_here = bool(args.resume) and os.path.dirname(os.path.abspath(args.resume)) == os.path.abspath(output_dir)
    if resuming_here or not os.path.isdir(output_dir):
        return resuming_here
    files = sorted(f for f in os.listdir(output_dir) if not f.startswith('.'))
    if files and not args.overwrite:
        error(f'the run folder {output_dir} already holds a run ({", ".join(files[:4])}'
              f'{", ..." if len(files) > 4 else ""}): resume it with --resume {os.path.join(output_dir, LAST)}, '
              f'pick another --experiment, or pass --overwrite to replace it')
    return False


def build_datasets(args):
    """``(train_ds, eval_ds, tune_ds)``: the (long-tailed) training split, less a ``--tune-fraction`` held out of
    it; the evaluation split; the validation data of ``--post-hoc`` (None without it)."""
    common = dict(download=args.dataset_download)
    if args.class_map:
        common['class_map'] = args.class_map
    train_kwargs = dict(split=args.train_split, imb_ratio=args.imb_ratio, imb_seed=args.imb_seed, imb_max=args.imb_max,
                        list_file=args.train_list, is_train=True, fast_decode=args.fast_decode, **common)
    train_ds = create_lt_dataset(args.dataset, args.data_dir, **train_kwargs)
    eval_ds = create_lt_dataset(
        args.dataset, args.data_dir, split=args.val_split, list_file=args.val_list,
        num_classes=train_ds.num_classes, is_train=False, fast_decode=args.fast_decode, **common)
    tune_ds = None
    if args.tune_fraction is not None:
        # the held-out images get their own copy of the source (its own transform: evaluation, not training)
        kept, held = stratified_holdout(train_ds.targets, args.tune_fraction, train_ds.num_classes, seed=args.tune_seed)
        copy = create_lt_dataset(args.dataset, args.data_dir, **train_kwargs)
        tune_ds = _view(copy, copy.indices[held], train_ds)
        train_ds = _view(train_ds, train_ds.indices[kept], train_ds)
    elif args.tune_holdout_per_class is not None and args.post_hoc is not None:
        if args.imb_ratio is None and args.imb_max is None:
            raise ValueError('--tune-holdout-per-class draws from the training images the long-tailed subsampling left '
                             'out: give the --imb-ratio / --imb-max (and --imb-seed) the model was trained with')
        source = create_lt_dataset(args.dataset, args.data_dir, **dict(train_kwargs, imb_ratio=None, imb_max=None))
        held = leftover_holdout_indices(dataset_targets(source.dataset), train_ds.indices, args.tune_holdout_per_class,
                                        train_ds.num_classes, seed=args.tune_seed)
        tune_ds = _view(source, held, train_ds)
    elif args.tune_list is not None and args.post_hoc is not None:
        tune_ds = create_lt_dataset(args.dataset, args.data_dir, split='tune', list_file=args.tune_list,
                                    num_classes=train_ds.num_classes, is_train=False, fast_decode=args.fast_decode, **common)
    elif args.tune_split is not None and args.post_hoc is not None:
        if args.dataset.lower().startswith('torch/'):
            raise ValueError(f'{args.dataset} has only the train and test splits: hold validation data out with '
                             f'--tune-holdout-per-class or --tune-fraction')
        tune_ds = create_lt_dataset(args.dataset, args.data_dir, split=args.tune_split,
                                    num_classes=train_ds.num_classes, is_train=False, fast_decode=args.fast_decode, **common)
    return train_ds, eval_ds, tune_ds


def _view(ds: LongTailDataset, source_indices, like: LongTailDataset) -> LongTailDataset:
    """The samples ``source_indices`` of ``ds``'s source, with ``like``'s classes."""
    return LongTailDataset(ds.dataset, indices=source_indices, num_classes=like.num_classes, classes=like.classes,
                           fast_decode=ds.fast_decode)


def build_device_loaders(args, train_ds, eval_ds, data_config, device, num_classes):
    """``--data-on-device``: decode both splits once into device memory; augment and mix there."""
    from timm_cmo.data.device_loader import DeviceEvalLoader, DeviceLoader, decode_to_tensor
    img_size = tuple(data_config['input_size'][1:])
    mean, std = data_config['mean'], data_config['std']
    img_dtype = torch.float32
    try:
        images, targets = decode_to_tensor(train_ds, img_size, device, num_workers=args.workers)
    except CorruptImageError as e:
        error(str(e).strip().splitlines()[-1].split('CorruptImageError: ')[-1])
    train_loader = DeviceLoader(
        images, targets, args.batch_size, mean, std, padding=args.crop_padding, hflip=args.hflip,
        num_classes=num_classes, label_smoothing=args.smoothing,
        cmo=CMOConfig.from_flags(**vars(args)) if args.cmo else None,
        epochs=args.epochs, seed=args.seed, drop_last=args.drop_last, ros_r=args.ros_r if args.ros else None,
        dual_r=args.bbn_r if trains_on_dual(args) else None,
        channels_last=args.channels_last, img_dtype=img_dtype, re_prob=args.reprob, re_mode=args.remode,
        re_count=args.recount,
        remix=RemixMixup(num_classes, train_ds.class_counts, label_smoothing=args.smoothing, **remix_kwargs(args))
        if args.remix else None,
        mixup=MixupCutmix(num_classes, label_smoothing=args.smoothing, **mixup_kwargs(args))
        if mixup_active(args) else None)
    eval_images, eval_targets = decode_to_tensor(eval_ds, img_size, device, num_workers=args.workers)
    eval_loader = DeviceEvalLoader(
        eval_images, eval_targets, args.validation_batch_size or args.batch_size, mean, std,
        channels_last=args.channels_last, img_dtype=img_dtype)
    return train_loader, eval_loader


def build_train_loader(args, train_ds, data_config, device, num_classes):
    """The ordinary training loader: timm's transforms, the epoch plan, CMO / ROS."""
    return create_cmo_loader(
        train_ds,
        input_size=data_config['input_size'],
        batch_size=args.batch_size,
        is_training=True,
        num_classes=num_classes,
        label_smoothing=args.smoothing,
        cmo=args.cmo,
        **{k: v for k, v in vars(args).items() if k.startswith('cmo_')},
        epochs=args.epochs,
        seed=args.seed,
        train_crop_mode=args.train_crop_mode,
        crop_padding=args.crop_padding,
        drop_last=args.drop_last,
        ros_r=args.ros_r if args.ros else None,
        dual_r=args.bbn_r if trains_on_dual(args) else None,
        remix=args.remix,
        **{f'remix_{k}': v for k, v in remix_kwargs(args).items()},
        **({flag: getattr(args, flag) for flag in MIXUP_FLAGS.values()} if mixup_active(args) else {}),
        no_aug=args.no_aug,
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
        scale=args.scale,
        ratio=args.ratio,
        hflip=args.hflip,
        vflip=args.vflip,
        color_jitter=args.color_jitter or None,
        auto_augment=args.aa,
        interpolation=args.train_interpolation,
        mean=data_config['mean'],
        std=data_config['std'],
        num_workers=args.workers,
        distributed=args.distributed,
        pin_memory=args.pin_mem,
        device=device,
        use_prefetcher=not args.no_prefetcher,
    )


def cpu_name() -> str:
    threads = torch.get_num_threads()
    return f'{cpu_model()}, {os.cpu_count()} cores, {threads} torch thread{"" if threads == 1 else "s"}'


def run_record(run_config: Dict[str, Any], train_ds) -> Dict[str, Any]:
    """What a checkpoint records of its run: the training-defining flags and the training class counts."""
    return dict(config=run_config, class_counts=[int(n) for n in train_ds.class_counts],
                num_classes=int(train_ds.num_classes))


def open_resume(args) -> Tuple[str, Dict[str, Any]]:
    """Find and read the ``--resume`` checkpoint, or exit naming the file and the problem (nothing written yet)."""
    try:
        path, ckpt = find_resume_checkpoint(args.resume)
    except (FileNotFoundError, CheckpointError) as e:
        error(f'--resume: {e}')
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('state_dict'), dict):
        found = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        error(f'--resume: {path} is not a training checkpoint (no state_dict; it holds {found})')
    if not args.evaluate and (not isinstance(ckpt.get('epoch'), int) or isinstance(ckpt.get('epoch'), bool)):
        error(f'--resume: {path} records no epoch, so it is not a checkpoint of a run to continue; to start a new '
              f'run from its weights use --initial-checkpoint {path}')
    return path, ckpt


def recorded_config(args, resume: Tuple[str, Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The run configuration the ``--resume`` checkpoint records, if its run trained the same ``--model``."""
    recorded = resume[1].get('run')
    config = recorded.get('config') if isinstance(recorded, dict) else None
    return config if isinstance(config, dict) and config.get('model') == args.model else None


def recorded_model_kwargs(args, resume: Tuple[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The factory arguments the ``--resume`` checkpoint's run built its model with (its ``--model-kwargs``, and
    the router of a ``--stage2 router`` run), so ``--evaluate`` rebuilds that model; {} for another model."""
    config = recorded_config(args, resume)
    if config is None:
        return {}
    kwargs = dict(config.get('model_kwargs') or {})
    if config.get('stage2') in list_stage2():
        kwargs.update(get_stage2(config['stage2']).model_kwargs)
    return kwargs


def adopt_recorded_input(args, resume: Tuple[str, Dict[str, Any]]) -> None:
    """``--evaluate`` of a checkpoint whose run set the input channels (``--in-chans 1``): take its
    ``--in-chans`` / ``--input-size`` / ``--input-img-mode`` unless this command sets the channels."""
    config = recorded_config(args, resume)
    if config is None or input_channels(vars(args), default=None) is not None:
        return
    for key in ('in_chans', 'input_size', 'input_img_mode'):
        if config.get(key) is not None and getattr(args, key) is None:
            setattr(args, key, config[key])


def check_resume_config(args, run_config: Dict[str, Any], resume: Tuple[str, Dict[str, Any]], train_ds) -> None:
    """Refuse a resume whose data, model, loss, schedule or seed differ from the checkpoint's run, naming them."""
    path, ckpt = resume
    recorded = ckpt.get('run')
    if not isinstance(recorded, dict) or not isinstance(recorded.get('config'), dict):
        _logger.warning(f'{path} records no run configuration (an older checkpoint): the resumed settings are not '
                        f'checked against it.')
        return
    before = recorded['config']
    diffs = [f'--{k.replace("_", "-")} {before[k]!r} -> {run_config[k]!r}'
             for k in sorted(set(before) & set(run_config)) if before[k] != run_config[k]]
    counts = [int(n) for n in train_ds.class_counts]
    if recorded.get('class_counts') is not None and list(recorded['class_counts']) != counts:
        old = recorded['class_counts']
        diffs.append(f'training images per class {_brief(old)} ({sum(old)} images) -> {_brief(counts)} '
                     f'({sum(counts)} images)')
    if not diffs:
        return
    message = f'{path} was trained with other settings: {"; ".join(diffs)}'
    if not args.allow_config_change:
        error(f'--resume: {message}. Pass --allow-config-change to resume with the new ones.')
    _logger.warning(f'--allow-config-change: {message}. Continuing with the new settings.')


def _brief(values: List[int], n: int = 6) -> str:
    return '[' + ', '.join(map(str, values[:n])) + (', ...]' if len(values) > n else ']')


def _loss_class(name: str):
    from timm_cmo.losses.registry import _loss_entrypoints
    return _loss_entrypoints.get(name)


def load_initial_checkpoint(model: nn.Module, args) -> None:
    """``--initial-checkpoint``: a run's or the paper's weights (``weights_only``), checked key by key; a second
    stage keeps the parts it adds (the router) fresh."""
    path = args.initial_checkpoint
    try:
        ckpt = load_checkpoint_file(path)
    except (FileNotFoundError, CheckpointError) as e:
        error(f'--initial-checkpoint: {e}')
    keys = ('state_dict_ema',) if args.model_ema and isinstance(ckpt, dict) and 'state_dict_ema' in ckpt and \
        args.stage2 is None else ('state_dict', 'model', 'state_dict_ema')
    load_model_weights(model, ckpt, path, keys=keys, flag='--initial-checkpoint',
                       fresh=get_stage2(args.stage2).fresh if args.stage2 else ())


def load_pretrained_path(model: nn.Module, args) -> None:
    """``--pretrained-path``: a local checkpoint's or safetensors file's weights (``weights_only``), a classifier
    for another class count replaced by a new one, every other key checked."""
    path = args.pretrained_path
    try:
        state_dict = load_weights_file(path)
    except (FileNotFoundError, CheckpointError) as e:
        error(f'--pretrained-path: {e}')
    state_dict, fresh, notes = adapt_pretrained_state_dict(model, state_dict, input_channels(vars(args), default=None))
    load_model_weights(model, {'state_dict': state_dict}, path, keys=('state_dict',), flag='--pretrained-path',
                       fresh=fresh)
    if args.rank == 0:
        _logger.info(f'Loaded the pretrained weights of {path}' + (f' ({"; ".join(notes)})' if notes else ''))


def prepare_stage2(model: nn.Module, args) -> Optional[List[Any]]:
    """Freeze what the ``--stage2`` entry keeps and return the optimizer's parameter groups (None: no second
    stage, the whole model trains)."""
    if args.stage2 is None:
        return None
    stage = get_stage2(args.stage2)
    try:
        return stage.prepare(model, **stage.kwargs(vars(args)))
    except (ValueError, TypeError) as e:  # e.g. a multi-expert model's heads for a single-classifier stage
        error(f'--stage2 {args.stage2} on --model {args.model}: {e}')


def stage2_train_mode(args):
    """What replaces ``model.train()`` in each epoch of the ``--stage2`` entry (None: ``model.train()``)."""
    stage = get_stage2(args.stage2) if args.stage2 else None
    if stage is None or stage.train_mode is None:
        return None
    return partial(stage.train_mode, **stage.kwargs(vars(args)))


def create_run_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    """timm's optimizer for the flags: a second stage's parameter groups, else the model's, with ``--layer-decay``
    timm's layer-wise groups (each with its ``lr_scale``, which timm's schedulers apply)."""
    params = prepare_stage2(model, args)
    return create_optimizer_v2(model if params is None else params, **optimizer_kwargs(cfg=args),
                               filter_bias_and_bn=not args.wd_bias_bn)


def schedule_lr(optimizer) -> float:
    """The schedule's learning rate: the first parameter group's lr over its ``--layer-decay`` scale."""
    group = optimizer.param_groups[0]
    return group['lr'] / group.get('lr_scale', 1.)


def load_model_weights(model: nn.Module, ckpt: Dict[str, Any], path: str, use_ema: bool = False,
                       keys: Optional[Tuple[str, ...]] = None, flag: str = '--resume', fresh: Tuple[str, ...] = ()) -> None:
    """Load a checkpoint's (EMA) weights strictly, or exit naming the missing, unexpected and mismatched keys.

    Keys starting with a ``fresh`` prefix may be missing (the model keeps its own); a LAS weight scaling in the
    checkpoint is folded into the classifier when the model has none.
    """
    keys = keys or (('state_dict_ema',) if use_ema else ('state_dict',))
    try:
        state_dict, _ = state_dict_from_checkpoint(ckpt, path, keys=keys)
    except CheckpointError as e:
        error(f'{flag}: {e}' + (' (train with --model-ema for EMA weights)' if use_ema else ''))
    match_weight_scaling(model, state_dict)  # a cosine head's weight scaling is a parameter of the head
    own = model.state_dict()
    if hasattr(model, 'num_experts'):
        from timm_cmo.models import ride_checkpoint_filter_fn
        state_dict = ride_checkpoint_filter_fn(state_dict, model, lenient=False)
    state_dict = fold_weight_scaling_state_dict(state_dict, keep=set(own))
    state_dict.update({k: v for k, v in own.items() if k.startswith(fresh) and k not in state_dict} if fresh else {})
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f'{k} {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model'
              for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append('shape mismatch: ' + '; '.join(shapes[:5]) + (' ...' if len(shapes) > 5 else ''))
        if missing:
            parts.append(f'missing keys ({len(missing)}): {", ".join(missing[:8])}' + (' ...' if len(missing) > 8 else ''))
        if unexpected:
            parts.append(f'unexpected keys ({len(unexpected)}): {", ".join(unexpected[:8])}'
                         + (' ...' if len(unexpected) > 8 else ''))
        error(f'{flag}: {path} does not fit {_model_desc(model)}'
              + (f' (it was saved from --model {ckpt["arch"]})' if isinstance(ckpt, dict) and ckpt.get('arch') else '')
              + ': ' + ' | '.join(parts))
    model.load_state_dict(state_dict, strict=True)


def _model_desc(model: nn.Module) -> str:
    head = (', head_norm' if timm_cmo.models.is_head_norm(model) else
            ', causal_norm' if is_causal_norm(model) else '')
    return f'{type(model).__name__}({getattr(model, "num_classes", "?")} classes{head})'


def restore_training_state(resume, model, optimizer, loss_scaler, model_ema, args) -> int:
    """Load weights, optimizer, AMP scaler and EMA of ``--resume``; return the epoch to start from.

    The optimizer keeps the checkpoint's per-parameter state (momentum) and takes its hyper-parameters
    (lr, weight decay, ...) from this run's flags, so an allowed lr change applies.
    """
    path, ckpt = resume
    load_model_weights(model, ckpt, path)
    if not args.no_resume_opt:
        if not isinstance(ckpt.get('optimizer'), dict):
            error(f'--resume: {path} has no optimizer state (pass --no-resume-opt to continue without it)')
        fresh = [{k: v for k, v in g.items() if k != 'params'} for g in optimizer.param_groups]
        try:
            optimizer.load_state_dict(ckpt['optimizer'])
        except (ValueError, KeyError) as e:
            error(f'--resume: the optimizer state of {path} does not fit --opt {args.opt}: {e}')
        for group, hyper in zip(optimizer.param_groups, fresh):
            group.pop('initial_lr', None)
            group.update(hyper)
        if loss_scaler is not None and loss_scaler.state_dict_key in ckpt:
            loss_scaler.load_state_dict(ckpt[loss_scaler.state_dict_key])
    if model_ema is not None:
        if isinstance(ckpt.get('state_dict_ema'), dict):
            load_model_weights(model_ema.module, ckpt, path, use_ema=True)
        else:
            _logger.warning(f'{path} has no EMA weights: the EMA restarts from the model weights.')
            model_ema.set(model)
    if args.rank == 0:
        _logger.info(f'Loaded checkpoint {path} (epoch {ckpt["epoch"]})')
    return int(ckpt['epoch']) + 1


def describe_run(args, train_ds, epoch: int, best: Dict[str, Any], model: nn.Module,
                 counts_source: Optional[str] = 'training split', epochs_min: Optional[float] = None) -> Dict[str, Any]:
    """The ``extra`` of results.json: what was trained on what, how, and how it was launched. Resources:
    ``wall_min`` of this process, ``epochs_min`` the epochs' times summed over every start of a resumed run."""
    from timm_cmo.hub import model_build
    return dict(
        model=args.model,
        model_build=model_build(model),
        dataset=dict(
            name=args.dataset, data_dir=args.data_dir, train_list=args.train_list, val_list=args.val_list,
            imb_ratio=args.imb_ratio, imb_max=args.imb_max, imb_seed=args.imb_seed,
            tune_fraction=args.tune_fraction, tune_seed=args.tune_seed if args.tune_fraction is not None else None,
            num_classes=train_ds.num_classes,
            train_images=int(sum(train_ds.class_counts)) if train_ds.class_counts is not None else None,
            class_counts=[int(n) for n in train_ds.class_counts] if train_ds.class_counts is not None else None,
            class_counts_from=counts_source),
        method=dict(
            loss=args.loss, reweight=args.reweight,
            drw_epoch=resolve_drw_epoch(args.drw_epoch, args.epochs) if args.reweight == 'drw' else None,
            cmo=args.cmo, cmo_r=args.cmo_r,
            cmo_effective=args.cmo_effective, cmo_prob=args.cmo_prob, cmo_beta=args.cmo_beta,
            cmo_start_epoch=args.cmo_start_epoch, cmo_end_epochs=args.cmo_end_epochs,
            cmo_mode=args.cmo_mode, cmo_variant=args.cmo_variant, head_norm=args.head_norm, stage2=args.stage2,
            head='causal' if is_causal_norm(model) else 'linear', causal=causal_settings(model),
            ros=args.ros, ros_r=args.ros_r if args.ros else None,
            remix=args.remix, **({f'remix_{k}': v for k, v in remix_kwargs(args).items()} if args.remix else {}),
            bbn=dict(r=args.bbn_r, alpha_epochs=args.bbn_alpha_epochs or args.epochs) if trains_on_dual(args) else None,
            **({flag: getattr(args, flag) for flag in MIXUP_FLAGS.values()} if mixup_active(args) else {}),
            **method_epochs(args)),
        epoch=epoch,
        epochs=args.epochs,
        best=best,
        paper_top1=args.paper_top1,
        command=' '.join(shlex.quote(a) for a in [os.path.basename(sys.argv[0])] + sys.argv[1:]),
        config=vars(args),
        versions=dict(timm_cmo=timm_cmo.__version__, timm=timm.__version__, torch=torch.__version__),
        resources=dict(
            wall_min=round((time.time() - _START) / 60, 1),
            epochs_min=None if epochs_min is None else round(epochs_min, 1),
            peak_rss_mib=round(peak_rss_mib()),
            peak_cuda_mib=round(torch.cuda.max_memory_allocated() / 2 ** 20) if torch.cuda.is_available() else None,
            device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu_name()),
        date=datetime.now().isoformat(timespec='seconds'),
    )


def causal_settings(model: nn.Module) -> Optional[Dict[str, Any]]:
    """The Causal Norm head's hyper-parameters as the model holds them (None without such a head)."""
    heads = [m for m in model.modules() if isinstance(m, CausalNormClassifier)]
    if not heads:
        return None
    h = heads[0]
    return dict(heads=h.heads, tau=h.tau, gamma=h.gamma, alpha=h.alpha, momentum=h.momentum, lr_scale=h.lr_scale)


def _metrics_line(metrics: Dict[str, Any]) -> str:
    return '  '.join(f'{k} {metrics[k]:.2f}' for k in ('top1', 'top5', 'many', 'medium', 'few', 'head', 'middle', 'tail',
                                                      'ece', 'nll', 'experts_used')
                     if isinstance(metrics.get(k), (int, float)))


def _attach_run_log(output_dir: str) -> None:
    """Log to ``<run>/train.log`` (replacing the log of an earlier run of this process)."""
    _detach_run_log()
    fh = logging.FileHandler(os.path.join(output_dir, 'train.log'))
    fh.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
    fh.train_cmo_run_log = True
    logging.getLogger().addHandler(fh)


_RUN_LOGGERS: List[RunLoggers] = []  # the experiment loggers of the run in progress (closed by main)


def _close_run_loggers() -> None:
    while _RUN_LOGGERS:
        _RUN_LOGGERS.pop().close()


def _detach_run_log() -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, 'train_cmo_run_log', False)]:
        root.removeHandler(handler)
        handler.close()


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train (or ``--evaluate``) as the flags say; returns the final metrics and the result file paths."""
    if not logging.getLogger().handlers:  # a second call in the same process keeps the first's console log
        utils.setup_default_logging()
    try:
        return _main(argv)
    finally:
        _close_run_loggers()
        _detach_run_log()


def _main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args, args_text = parse_args(argv)
    run_config = {k: v for k, v in vars(args).items() if k not in RESUME_MAY_CHANGE}
    if args.tune_fraction is None:  # the seed of a held-out fraction shapes the training set only with one
        run_config.pop('tune_seed')
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = utils.init_distributed_device(args)
    if args.distributed:
        _logger.info(f'Process {args.rank} of {args.world_size} on {device}.')
        if args.cuda_graph and not args.evaluate:
            error(f'--cuda-graph runs the step in one process; {args.world_size} were started')
    utils.random_seed(args.seed, args.rank)

    amp_autocast = suppress
    loss_scaler = None
    if args.amp:
        amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        if device.type == 'cuda' and amp_dtype == torch.float16:
            loss_scaler = utils.NativeScaler(device=device.type)

    # everything that can fail on bad input is checked before the first file is written
    resume = open_resume(args) if args.resume else None
    if args.evaluate and resume is not None:
        adopt_recorded_input(args, resume)
    train_ds, eval_ds, tune_ds = (None, None, None)
    if args.data_dir:
        try:
            train_ds, eval_ds, tune_ds = build_datasets(args)
        except (OSError, ValueError) as e:  # a missing folder or list file, a bad list line, an empty class
            error(f'--data-dir {args.data_dir}: {e}')
    num_classes = args.num_classes or (train_ds.num_classes if train_ds is not None else None)
    if train_ds is not None and num_classes != train_ds.num_classes:
        error(f'--num-classes {num_classes} disagrees with the dataset ({train_ds.num_classes} classes)')
    if train_ds is not None and not args.evaluate and args.drop_last:
        per_process = -(-len(train_ds) // args.world_size)  # the distributed sampler's share
        if per_process < args.batch_size:
            error(f'--batch-size {args.batch_size}: {per_process} training images'
                  f'{" per process" if args.world_size > 1 else ""} make no full batch and the incomplete one is '
                  f'dropped (--drop-last), so no epoch would take a step: use a smaller --batch-size or --no-drop-last')

    model_kwargs = dict(args.model_kwargs, **(get_stage2(args.stage2).model_kwargs if args.stage2 else {}))
    if args.evaluate and resume is not None:
        model_kwargs = dict(recorded_model_kwargs(args, resume), **model_kwargs)
    try:
        model = create_model(
            args.model,
            pretrained=args.pretrained and not args.pretrained_path,
            in_chans=input_channels(vars(args), default=None),
            num_classes=num_classes,
            drop_rate=args.drop,
            drop_path_rate=args.drop_path,
            global_pool=args.gp,
            head_norm=True if args.head_norm else None,
            **causal_model_kwargs(args),
            **model_kwargs,
        )
    except TypeError as e:
        if 'causal_' in str(e):
            error(f'--head causal: --model {args.model} has no Causal Norm option. It is an option of models that '
                  f'split forward_features / forward_head(x, pre_logits) with one classifier on the pooled '
                  f'features, patched by timm_cmo: the CIFAR ResNets (resnet*_cifar) and timm\'s ResNets (resnet50, '
                  f'resnext50_32x4d, wide_resnet50_2, ...); multi-expert RIDE models are not ({e})')
        error(f'--model {args.model}{" --model-kwargs " + str(model_kwargs) if model_kwargs else ""}: {e}')
    except ValueError as e:
        error(f'--model {args.model}{" --model-kwargs " + str(model_kwargs) if model_kwargs else ""}: {e}')
    except Exception as e:  # no network / offline with an empty HF cache: one line, not the Hub's traceback
        if not is_fetch_error(e):
            raise
        error(fetch_error_message(args.model, e, pretrained=args.pretrained and not args.pretrained_path))
    if (args.head == 'causal' or causal_model_kwargs(args)) and not is_causal_norm(model):
        error(f'--head causal / --causal-*: --model {args.model} was built without a Causal Norm classifier (it '
              f'has none, ignores the causal_norm argument, or has no classifier)')
    num_classes = model.num_classes
    args.num_classes = num_classes
    multi_expert = callable(getattr(model, 'set_expert_training', None))
    if getattr(_loss_class(args.loss), 'needs_experts', False) and not multi_expert:
        bad_loss = f'--loss {args.loss} needs a multi-expert model (e.g. ride_resnet32_cifar)'
        error(f'{bad_loss}; --model {args.model} has a single classifier')
    check_dual_training(args, model)
    if args.stage2 and get_stage2(args.stage2).multi_expert and not multi_expert:
        error(f'--stage2 {args.stage2} trains {get_stage2(args.stage2).trains} of a RIDE model; --model {args.model} '
              f'has none')
    needs_features = getattr(_loss_class(args.loss), 'needs_features', False)
    if needs_features:
        try:
            check_feature_split(model)
        except ValueError as e:
            error(f'--loss {args.loss} weighs each sample by its penultimate feature; --model {args.model}: {e}')
    if args.loss == 'ldam' and is_causal_norm(model) and args.rank == 0:
        _logger.warning('LDAM scales cosine logits by --ldam-s; the Causal Norm head\'s logits are already scaled by '
                        'its tau: --loss ce is the paper\'s.')
    elif args.loss == 'ldam' and not args.head_norm and not timm_cmo.models.is_head_norm(model) and args.rank == 0:
        _logger.warning('LDAM is meant for a cosine-normalised head: consider --head-norm.')
    if args.pretrained_path and resume is None:  # a resumed run has its weights in the checkpoint
        load_pretrained_path(model, args)
    if args.initial_checkpoint:
        load_initial_checkpoint(model, args)
    data_config = resolve_run_data_config(vars(args), model=model, verbose=args.rank == 0)
    try:
        img_mode = input_img_mode(args.input_img_mode, data_config['input_size'][0])
    except ValueError as e:  # e.g. a two-channel Hub model
        error(f'--model {args.model}: {e}')
    for ds in (train_ds, eval_ds, tune_ds):
        if ds is not None:
            ds.input_img_mode = img_mode
    if args.evaluate:
        counts, counts_source = training_counts(args, train_ds, resume, num_classes)
    else:
        counts, counts_source = list(train_ds.class_counts), 'training split'
    eval_ds, test_prior = apply_test_prior(args, eval_ds, counts, num_classes)
    if args.evaluate:
        check_tune_data(args, resume, train_ds, tune_ds)

    model.to(device=device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    if args.evaluate:
        return run_evaluate(args, model, eval_ds, train_ds, tune_ds, data_config, device, amp_autocast, num_classes,
                            resume, counts, counts_source, records=dict(test_prior=test_prior) if test_prior else {})

    if resume is not None:
        check_resume_config(args, run_config, resume, train_ds)
    loss_kwargs = {dst: getattr(args, src) for src, dst in LOSS_KWARGS.get(args.loss, {}).items()}
    try:
        loss_fn = create_loss(
            args.loss, train_ds.class_counts, reweight=args.reweight, drw_epoch=args.drw_epoch, epochs=args.epochs,
            cb_beta=args.cb_beta, **loss_kwargs).to(device)
    except ValueError as e:  # e.g. a class without training images under a loss that needs every count
        error(f'--loss {args.loss}: {e}')
    if getattr(loss_fn, 'needs_experts', False):  # ride, ride_ea (--stage2 router): every expert's logits in training
        model.set_expert_training(True)
    output_dir = None
    resuming_here = False
    if args.rank == 0:
        output_dir = resolve_output_dir(args)
        resuming_here = check_output_dir(args, output_dir)

    optimizer = create_run_optimizer(model, args)
    model_ema = utils.ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    start_epoch = 0
    if resume is not None:
        start_epoch = restore_training_state(resume, model, optimizer, loss_scaler, model_ema, args)
    if args.start_epoch is not None:
        start_epoch = args.start_epoch

    if args.rank == 0:
        created = not os.path.exists(output_dir)
        try:  # before the first file of the run: a logger that cannot start stops it here
            _RUN_LOGGERS.append(start_loggers(args, output_dir, start_epoch))
        except LoggerStartError as e:
            if created and os.path.isdir(output_dir):
                shutil.rmtree(output_dir, ignore_errors=True)
            error(str(e))
        os.makedirs(output_dir, exist_ok=True)
        removed = remove_stale_temporaries(output_dir)
        args_path = os.path.join(output_dir, 'args.yaml')
        if not (resuming_here and os.path.exists(args_path)):  # a resumed run keeps its original record
            write_text_atomic(args_path, args_text)
        _attach_run_log(output_dir)
        _logger.info(f'Output folder: {output_dir}')
        if resume is not None:
            _logger.info(f'Resuming from {resume[0]} at epoch {start_epoch}: '
                         f'{" ".join(shlex.quote(a) for a in sys.argv)}')
        for tmp in removed:
            _logger.info(f'Removed the partial file {tmp} of an interrupted save.')
        warn_inactive_methods(args)
    if args.distributed and args.sync_bn:
        if device.type != 'cuda':
            error('--sync-bn needs CUDA devices; on CPU use --dist-bn reduce')
        model = convert_sync_batchnorm(model)

    feature_model = WithFeatures(model) if needs_features else None  # forward -> (logits, features) for the loss
    if args.torchcompile:
        model = compile_model(model, args.torchcompile, data_config['input_size'], device, args.torchcompile_mode)
        if feature_model is not None:
            feature_model = compile_model(feature_model, args.torchcompile, data_config['input_size'], device,
                                          args.torchcompile_mode)
    train_model = model if feature_model is None else feature_model
    if args.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == 'cuda' else None)

    if args.data_on_device:
        train_loader, eval_loader = build_device_loaders(args, train_ds, eval_ds, data_config, device, num_classes)
    else:
        train_loader = build_train_loader(args, train_ds, data_config, device, num_classes)
        eval_loader = build_eval_loader(args, eval_ds, data_config, device)

    sched_args = argparse.Namespace(**vars(args))
    if sched_args.warmup_lr is None:
        sched_args.warmup_lr = args.lr / 5.
    updates_per_epoch = (len(train_loader) + args.grad_accum_steps - 1) // args.grad_accum_steps  # optimizer steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(sched_args), updates_per_epoch=updates_per_epoch)
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    graphed = build_graphed_step(args, train_model, loss_fn, optimizer, train_loader, model_ema) \
        if args.cuda_graph else None

    saver = summary = None
    if args.rank == 0:
        saver = CheckpointSaver(
            output_dir, model, optimizer, model_ema=model_ema, amp_scaler=loss_scaler, metric_name=args.eval_metric,
            max_history=args.checkpoint_hist, arch=args.model, run=run_record(run_config, train_ds))
        if resume is not None and resuming_here:
            saver.load_state(resume[1])
        summary = SummaryWriter(os.path.join(output_dir, 'summary.csv'),
                                extra_eval=(('ema_top1',) if model_ema is not None else ())
                                + (('experts_used',) if args.stage2 == 'router' else ()))
        summary.truncate(start_epoch)
        _logger.info(
            f'Training {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on '
            f'{len(train_ds)} images, {num_classes} classes, class counts max {int(train_ds.class_counts.max())} '
            f'min {int(train_ds.class_counts.min())}; loss {args.loss}/{args.reweight}, CMO '
            f'{("on" + (f" ({args.cmo_variant})" if args.cmo_variant != "cmo" else "")) if args.cmo else "off"}'
            f'{", ROS r=%g" % args.ros_r if args.ros else ""}'
            f'{", dual batch r=%g" % args.bbn_r if trains_on_dual(args) else ""}'
            f'{", Remix" if args.remix else ""}'
            f'{mixup_text(args)}; '
            f'epochs {start_epoch}..{num_epochs - 1}, {updates_per_epoch} steps each'
            + (f' ({len(train_loader)} batches of {args.batch_size}, {args.grad_accum_steps} accumulated per step).'
               if args.grad_accum_steps > 1 else '.'))

    eval_acc = None
    epoch = start_epoch - 1
    epoch_times = []
    train_mode = stage2_train_mode(args)
    try:
        for epoch in range(start_epoch, num_epochs):
            epoch_start = time.time()
            # every epoch's randomness follows from (seed, epoch): a resumed run repeats it
            utils.random_seed(derive_seed(args.seed, epoch) % (2 ** 31), args.rank)
            train_loader.set_epoch(epoch)
            loss_fn.set_epoch(epoch)
            lr = schedule_lr(optimizer)
            set_causal_norm_lr(model, lr)  # Causal Norm's moving-average decay, where tied to the lr
            if graphed is not None:
                train_metrics = train_one_epoch_graphed(epoch, graphed, args, lr_scheduler=lr_scheduler)
            else:
                train_metrics = train_one_epoch(
                    epoch, train_model, train_loader, optimizer, loss_fn, args, device, lr_scheduler=lr_scheduler,
                    amp_autocast=amp_autocast, loss_scaler=loss_scaler, model_ema=model_ema,
                    train_mode=train_mode)
            if args.distributed and args.dist_bn in ('broadcast', 'reduce') and not args.sync_bn:
                utils.distribute_bn(model, args.world_size, args.dist_bn == 'reduce')
                if model_ema is not None:
                    utils.distribute_bn(model_ema, args.world_size, args.dist_bn == 'reduce')
            last_epoch = epoch == num_epochs - 1
            eval_metrics = None
            if last_epoch or (epoch + 1) % args.eval_interval == 0:
                eval_acc = evaluate(model, eval_loader, args, device, amp_autocast, num_classes, len(eval_ds),
                                    graphed=graphed)
                eval_metrics = eval_summary(eval_acc, train_ds.class_counts)
                if model_ema is not None:
                    ema_acc = evaluate(model_ema.module, eval_loader, args, device, amp_autocast, num_classes,
                                       len(eval_ds), label='Eval EMA', graphed=graphed)
                    eval_metrics['ema_top1'] = ema_acc.summary(train_ds.class_counts)['top1']
                if args.rank == 0:
                    _logger.info(f'Eval: {epoch}  {_metrics_line(eval_metrics)}')
            if lr_scheduler is not None:
                lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric] if eval_metrics else None)
            failure = None
            if saver is not None:
                metric = eval_metrics.get(args.eval_metric) if eval_metrics else None
                try:
                    summary.append(epoch, train_loss=train_metrics['loss'], lr=lr,
                                   epoch_time_s=time.time() - epoch_start, eval_metrics=eval_metrics)
                    saver.save(epoch, metric=metric)
                except (NonFiniteStateError, FileWriteError) as e:
                    failure = e
                for loggers in _RUN_LOGGERS:
                    loggers.log_epoch(epoch, train_metrics['loss'], lr, eval_metrics)
            if args.distributed:  # rank 0 saves; the others must stop with it, not wait for it
                stop = torch.tensor([0 if failure is None else 1], device=device)
                dist.broadcast(stop, 0)
                if failure is None and bool(stop):
                    failure = RankZeroStopped('rank 0 could not save the epoch (see its log)')
            if failure is not None:
                raise failure
            if saver is not None:
                epoch_times.append(time.time() - epoch_start)
                left = num_epochs - epoch - 1
                _logger.info(f'Epoch {epoch} done in {epoch_times[-1]:.1f}s; {left} left, ETA of the run '
                             f'{format_seconds(run_eta(epoch_times, left))}')
    except (NonFiniteLossError, NonFiniteStateError) as e:
        stop_run(args, output_dir, f'stopped on a non-finite {"loss" if isinstance(e, NonFiniteLossError) else "state"}'
                                   f' ({e})')
    except (FileWriteError, RankZeroStopped) as e:
        stop_run(args, output_dir, f'{e}')
    except CorruptImageError as e:  # raised in a loader worker, it arrives with the worker's traceback
        stop_run(args, output_dir, str(e).strip().splitlines()[-1].split('CorruptImageError: ')[-1])
    except KeyboardInterrupt:
        _logger.warning(f'Interrupted; resume with --resume {os.path.join(output_dir or "<output>", LAST)}')
        raise

    results = None
    if args.rank == 0 and eval_acc is not None:
        results = finish_run(args, output_dir, train_ds, eval_acc, epoch, saver.best, model,
                             records=dict(test_prior=test_prior) if test_prior else None)
        if args.push_to_hub:
            push_to_hub(output_dir, args)
    if args.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return results or {}


def stop_run(args, output_dir: Optional[str], why: str) -> None:
    """Stop a failed run with a message naming the checkpoint it can resume from."""
    last = os.path.join(output_dir, LAST) if output_dir else None
    kept = (f'the last good checkpoint is {last} (resume with --resume {last})' if last and os.path.exists(last)
            else 'no checkpoint was written yet')
    _logger.error(f'Stopping: {why}; {kept}.')
    if args.distributed and dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(f'train_cmo.py: {why}; {kept}.')


def build_eval_loader(args, eval_ds, data_config, device):
    return create_cmo_loader(
        eval_ds,
        input_size=data_config['input_size'],
        batch_size=args.validation_batch_size or args.batch_size,
        is_training=False,
        interpolation=data_config['interpolation'],
        mean=data_config['mean'],
        std=data_config['std'],
        num_workers=args.workers,
        distributed=args.distributed,
        crop_pct=data_config['crop_pct'],
        pin_memory=args.pin_mem,
        device=device,
        use_prefetcher=not args.no_prefetcher,
    )


def finish_run(args, output_dir, train_ds, eval_acc: ClassAccuracy, epoch: int, best, model: nn.Module,
               counts_source: Optional[str] = 'training split', records: Optional[Dict[str, Any]] = None):
    """Write results.json, the per-class CSV and the plots (accuracy against class size, reliability; --plot-format).

    ``records``: more top-level keys of results.json (``test_prior``, ``post_hoc``, ``prior_correction``).
    The records come first: a failing plot is reported and leaves them in place.
    """
    counts = train_ds.class_counts
    summary = eval_summary(eval_acc, counts if counts is not None else [1] * eval_acc.num_classes)
    if counts is None:  # no shot groups without the training class counts
        summary.update({k: None for k in ('many', 'medium', 'few', 'head', 'middle', 'tail')})
    epochs_min = SummaryWriter(os.path.join(output_dir, 'summary.csv')).epoch_minutes()  # None without the file
    paths = write_results(
        output_dir, summary, eval_acc.per_class(), counts, train_ds.classes,
        extra=dict(describe_run(args, train_ds, epoch, best, model, counts_source, epochs_min), **(records or {})),
        calibration=eval_acc.calibration(), plot_format=args.plot_format)
    _logger.info(f'Final: {_metrics_line(summary)}; results in {paths["json"]}')
    return dict(summary, output_dir=output_dir, **paths)


def push_to_hub(output_dir: str, args) -> None:
    from timm_cmo import hub
    try:
        hub.push(output_dir, args.push_to_hub, private=args.hub_private, use_ema=args.model_ema)
    except Exception as e:  # the run's results stay on disk; the upload can be retried
        _logger.error(f'Upload to the Hub failed: {e}')


class _Counts:
    """Stands in for the training dataset where only its class counts (or None) and names are known."""

    def __init__(self, counts, classes):
        self.class_counts = counts
        self.classes = classes
        self.num_classes = len(classes)


def training_counts(args, train_ds, resume, num_classes: int):
    """The training class counts for the shot groups of ``--evaluate`` and where they come from.

    The checkpoint's or the exported model's record first, then the training split as given (with a
    warning when no imbalance flag says it is the long-tailed one); None when neither exists.
    """
    recorded = None
    if resume is not None and isinstance(resume[1].get('run'), dict):
        recorded, source = resume[1]['run'].get('class_counts'), f'checkpoint {resume[0]}'
    else:
        from timm_cmo.hub import exported_class_counts
        recorded, source = exported_class_counts(args.model), f'the exported model {args.model}'
    if recorded is not None and len(recorded) == num_classes:
        if train_ds is not None and list(train_ds.class_counts) != list(recorded):
            _logger.warning(f'The shot groups use the training class counts recorded by {source}, not those of '
                            f'the training split given here.')
        return list(recorded), source
    if train_ds is None:
        return None, None
    if args.imb_ratio is None and args.imb_max is None and args.train_list is None:
        _logger.warning(
            f'The shot groups (many / medium / few) use the class counts of the training split as it is '
            f'({int(max(train_ds.class_counts))} ... {int(min(train_ds.class_counts))} images): if the model was '
            f'trained on a long-tailed subset, pass the same --imb-ratio / --imb-max / --train-list as in training.')
    return list(train_ds.class_counts), 'training split'


def run_evaluate(args, model, eval_ds, train_ds, tune_ds, data_config, device, amp_autocast, num_classes, resume,
                 counts, counts_source, records: Dict[str, Any]):
    """``--evaluate``: results.json, CSV and PNG for a pretrained / hub / checkpointed model, after the
    ``--post-hoc`` adjustment (tau chosen on ``tune_ds``) and the ``--prior-correction``."""
    if eval_ds is None:
        error('--evaluate needs --data-dir (the evaluation split)')
    if resume is not None:
        load_model_weights(model, resume[1], resume[0], use_ema=args.model_ema)
    records = dict(records)
    if args.post_hoc is not None:
        records['post_hoc'] = post_hoc_adjust(args, model, tune_ds, counts, data_config, device, amp_autocast)
    if args.prior_correction is not None:
        records['prior_correction'] = correct_prior(args, model, counts, records['test_prior'])
    eval_loader = build_eval_loader(args, eval_ds, data_config, device)
    acc = evaluate(model, eval_loader, args, device, amp_autocast, num_classes, len(eval_ds))
    results = {}
    if args.rank == 0:
        if args.output or args.experiment:
            output_dir = utils.get_outdir(args.output or './output/eval', args.experiment or '')
        elif args.resume:
            output_dir = utils.get_outdir(os.path.dirname(os.path.abspath(args.resume)), 'eval')
        else:
            output_dir = utils.get_outdir('./output/eval', datetime.now().strftime('%Y%m%d-%H%M%S') + '-' +
                                          safe_model_name(args.model))
        if counts is None:
            _logger.warning('No training class counts (no checkpoint record, no training split): the shot groups '
                            'are not reported.')
        classes = train_ds.classes if train_ds is not None else eval_ds.classes
        results = finish_run(args, output_dir, _Counts(counts, classes), acc, epoch=-1, best={}, model=model,
                             counts_source=counts_source, records=records)
    if args.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return results


def apply_test_prior(args, eval_ds, train_counts, num_classes: int):
    """``--test-prior``: the evaluation set subsampled (seeded) to the profile, and its record for results.json
    (``(eval_ds, None)`` without the flag). Classes are ranked by ``train_counts`` for forward / backward."""
    if args.test_prior is None or eval_ds is None:
        return eval_ds, None
    try:
        named = args.test_prior in TEST_PRIORS
        profile = args.test_prior if named else read_prior_file(args.test_prior, num_classes)
        if train_counts is not None and len(train_counts) != num_classes:
            train_counts = None
        target = shifted_prior_counts(profile, eval_ds.class_counts, train_counts=train_counts,
                                      imb_ratio=args.test_imb_ratio)
    except (PriorFileError, ValueError) as e:
        error(f'--test-prior {args.test_prior}: {e}')
    if train_counts is None and args.test_prior in ('forward', 'backward'):
        _logger.warning(f'--test-prior {args.test_prior}: no training class counts, so the classes are ranked by index '
                        f'(class 0 the largest), as on CIFAR-LT.')
    shifted = _view(eval_ds, eval_ds.indices[shifted_test_indices(eval_ds.targets, target, args.test_prior_seed)],
                    eval_ds)
    record = dict(profile=args.test_prior if named else 'file', file=None if named else args.test_prior,
                  imb_ratio=args.test_imb_ratio, seed=args.test_prior_seed, ranked_by='training class counts'
                  if train_counts is not None else 'class index', source_images=len(eval_ds),
                  weights=None if named else [float(w) for w in profile], **describe_prior(target))
    if args.rank == 0:
        _logger.info(f'Test prior {args.test_prior}: {len(shifted)} of {len(eval_ds)} test images, per class '
                     f'{_brief(target)} (imbalance {record["imb_ratio"] or 1:g}).')
    return shifted, record


def check_tune_data(args, resume, train_ds, tune_ds) -> None:
    """Refuse validation data drawn from the training images unless the model provably never trained on them:
    ``--tune-holdout-per-class`` and ``--tune-fraction`` need the training split the checkpoint's run used."""
    if args.tune_fraction is None and (args.tune_holdout_per_class is None or tune_ds is None):
        return
    flag = '--tune-fraction' if args.tune_fraction is not None else '--tune-holdout-per-class'
    config = recorded_config(args, resume) if resume is not None else None
    if config is None:
        from timm_cmo.hub import exported_class_counts
        exported = exported_class_counts(args.model)
        if args.tune_fraction is None and exported is not None and train_ds is not None and \
                list(exported) == [int(n) for n in train_ds.class_counts]:
            _logger.warning(f'{flag}: the exported model records its training class counts, which the training split '
                            f'given here matches, but not its imbalance seed: the held-out images are the model\'s '
                            f'unseen ones only if --imb-seed {args.imb_seed} is the one it was trained with.')
            return
        error(f'{flag}: the validation images come from the training images, and nothing records which ones this '
              f'model trained on (evaluate a run\'s checkpoint with --resume, or give --tune-list / --tune-split)')
    keys = ['imb_ratio', 'imb_max', 'imb_seed', 'train_list', 'train_split', 'tune_fraction']
    keys += ['tune_seed'] if args.tune_fraction is not None else []
    diffs = [f'{_flag(k)} {config.get(k)!r} in training, {getattr(args, k)!r} here' for k in keys
             if config.get(k, None if k == 'tune_fraction' else getattr(args, k)) != getattr(args, k)]
    recorded = resume[1]['run'].get('class_counts')
    if not diffs and recorded is not None and train_ds is not None and \
            list(recorded) != [int(n) for n in train_ds.class_counts]:
        diffs.append(f'training images per class {_brief(list(recorded))} in training, '
                     f'{_brief([int(n) for n in train_ds.class_counts])} here')
    if diffs:
        error(f'{flag}: {resume[0]} was trained on another training set ({"; ".join(diffs)}), so the held-out images '
              f'could be ones it trained on: pass the training flags of its run')


def post_hoc_adjust(args, model, tune_ds, counts, data_config, device, amp_autocast) -> Dict[str, Any]:
    """``--post-hoc``: choose tau on the validation data (never the test split), adjust the classifier in place;
    returns the record for results.json."""
    from timm_cmo.posthoc import apply_post_hoc, classifier_of, collect_features, select_tau
    if args.distributed:
        error('--post-hoc chooses tau on the whole validation set: run the evaluation in one process')
    if counts is None and args.post_hoc == 'logit_adjust':
        error('--post-hoc logit_adjust needs the training class counts: evaluate a run\'s checkpoint (--resume) or '
              'give the training split with its imbalance flags')
    from timm_cmo.hub import exported_post_hoc
    done = exported_post_hoc(args.model)
    if done:
        error(f'--post-hoc {args.post_hoc}: --model {args.model} was exported with its classifier already adjusted '
              f'({done.get("kind")}, tau {done.get("tau")}); evaluate it without --post-hoc')
    logit_scale = args.ldam_s if timm_cmo.models.is_head_norm(model) else 1.
    grid = tuned_grid(args)
    record: Dict[str, Any] = dict(kind=args.post_hoc, grid=grid, logit_scale=logit_scale, validation=None)
    try:
        if tune_ds is not None:
            loader = build_eval_loader(args, tune_ds, data_config, device)
            features, targets = collect_features(model, loader, device, amp_autocast)
            chosen = select_tau(args.post_hoc, classifier_of(model)[0], features, targets,
                                counts or [1] * model.num_classes, grid, logit_scale)
            tau = chosen['tau']
            record['validation'] = dict(
                source=tune_source(args), images=len(tune_ds), class_counts=[int(n) for n in tune_ds.class_counts],
                criterion=chosen['criterion'], scores=chosen['scores'], score=chosen['score'])
            _logger.info(f'--post-hoc {args.post_hoc}: tau {tau:g} chosen on {len(tune_ds)} validation images '
                         f'({tune_source(args)}): mean per-class top-1 {chosen["score"]:.2f} (grid '
                         f'{", ".join(f"{t:g}: {v:.2f}" for t, v in zip(grid, chosen["scores"]))})')
            if len(grid) > 1 and tau in (min(grid), max(grid)) and chosen['score'] > min(chosen['scores']):
                _logger.warning(f'--post-hoc {args.post_hoc}: tau {tau:g} is at the edge of the grid '
                                f'({min(grid):g} to {max(grid):g}); the best tau may lie beyond it: widen '
                                f'--post-hoc-tau')
        else:
            tau = grid[0]
        apply_post_hoc(model, args.post_hoc, tau, counts or [1] * model.num_classes, logit_scale)
    except ValueError as e:
        error(f'--post-hoc {args.post_hoc}: {e}')
    record['tau'] = tau
    return record


def tune_source(args) -> str:
    """How the validation data was drawn, for the records."""
    if args.tune_holdout_per_class is not None:
        return (f'{args.tune_holdout_per_class} per class of the training images outside the long-tailed subset '
                f'(seed {args.tune_seed})')
    if args.tune_fraction is not None:
        return f'a stratified {args.tune_fraction:g} of the training set, held out of training (seed {args.tune_seed})'
    if args.tune_list is not None:
        return f'list {args.tune_list}'
    return f'split {args.tune_split}'


def correct_prior(args, model, counts, test_prior: Dict[str, Any]) -> Dict[str, Any]:
    """``--prior-correction``: add ``log p_test`` (less ``log p_train`` for ``train``) to the logits, in place."""
    from timm_cmo.posthoc import apply_logit_offset, prior_offset
    if args.prior_correction == 'train' and counts is None:
        error('--prior-correction train needs the training class counts: evaluate a run\'s checkpoint (--resume)')
    logit_scale = args.ldam_s if timm_cmo.models.is_head_norm(model) else 1.
    try:
        offset = prior_offset(test_prior['prior'], counts if args.prior_correction == 'train' else None)
        apply_logit_offset(model, offset, logit_scale)
    except ValueError as e:
        error(f'--prior-correction {args.prior_correction}: {e}')
    return dict(mode=args.prior_correction, p_test=test_prior['prior'],
                p_train=[n / sum(counts) for n in counts] if args.prior_correction == 'train' else 'uniform',
                offset=offset.tolist(), logit_scale=logit_scale)


def cli(argv: Optional[List[str]] = None) -> int:
    """Console entry point (``timm-cmo-train``): 0 on success."""
    main(argv)
    return 0


if __name__ == '__main__':
    sys.exit(cli())
