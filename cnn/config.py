"""Checks a config before any data is read or model built, with errors that say how to fix them."""

import json
import os
import shlex
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import ml_collections

from cnn import activations
from cnn import errors
from cnn import models

OPTIMIZERS = ('adam', 'adamw', 'nadam', 'sgd', 'rmsprop')
PADDINGS = ('VALID', 'SAME')
WANDB_MODES = ('', 'online', 'offline', 'disabled')
DTYPES = ('float32', 'bfloat16')
CONV_IMPLS = ('auto', 'xla', 'cpu_eigen')
LR_SCHEDULES = ('constant', 'cosine')
BN_STATS = ('precise', 'running')
DEVICE_DATA = ('auto', 'on', 'off')


class Role(NamedTuple):
  """What a config field is for, as the code that reads config fields sees it."""
  run_defining: bool  # changes what a run computes: a workdir or sweep refuses another value
  in_report: bool  # describes the model or its training: shown in a sweep's best_config.py
  sweepable: bool  # may differ between the runs of one sweep


RUN = Role(run_defining=True, in_report=True, sweepable=True)
# How long or how a run goes, or what evaluation shows, not what it computes: resumable.
SETTING = Role(run_defining=False, in_report=True, sweepable=True)
# Where data and files live on this machine.
MACHINE = Role(run_defining=False, in_report=False, sweepable=True)
# Machine or logging fields that every run of a sweep shares (one cache, one W&B project).
SHARED = Role(run_defining=False, in_report=False, sweepable=False)

# The role of every field of configs/default.py: a new field there needs its line here.
FIELD_ROLES: dict[str, Role] = {
    # Data.
    'data_dir': MACHINE,
    'download': MACHINE,
    'dataset_url': MACHINE,
    'cache_dir': SHARED,
    'holdout_fraction': RUN,
    'image_size': RUN,
    'data_aug': RUN,
    # Model.
    'conv_layers': RUN,
    'first_layer_filters': RUN,
    'filter_org': RUN,
    'kernel_size': RUN,
    'padding': RUN,
    'activation': RUN,
    'dense_size': RUN,
    'batch_norm': RUN,
    'dropout': RUN,
    'dtype': RUN,
    'conv_impl': SETTING,  # the same parameters and results either way
    # Optimisation.
    'optimizer': RUN,
    'learning_rate': RUN,
    'momentum': RUN,
    'weight_decay': RUN,
    'batch_size': RUN,
    'eval_batch_size': SETTING,
    'device_data': MACHINE,  # the same batches either way
    'device_data_max_fraction': MACHINE,
    'num_epochs': SETTING,  # a finished run may be trained on for more epochs
    'early_stopping_patience': SETTING,
    'early_stopping_min_epochs': SETTING,
    'early_stopping_smoothing': SETTING,
    'seed': RUN,
    'lr_schedule': RUN,
    'warmup_epochs': RUN,
    'label_smoothing': RUN,
    # Augmentation strength.
    'aug_flip': RUN,
    'aug_rotation': RUN,
    'aug_shift': RUN,
    'aug_zoom': RUN,
    'aug_crop_min_scale': RUN,
    'aug_brightness': RUN,
    'aug_erase': RUN,
    # Batch norm and validation.
    'bn_momentum': RUN,
    'bn_stats': RUN,  # chooses the checkpoint: part of the run
    'precise_bn_images': RUN,
    'tta_flip': RUN,
    'ema_epochs': RUN,  # which weights are validated and kept
    'bn_gap_images': SETTING,  # a diagnostic only
    # Logging and checkpoints.
    'wandb_mode': SHARED,
    'wandb_project': SHARED,
    'wandb_entity': SHARED,
    'run_name': SHARED,
    'checkpoint_every_steps': MACHINE,
    'new_run': SHARED,
    'compilation_cache_dir': SHARED,
    # Evaluation and guided backprop.
    'eval_image_seed': SETTING,
    'guided_bp_image': SETTING,
    'guided_bp_layer': SETTING,
    'guided_bp_channels': SETTING,
    'guided_bp_num_neurons': SETTING,
    'guided_bp_method': SETTING,
}


def _fields(test: Callable[[Role], bool]) -> frozenset[str]:
  return frozenset(name for name, role in FIELD_ROLES.items() if test(role))


# Fields that do not change what a run computes: a workdir may be resumed with other values.
NON_RUN_FIELDS = _fields(lambda r: not r.run_defining)
# Fields of a machine or a logging setup, not a model: left out of a sweep's best_config.py.
NON_REPORT_FIELDS = _fields(lambda r: not r.in_report)
# Every run of a sweep shares these; sweeping them makes no sense.
UNSWEEPABLE_FIELDS = _fields(lambda r: not r.sweepable)


def run_fields(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """The run-defining fields of a config (or of its config.json) as plain JSON values.

  A field unknown to FIELD_ROLES (say, from an older config.json) counts as run-defining.
  """
  d = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  d = json.loads(json.dumps(d, default=str))  # tuples become lists, as in config.json
  fields = {k: v for k, v in d.items() if k not in NON_RUN_FIELDS}
  if d.get('lr_schedule', 'constant') != 'constant':
    fields['num_epochs'] = d['num_epochs']  # the length of the schedule: part of the run
  return fields


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """The fields of `old` whose values `new` changes, sorted.

  A field that `old` lacks was added to the code after the old run was made: it takes its
  default there, so it is no difference (workdirs of earlier versions keep working).
  """
  return [k for k in sorted(old) if old[k] != new.get(k)]


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
  """`field: old -> new, ...` over the fields whose values differ; '' when none do."""
  return ', '.join(f'{k}: {old[k]!r} -> {new.get(k)!r}' for k in _changed(old, new))


def flags_to_restore(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
  """The `--config.FIELD=VALUE` flags that set the fields `config_diff` lists back to `old`."""
  def flag(k):  # quoted for a shell only where it needs it: a tuple, a path with spaces
    v = old[k]
    return shlex.quote(f'--config.{k}={tuple(v) if isinstance(v, list) else v}')
  return ' '.join(flag(k) for k in _changed(old, new))


class ConfigError(errors.UserError, ValueError):
  """A config that cannot work; the message says what to change."""


def spatial_sizes(image_size: int, kernel_size: int, padding: str, conv_layers: int) -> list[int]:
  """Side length after each conv block (conv, then 2x2 pool that drops an odd row)."""
  sizes, s = [], image_size
  for _ in range(conv_layers):
    s = s - kernel_size + 1 if padding.upper() == 'VALID' else s
    s = s // 2 if s >= 1 else 0
    sizes.append(s)
  return sizes


def min_image_size(kernel_size: int, padding: str, conv_layers: int) -> int:
  """Smallest square input whose last block still has at least one pixel."""
  s = 1
  while spatial_sizes(s, kernel_size, padding, conv_layers)[-1] < 1:
    s += 1
  return s


def _check(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field that cannot work and how to fix it."""
  c = config
  _check(c.padding.upper() in PADDINGS,
         f'padding={c.padding!r} is not one of {PADDINGS}; use --config.padding=VALID or SAME')
  _check(c.activation in activations.TRAINABLE_ACTIVATIONS,
         f'unknown activation {c.activation!r}; '
         f'known: {", ".join(activations.TRAINABLE_ACTIVATIONS)}')
  _check(c.optimizer in OPTIMIZERS,
         f'unknown optimizer {c.optimizer!r}; known: {", ".join(OPTIMIZERS)}')
  _check(c.dtype in DTYPES, f'dtype={c.dtype!r} is not one of {DTYPES}')
  _check(c.conv_impl in CONV_IMPLS, f'conv_impl={c.conv_impl!r} is not one of {CONV_IMPLS}')
  _check(c.wandb_mode in WANDB_MODES,
         f'wandb_mode={c.wandb_mode!r}; use online, offline, disabled or "" (auto)')
  for name in ('conv_layers', 'kernel_size', 'first_layer_filters', 'dense_size', 'image_size',
               'batch_size', 'eval_batch_size', 'num_epochs'):
    _check(isinstance(c[name], int) and c[name] > 0,
           f'{name}={c[name]!r} must be a positive integer')
  _check(c.learning_rate > 0, f'learning_rate={c.learning_rate} must be positive, e.g. 1e-3')
  _check(c.filter_org > 0, f'filter_org={c.filter_org} must be positive (e.g. 0.5, 1 or 2)')
  _check(0 <= c.dropout < 1, f'dropout={c.dropout} must be in [0, 1), e.g. 0.2')
  _check(0 < c.holdout_fraction < 1,
         f'holdout_fraction={c.holdout_fraction} must be in (0, 1), e.g. 0.1')
  _check(c.early_stopping_patience >= 0,
         f'early_stopping_patience={c.early_stopping_patience} must be >= 0 (0 turns it off)')
  filters = models.conv_filters(c.first_layer_filters, c.filter_org, c.conv_layers)
  _check(min(filters) > 0,
         f'filters per block {filters}: int({c.first_layer_filters} * {c.filter_org}**i) rounds '
         f'to 0 by block {filters.index(min(filters)) + 1}; raise first_layer_filters or '
         f'filter_org or lower conv_layers')
  _validate_recipe(c)
  last = spatial_sizes(c.image_size, c.kernel_size, c.padding, c.conv_layers)[-1]
  smallest = min_image_size(c.kernel_size, c.padding, c.conv_layers)
  _check(last >= 1,
         f'image_size={c.image_size} is too small for {c.conv_layers} {c.padding.upper()} '
         f'blocks of kernel {c.kernel_size} with 2x2 pooling: the feature map shrinks to nothing. '
         f'Use --config.image_size={smallest} or larger, a smaller kernel_size, fewer conv_layers, '
         f'or --config.padding=SAME')


def _validate_recipe(c: ml_collections.ConfigDict) -> None:
  """The schedule, regularisation, augmentation and validation fields."""
  _check(c.lr_schedule in LR_SCHEDULES,
         f'lr_schedule={c.lr_schedule!r} is not one of {LR_SCHEDULES}')
  _check(0 <= c.warmup_epochs <= c.num_epochs,
         f'warmup_epochs={c.warmup_epochs} must be in [0, num_epochs={c.num_epochs}]')
  _check(0 <= c.label_smoothing < 1, f'label_smoothing={c.label_smoothing} must be in [0, 1)')
  _check(0 <= c.weight_decay, f'weight_decay={c.weight_decay} must be >= 0')
  _check(0 <= c.bn_momentum < 1, f'bn_momentum={c.bn_momentum} must be in [0, 1), e.g. 0.99')
  _check(c.bn_stats in BN_STATS, f'bn_stats={c.bn_stats!r} is not one of {BN_STATS}')
  _check(c.ema_epochs >= 0, f'ema_epochs={c.ema_epochs} must be >= 0 (0 turns the EMA off)')
  _check(not (c.ema_epochs and c.batch_norm and c.bn_stats == 'running'),
         "ema_epochs needs bn_stats='precise' with batch_norm: the running statistics belong "
         'to the weights, not to their average. Use --config.bn_stats=precise, or also pass '
         '--config.ema_epochs=0 to validate the weights themselves')
  _check(c.device_data in DEVICE_DATA, f'device_data={c.device_data!r} is not one of {DEVICE_DATA}')
  _check(0 < c.device_data_max_fraction <= 1,
         f'device_data_max_fraction={c.device_data_max_fraction} must be in (0, 1]')
  for name in ('precise_bn_images', 'bn_gap_images', 'early_stopping_min_epochs'):
    _check(isinstance(c[name], int) and c[name] >= 0, f'{name}={c[name]!r} must be an integer >= 0')
  _check(0 <= c.early_stopping_smoothing < 1,
         f'early_stopping_smoothing={c.early_stopping_smoothing} must be in [0, 1) (0 = off)')
  for name in ('aug_rotation', 'aug_shift', 'aug_zoom', 'aug_brightness'):
    _check(c[name] >= 0, f'{name}={c[name]} must be >= 0 (0 turns that transform off)')
  _check(c.aug_zoom < 1 and c.aug_brightness < 1,
         f'aug_zoom={c.aug_zoom} and aug_brightness={c.aug_brightness} must be below 1')
  _check(0 < c.aug_crop_min_scale <= 1,
         f'aug_crop_min_scale={c.aug_crop_min_scale} must be in (0, 1]; 1 means no crop')
  _check(0 <= c.aug_erase <= 1,
         f'aug_erase={c.aug_erase} must be a probability in [0, 1] (0 turns erasing off)')


# The fields of the reference's run names, in its order.
NAME_FIELDS = (('filters', 'first_layer_filters'), ('org', 'filter_org'), ('aug', 'data_aug'),
                ('bn', 'batch_norm'), ('drop', 'dropout'), ('k', 'kernel_size'),
                ('dense', 'dense_size'))


def hyperparameter_name(config: ml_collections.ConfigDict, extra_keys: Sequence[str] = ()) -> str:
  """The reference's run name, e.g. filters_64_org_1_aug_True_bn_True_drop_0.2_k_3_dense_128.

  `extra_keys` appends other fields (`_learning_rate_0.00031`), so sweep runs that differ only
  in them get distinct names.
  """
  fmt = lambda v: f'{v:g}' if isinstance(v, float) else str(v)
  parts = [f'{short}_{fmt(config[field])}' for short, field in NAME_FIELDS]
  parts += [f'{key}_{fmt(config[key])}' for key in extra_keys]
  return '_'.join(parts).replace(os.sep, '-')


def run_name(config: ml_collections.ConfigDict) -> str:
  """config.run_name, else `hyperparameter_name(config)`."""
  return config.run_name or hyperparameter_name(config)
