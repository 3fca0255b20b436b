"""The default config (every field with its meaning), and the checks that run before any data is
read or model built, with errors that say how to fix them."""

import json
import os
import shlex
from typing import Any, Mapping, Sequence

import ml_collections

from cnn import activations
from cnn import errors
from cnn import models

OPTIMIZERS = ('adam', 'adamw', 'nadam', 'sgd', 'rmsprop')
PADDINGS = ('VALID', 'SAME')
WANDB_MODES = ('', 'online', 'offline', 'disabled')
# The names each of these fields accepts.
CHOICES = {'dtype': ('float32', 'bfloat16'), 'conv_impl': ('auto', 'xla', 'cpu_eigen'),
           'lr_schedule': ('constant', 'cosine'), 'bn_stats': ('precise', 'running'),
           'device_data': ('auto', 'on', 'off')}


def default_config() -> ml_collections.ConfigDict:  # noqa: PLR0915
  """Every field of a run with its default; configs/ and library users start from it."""
  c = ml_collections.ConfigDict()

  # Data.
  c.data_dir = 'data/inaturalist_12K'  # holds train/<class>/ and val/<class>/ (val = test set)
  c.download = True  # fetch and extract `dataset_url` when data_dir does not exist
  c.dataset_url = 'https://storage.googleapis.com/wandb_datasets/nature_12K.zip'
  c.cache_dir = ''  # decoded-image cache; '' means $XDG_CACHE_HOME/inat_cnn (~/.cache/inat_cnn)
  c.holdout_fraction = 0.1  # class-balanced share of train/ held out for validation
  c.image_size = 256  # images are resized to image_size x image_size
  c.data_aug = False  # flips, rotation, shift, zoom, brightness inside the jitted train step
  # Augmentation strength (with data_aug); the defaults are the reference's ranges.
  c.aug_flip = True  # random horizontal flips
  c.aug_rotation = 20.0  # degrees: uniform in +-aug_rotation
  c.aug_shift = 0.2  # fraction of each side: uniform in +-aug_shift
  c.aug_zoom = 0.2  # per-axis zoom factor uniform in [1 - aug_zoom, 1 + aug_zoom]
  c.aug_brightness = 0.2  # brightness factor uniform in [1 - aug_brightness, 1 + aug_brightness]
  c.aug_crop_min_scale = 1.0  # random-resized crop of area fraction [this, 1]; 1.0 = no crop
  c.aug_erase = 0.0  # probability of random erasing: 2-33% of the image set to its mean colour

  # Model (names as in the reference's sweep).
  c.conv_layers = 5  # conv -> [BN] -> activation -> 2x2 max-pool blocks
  c.first_layer_filters = 32  # filters of block 1
  c.filter_org = 1.0  # block i has int(first_layer_filters * filter_org**i) filters
  c.kernel_size = 3  # k x k convolutions
  c.padding = 'VALID'  # VALID (the reference) or SAME
  c.activation = 'relu'  # relu, gelu, silu, elu, leaky_relu, mish, tanh
  c.dense_size = 64  # neurons of the hidden dense layer
  c.batch_norm = False  # batch norm after every conv and the dense layer
  c.bn_momentum = 0.99  # batch norm's running-average momentum (Keras' default, the reference's)
  c.dropout = 0.0  # dropout after the dense layer only, as in the reference
  c.dtype = 'float32'  # compute dtype (float32 or bfloat16); parameters stay float32
  # Layer kernels: 'xla' (nn.Conv, nn.BatchNorm), 'cpu_eigen' (cnn/layers.py: the same
  # parameters and results, faster on XLA:CPU, no forward-mode autodiff) or 'auto' (cpu_eigen
  # when JAX runs on the CPU, xla on GPU/TPU).
  c.conv_impl = 'auto'

  # Optimisation.
  c.optimizer = 'adam'  # adam, adamw, nadam, sgd (with momentum), rmsprop
  c.learning_rate = 1e-3
  c.momentum = 0.9  # sgd and rmsprop only
  c.nesterov = False  # Nesterov momentum; sgd and rmsprop only
  c.weight_decay = 1e-4  # adamw only (decoupled, scaled by the learning rate as in optax)
  c.lr_schedule = 'constant'  # constant, or cosine: decays to 0 at the end of num_epochs
  c.warmup_epochs = 0.0  # linear learning-rate warm-up from 0, in epochs (fractions allowed)
  c.label_smoothing = 0.0  # share of each target spread evenly over all classes
  c.batch_size = 32  # global batch, split over all local devices
  c.eval_batch_size = 128
  # Training images held on the device(s), each batch gathered there: 'auto' (on a GPU/TPU when
  # they fit in device_data_max_fraction of its memory), 'on' or 'off' (sliced on the host).
  c.device_data = 'auto'
  c.device_data_max_fraction = 0.25
  c.num_epochs = 50
  c.early_stopping_patience = 5  # epochs without a better val accuracy before stopping; 0 = off
  c.early_stopping_min_epochs = 0  # never stop for patience before this many epochs
  # Choose and stop on an EMA of val accuracy (this factor); 0 = raw.
  c.early_stopping_smoothing = 0.0
  c.seed = 0  # one seed drives init, hold-out split, shuffling, dropout and augmentation

  # Validation: what the eval-mode (running-statistics) model is scored with.
  # 'precise': before each validation, batch norm's statistics are recomputed as the average over
  # precise_bn_images un-augmented training images ("precise BN"), so eval mode tracks what the
  # model has learned from epoch 1 on; 'running': the running averages alone, which lag by
  # ~1/(1 - bn_momentum) steps.
  c.bn_stats = 'precise'
  c.precise_bn_images = 192  # a fixed, seeded set of training images (whole batches of batch_size)
  # Validate (and keep as the best checkpoint, which evaluate, predict and guided_bp read) an
  # exponential moving average of the weights over about this many epochs; 0 = the weights.
  c.ema_epochs = 0.0
  # Average each image's prediction with its mirror's: validation, evaluate, predict.
  c.tta_flip = False
  # Diagnostic: per epoch, train-mode vs eval-mode accuracy on N training images.
  c.bn_gap_images = 0

  # Logging and checkpoints.
  # online, offline or disabled; '' = online if W&B credentials exist, else offline.
  c.wandb_mode = ''
  c.wandb_project = 'inaturalist-cnn'
  c.wandb_entity = ''  # '' = your default entity
  c.run_name = ''  # '' = named after the hyperparameters, as the reference did
  c.checkpoint_every_steps = 0  # extra mid-epoch checkpoints; 0 = only at the end of each epoch
  c.keep_checkpoints = 3  # latest checkpoints kept; an unreadable newest falls back to the next
  c.new_run = False  # allow a workdir that holds a run with another config (old run is kept)
  c.compilation_cache_dir = ''  # XLA's persistent cache; '' = ~/.cache/inat_cnn/jax, 'off' = none

  # Evaluation and guided backprop (--mode=evaluate / guided_bp).
  c.eval_image_seed = 0  # picks the test image shown in first-layer activations
  c.guided_bp_image = ''  # image file for guided backprop; '' = a seeded random test image
  c.guided_bp_layer = 'conv5'  # whose neurons are explained
  c.guided_bp_channels = ()  # channels to explain; () = the 10 this image activates most
  c.guided_bp_num_neurons = 10
  c.guided_bp_method = 'guided'  # guided, vanilla or deconvnet (comparison.png shows all three)
  return c


# Every field not named below defines the run: a workdir or a sweep refuses another value.
# Machine or logging fields that every run of a sweep shares (one cache, one W&B project):
# sweeping them makes no sense.
UNSWEEPABLE_FIELDS = frozenset({'cache_dir', 'wandb_mode', 'wandb_project', 'wandb_entity',
                                'run_name', 'new_run', 'compilation_cache_dir'})
# Those, and where data and files live on this machine: fields of a machine or a logging setup,
# not a model, left out of a sweep's best_config.py.
NON_REPORT_FIELDS = UNSWEEPABLE_FIELDS | {
    'data_dir', 'download', 'dataset_url', 'device_data', 'device_data_max_fraction',
    'checkpoint_every_steps', 'keep_checkpoints'}
# Those, and how long or how a run goes, or what evaluation shows: fields that do not change what
# a run computes, so a workdir may be resumed with other values.
NON_RUN_FIELDS = NON_REPORT_FIELDS | {
    'conv_impl', 'eval_batch_size', 'num_epochs', 'early_stopping_patience',
    'early_stopping_min_epochs', 'early_stopping_smoothing', 'bn_gap_images', 'eval_image_seed',
    'guided_bp_image', 'guided_bp_layer', 'guided_bp_channels', 'guided_bp_num_neurons',
    'guided_bp_method'}


def run_fields(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """The run-defining fields of a config (or of its config.json) as plain JSON values."""
  d = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  d = json.loads(json.dumps(d, default=str))  # tuples become lists, as in config.json
  fields = {k: v for k, v in d.items() if k not in NON_RUN_FIELDS}
  if d.get('lr_schedule', 'constant') != 'constant':
    fields['num_epochs'] = d['num_epochs']  # the length of the schedule: part of the run
  return fields


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  # A field that `old` lacks was added to the code after the old run was made: it takes its
  # default there, so it is no difference.
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


def min_image_size(kernel_size: int, padding: str, conv_layers: int) -> int:
  """Smallest square input whose last block still has one pixel, worked backwards: a 2x2 pool
  needs 2 pixels per output pixel, a VALID k x k conv k - 1 more."""
  s = 1
  for _ in range(conv_layers):
    s = 2 * s + (kernel_size - 1 if padding.upper() == 'VALID' else 0)
  return s


def _check(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


# Fractions: (field, the interval allowed, what the message adds); '[' or ']' includes that end.
_FRACTIONS = (
    ('dropout', '[0, 1)', ', e.g. 0.2'),
    ('holdout_fraction', '(0, 1)', ', e.g. 0.1'),
    ('label_smoothing', '[0, 1)', ''),
    ('bn_momentum', '[0, 1)', ', e.g. 0.99'),
    ('device_data_max_fraction', '(0, 1]', ''),
    ('early_stopping_smoothing', '[0, 1)', ' (0 = off)'),
    ('aug_crop_min_scale', '(0, 1]', '; 1 means no crop'))


def _inside(x: float, interval: str) -> bool:
  return (x >= 0 if interval[0] == '[' else x > 0) and (x <= 1 if interval[-1] == ']' else x < 1)


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
  _check(c.wandb_mode in WANDB_MODES,
         f'wandb_mode={c.wandb_mode!r}; use online, offline, disabled or "" (auto)')
  for name, choices in CHOICES.items():
    _check(c[name] in choices, f'{name}={c[name]!r} is not one of {choices}')
  for name in ('conv_layers', 'kernel_size', 'first_layer_filters', 'dense_size', 'image_size',
               'batch_size', 'eval_batch_size', 'num_epochs'):
    _check(isinstance(c[name], int) and c[name] > 0,
           f'{name}={c[name]!r} must be a positive integer')
  for name in ('precise_bn_images', 'bn_gap_images', 'early_stopping_min_epochs'):
    _check(isinstance(c[name], int) and c[name] >= 0, f'{name}={c[name]!r} must be an integer >= 0')
  _check(isinstance(c.keep_checkpoints, int) and c.keep_checkpoints >= 1,
         f'keep_checkpoints={c.keep_checkpoints!r} must be an integer >= 1, e.g. 3')
  for name, interval, hint in _FRACTIONS:
    _check(_inside(c[name], interval), f'{name}={c[name]} must be in {interval}{hint}')
  _check(c.learning_rate > 0, f'learning_rate={c.learning_rate} must be positive, e.g. 1e-3')
  _check(c.filter_org > 0, f'filter_org={c.filter_org} must be positive (e.g. 0.5, 1 or 2)')
  _check(c.early_stopping_patience >= 0,
         f'early_stopping_patience={c.early_stopping_patience} must be >= 0 (0 turns it off)')
  _check(0 <= c.warmup_epochs <= c.num_epochs,
         f'warmup_epochs={c.warmup_epochs} must be in [0, num_epochs={c.num_epochs}]')
  _check(0 <= c.weight_decay, f'weight_decay={c.weight_decay} must be >= 0')
  _check(c.ema_epochs >= 0, f'ema_epochs={c.ema_epochs} must be >= 0 (0 turns the EMA off)')
  _check(not (c.ema_epochs and c.batch_norm and c.bn_stats == 'running'),
         "ema_epochs needs bn_stats='precise' with batch_norm: the running statistics belong "
         'to the weights, not to their average. Use --config.bn_stats=precise, or also pass '
         '--config.ema_epochs=0 to validate the weights themselves')
  for name in ('aug_rotation', 'aug_shift', 'aug_zoom', 'aug_brightness'):
    _check(c[name] >= 0, f'{name}={c[name]} must be >= 0 (0 turns that transform off)')
  _check(c.aug_zoom < 1 and c.aug_brightness < 1,
         f'aug_zoom={c.aug_zoom} and aug_brightness={c.aug_brightness} must be below 1')
  _check(0 <= c.aug_erase <= 1,
         f'aug_erase={c.aug_erase} must be a probability in [0, 1] (0 turns erasing off)')
  filters = models.conv_filters(c.first_layer_filters, c.filter_org, c.conv_layers)
  _check(min(filters) > 0,
         f'filters per block {filters}: int({c.first_layer_filters} * {c.filter_org}**i) rounds '
         f'to 0 by block {filters.index(min(filters)) + 1}; raise first_layer_filters or '
         f'filter_org or lower conv_layers')
  smallest = min_image_size(c.kernel_size, c.padding, c.conv_layers)
  _check(c.image_size >= smallest,
         f'image_size={c.image_size} is too small for {c.conv_layers} {c.padding.upper()} '
         f'blocks of kernel {c.kernel_size} with 2x2 pooling: the feature map shrinks to nothing. '
         f'Use --config.image_size={smallest} or larger, a smaller kernel_size, fewer conv_layers, '
         f'or --config.padding=SAME')


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
  return config.run_name or hyperparameter_name(config)
