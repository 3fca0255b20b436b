"""Every message of cnn.config.validate, and a config field the command line gets wrong."""

import os
import subprocess
import sys

import pytest

from cnn import activations
from cnn import config as config_lib
from cnn import runs
from cnn import trainer
from configs import default
from configs import optimal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  c = default.get_config()
  c.update(overrides)
  return c


def _error(**overrides) -> str:
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(_config(**overrides))
  return str(e.value)


def test_shipped_configs_are_valid():
  config_lib.validate(default.get_config())
  config_lib.validate(optimal.get_config())


# Smallest side whose last block keeps one pixel, worked backwards by hand: a pool needs 2
# pixels in, a VALID k x k conv needs k - 1 more. 5 blocks of k=3 VALID: 1 <- 2 <- 4 <- 8 <- 10
# <- 20 <- 22 <- 44 <- 46 <- 92 <- 94. 3 blocks of k=5 VALID: 1 <- 2 <- 6 <- 12 <- 16 <- 32 <- 36.
# SAME only pools: 2**conv_layers.
@pytest.mark.parametrize('kernel_size, padding, conv_layers, smallest', [
    (3, 'VALID', 5, 94), (5, 'VALID', 3, 36), (3, 'SAME', 5, 32), (7, 'VALID', 1, 8)])
def test_spatial_collapse_names_the_smallest_image_size_that_works(kernel_size, padding,
                                                                   conv_layers, smallest):
  assert config_lib.min_image_size(kernel_size, padding, conv_layers) == smallest
  fields = dict(kernel_size=kernel_size, padding=padding, conv_layers=conv_layers)
  message = _error(image_size=smallest - 1, **fields)
  assert f'image_size={smallest - 1} is too small' in message
  assert f'--config.image_size={smallest} or larger' in message
  config_lib.validate(_config(image_size=smallest, **fields))


def test_unknown_activation_lists_the_known_ones():
  message = _error(activation='swish')
  assert "unknown activation 'swish'" in message
  for name in ('relu', 'gelu', 'silu', 'elu', 'leaky_relu', 'mish', 'tanh'):
    assert name in message
  # The backprop-only variants are not activations to train with.
  assert 'guided_relu' not in message
  assert "unknown activation 'guided_relu'" in _error(activation='guided_relu')
  for name in activations.TRAINABLE_ACTIVATIONS:
    config_lib.validate(_config(activation=name))


def test_unknown_optimizer_lists_the_known_ones():
  message = _error(optimizer='adagrad')
  assert message == "unknown optimizer 'adagrad'; known: adam, adamw, nadam, sgd, rmsprop"
  for name in config_lib.OPTIMIZERS:
    config_lib.validate(_config(optimizer=name))
    trainer.optimizer(name, 0.9)  # every accepted name really builds


def test_filters_that_round_to_zero_name_the_block():
  # int(4 * 0.5**i) for i = 0..4 is 4, 2, 1, 0, 0: block 4 is the first without filters.
  message = _error(first_layer_filters=4, filter_org=0.5, conv_layers=5)
  assert 'filters per block [4, 2, 1, 0, 0]' in message
  assert 'rounds to 0 by block 4' in message
  assert 'raise first_layer_filters or filter_org or lower conv_layers' in message
  config_lib.validate(_config(first_layer_filters=16, filter_org=0.5, conv_layers=5))
  assert 'filter_org=0.0 must be positive' in _error(filter_org=0.0)


@pytest.mark.parametrize('dropout', [-0.1, 1.0, 1.5])
def test_dropout_outside_zero_one(dropout):
  assert _error(dropout=dropout) == f'dropout={dropout} must be in [0, 1), e.g. 0.2'


@pytest.mark.parametrize('dropout', [0.0, 0.5, 0.99])
def test_dropout_inside_zero_one_is_fine(dropout):
  config_lib.validate(_config(dropout=dropout))


@pytest.mark.parametrize('field', ['batch_size', 'num_epochs', 'eval_batch_size', 'image_size',
                                   'dense_size', 'kernel_size', 'conv_layers'])
@pytest.mark.parametrize('value', [0, -3])
def test_non_positive_sizes_and_counts(field, value):
  assert _error(**{field: value}) == f'{field}={value} must be a positive integer'


@pytest.mark.parametrize('lr', [0.0, -1e-3])
def test_non_positive_learning_rate(lr):
  assert _error(learning_rate=lr) == f'learning_rate={lr} must be positive, e.g. 1e-3'


def test_unknown_padding():
  message = _error(padding='FULL')
  assert message == ("padding='FULL' is not one of ('VALID', 'SAME'); use --config.padding=VALID "
                     'or SAME')
  config_lib.validate(_config(padding='same'))  # case does not matter


def test_other_fields():
  assert "dtype='float16'" in _error(dtype='float16')
  assert "wandb_mode='on'" in _error(wandb_mode='on')
  assert 'holdout_fraction=0.0 must be in (0, 1)' in _error(holdout_fraction=0.0)
  assert 'early_stopping_patience=-1 must be >= 0' in _error(early_stopping_patience=-1)


def test_a_bad_config_fails_before_any_data_is_read(tmp_path):
  config = _config(activation='swish', data_dir=str(tmp_path / 'no_data'), download=True,
                   dataset_url='http://127.0.0.1:9/never.zip')
  with pytest.raises(config_lib.ConfigError, match="unknown activation 'swish'"):
    runs.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists() and not (tmp_path / 'no_data').exists()


def _main(*args):
  return subprocess.run([sys.executable, 'main.py', *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=300)


def test_unknown_field_on_the_command_line_is_one_clear_line(tmp_path):
  r = _main('--config=configs/default.py', '--config.no_such_field=1', f'--workdir={tmp_path}/w')
  assert r.returncode != 0
  assert 'Traceback' not in r.stderr, r.stderr[-3000:]
  assert '--config.no_such_field' in r.stderr and 'not a field' in r.stderr, r.stderr[-3000:]
  assert 'configs/default.py' in r.stderr  # where the known fields are listed
  assert not (tmp_path / 'w').exists()


def test_misspelt_field_on_the_command_line_suggests_the_right_one(tmp_path):
  r = _main('--config=configs/default.py', '--config.image_sise=64', f'--workdir={tmp_path}/w')
  assert r.returncode != 0 and 'Traceback' not in r.stderr, r.stderr[-3000:]
  assert '--config.image_sise' in r.stderr and 'image_size' in r.stderr.replace('image_sise', '')


def test_bad_value_on_the_command_line_reaches_validate(tmp_path):
  r = _main('--config=configs/default.py', '--config.optimizer=adagrad', f'--workdir={tmp_path}/w')
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == (
      "error: unknown optimizer 'adagrad'; known: adam, adamw, nadam, sgd, rmsprop")
  assert not (tmp_path / 'w').exists()


def test_every_field_with_a_role_is_a_field():
  fields = set(config_lib.default_config().keys())
  assert config_lib.NON_RUN_FIELDS - fields == set(), 'not fields of cnn/config.py'
  assert set(trainer.OPTIMIZERS) == set(config_lib.OPTIMIZERS)


def test_field_roles_nest_shared_in_machine_in_non_run():
  assert config_lib.UNSWEEPABLE_FIELDS <= config_lib.NON_REPORT_FIELDS <= config_lib.NON_RUN_FIELDS
  assert {'cache_dir', 'wandb_project'} <= config_lib.UNSWEEPABLE_FIELDS
  assert 'data_dir' in config_lib.NON_REPORT_FIELDS - config_lib.UNSWEEPABLE_FIELDS
  assert 'num_epochs' in config_lib.NON_RUN_FIELDS - config_lib.NON_REPORT_FIELDS
  assert 'learning_rate' not in config_lib.NON_RUN_FIELDS


def test_run_fields_are_json_values_of_the_run_defining_fields():
  c = _config(guided_bp_channels=(1, 2), num_epochs=3)
  fields = config_lib.run_fields(c)
  assert set(fields) == set(c.keys()) - config_lib.NON_RUN_FIELDS
  assert fields == config_lib.run_fields(c.to_dict())
  # As read back from config.json: tuples are lists there; non-run fields are dropped.
  assert config_lib.run_fields({'seed': 1, 'num_epochs': 9, 'old_field': (1,)}) == {
      'seed': 1, 'old_field': [1]}


def test_config_diff_lists_changed_fields_in_order():
  old = config_lib.run_fields(_config())
  assert config_lib.config_diff(old, old) == ''
  new = config_lib.run_fields(_config(seed=3, kernel_size=5))
  assert config_lib.config_diff(old, new) == 'kernel_size: 3 -> 5, seed: 0 -> 3'
  assert config_lib.config_diff({'a': 1}, {}) == 'a: 1 -> None'


def test_flags_to_restore_set_each_changed_field_back_as_the_config_flags_parse_it():
  old = {'num_epochs': 30, 'lr_schedule': 'cosine', 'guided_bp_channels': [1, 2], 'seed': 0}
  new = {'num_epochs': 38, 'lr_schedule': 'constant', 'guided_bp_channels': [], 'seed': 0}
  assert config_lib.flags_to_restore(old, new) == (
      "'--config.guided_bp_channels=(1, 2)' --config.lr_schedule=cosine --config.num_epochs=30")
  assert config_lib.flags_to_restore(old, old) == ''


def test_ema_of_the_weights_needs_its_own_batch_statistics():
  assert 'ema_epochs=-1.0 must be >= 0' in _error(ema_epochs=-1.0)
  message = _error(ema_epochs=2.0, batch_norm=True, bn_stats='running')
  assert "ema_epochs needs bn_stats='precise' with batch_norm" in message
  assert '--config.bn_stats=precise' in message and '--config.ema_epochs=0 ' in message
  config_lib.validate(_config(ema_epochs=2.0, batch_norm=False, bn_stats='running'))
  config_lib.validate(_config(ema_epochs=2.0, batch_norm=True, bn_stats='precise'))


@pytest.mark.parametrize('field,value,message', [
    ('aug_rotation', -5.0, 'aug_rotation=-5.0 must be >= 0'),
    ('aug_zoom', 1.0, 'must be below 1'),
    ('aug_crop_min_scale', 0.0, 'aug_crop_min_scale=0.0 must be in (0, 1]'),
    ('aug_erase', 1.5, 'aug_erase=1.5 must be a probability in [0, 1]'),
    ('aug_erase', -0.1, 'aug_erase=-0.1 must be a probability in [0, 1]')])
def test_augmentation_strengths_out_of_range_are_refused(field, value, message):
  assert message in _error(**{field: value})
