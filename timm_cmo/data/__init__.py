"""Long-tailed datasets, class-weighted sampling and the CMO loader."""
from .cmo import CMO_VARIANTS, CMOConfig, CMOMixup, MixInfo, cmo_active, rand_bbox, soft_target
from .config import input_channels, input_img_mode, resolve_run_data_config
from .dataset import (
    ConvertMode, CorruptImageError, LongTailDataset, ShotGroups, create_lt_dataset, dataset_class_names,
    dataset_targets, long_tail_counts, long_tail_indices, shot_groups,
)
from .dual import DualBatch, split_dual
from .loader import CMOCollate, CMOLoader, PlanBatchSampler, create_cmo_loader, resolve_device
from .mixup import MIXUP_MODES, MixupCutmix, cutmix_box
from .plan import BatchPlan, EpochPlanner
from .reader_image_list import ListFileError, ReaderImageList, parse_list_file
from .sampler import ClassWeightedSampler, class_sampling_probs, class_weights, sample_weights
from .transforms import pad_crop_transform
