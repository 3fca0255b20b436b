"""Sweeps: run names and values, the agent's files, the offline loop on W&B's engine, hyperband."""

import inspect
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sweeps
from sweeps import bayes_search
from sweeps.config.schema import fill_validate_metric
import wandb
import wandb.wandb_agent
from wandb.sdk.launch.sweeps import utils as agent_utils
from wandb.sdk.lib import config_util
import yaml

from tests import conftest
from cnn import config as config_lib
from cnn import models
from cnn import sweep
from configs import default
from configs import optimal
from configs import tuned

REPO = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_SPACE = {
    'first_layer_filters': [32, 64], 'filter_org': [0.5, 1, 2], 'data_aug': [False, True],
    'batch_norm': [False, True], 'dropout': [0, 0.2, 0.3], 'kernel_size': [3, 5, 7],
    'dense_size': [32, 64, 128], 'activation': ['relu'], 'num_epochs': [50],
    'optimizer': ['adam'], 'conv_layers': [5],
}


def write_spec(path: pathlib.Path, spec: dict) -> str:
  path.write_text(yaml.safe_dump(spec))
  return str(path)


def ceiling(config) -> float:
  """The accuracy an analytic run tends to: kernel size matters most, batch norm a little."""
  return 0.3 + 0.05 * config.kernel_size + 0.02 * config.batch_norm


def analytic_train(config, workdir, *, epoch_callback=None):
  """A run without a model for the loop's bookkeeping: val_acc(e) = ceiling * (1 - 2**-e).

  Writes config.json, metrics.jsonl and summary.json as cnn.runs does and calls the
  callback at the same point (after validation, before the epoch's metrics line).
  """
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config.to_dict(), f, default=str)
  open(os.path.join(workdir, 'metrics.jsonl'), 'w').close()
  stopped, best, epoch = None, 0.0, 0
  for epoch in range(1, config.num_epochs + 1):
    acc = ceiling(config) * (1 - 2.0**-epoch)
    metrics = {'train_loss': 1 - acc, 'train_acc': acc, 'val_loss': 1 - acc, 'val_acc': acc,
               'step': epoch, 'epoch_time_s': 0.0, 'images_per_second': 1.0}
    if epoch_callback is not None and epoch_callback(epoch, metrics):
      stopped = 'callback'
    with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps({'epoch': epoch, **metrics}) + '\n')
    best = max(best, acc)
    if stopped:
      break
  summary = {'status': 'completed', 'best_val_accuracy': best, 'epochs_run': epoch,
             'stopped_early_by': stopped, 'num_params': 1000 * config.kernel_size,
             'wall_time_s': 0.5}
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f)
  return summary


def results_lines(workdir) -> list[dict]:
  with open(os.path.join(workdir, sweep.RESULTS_FILE)) as f:
    return [json.loads(line) for line in f]


def metrics_of(workdir, record) -> list[dict]:
  with open(os.path.join(workdir, record['workdir'], 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------- names and values


def test_run_name_is_the_references():
  assert config_lib.hyperparameter_name(optimal.get_config()) == (
      'filters_64_org_1_aug_True_bn_True_drop_0.2_k_3_dense_128')
  assert config_lib.hyperparameter_name(default.get_config()) == (
      'filters_32_org_1_aug_False_bn_False_drop_0_k_3_dense_64')
  c = optimal.get_config()
  c.filter_org, c.learning_rate = 0.5, 3e-4
  assert config_lib.hyperparameter_name(c, ['learning_rate']) == (
      'filters_64_org_0.5_aug_True_bn_True_drop_0.2_k_3_dense_128_learning_rate_0.0003')


def test_apply_sweep_params_converts_to_the_field_types():
  base = optimal.get_config()
  c = sweep.apply_sweep_params(base, {
      'filter_org': 1, 'dropout': 0, 'kernel_size': 5, 'batch_norm': False,
      'learning_rate': 3e-4, 'guided_bp_channels': [1, 2], 'optimizer': 'sgd'})
  assert (c.filter_org, type(c.filter_org)) == (1.0, float)
  assert (c.dropout, type(c.dropout)) == (0.0, float)
  assert (c.kernel_size, type(c.kernel_size)) == (5, int)
  assert c.batch_norm is False
  assert (c.learning_rate, type(c.learning_rate)) == (3e-4, float)
  assert c.guided_bp_channels == (1, 2)  # a JSON list for a tuple field
  assert c.optimizer == 'sgd'
  # The input is left alone.
  assert (base.kernel_size, base.batch_norm, base.dropout) == (3, True, 0.2)


@pytest.mark.parametrize('params,message', [
    ({'kernal_size': 3}, "'kernal_size' \\(did you mean 'kernel_size'\\?\\)"),
    ({'kernel_size': 2.5}, r'kernel_size=2.5 \(float\) does not fit .* kernel_size of type int'),
    ({'kernel_size': True}, 'kernel_size=True'),
    ({'dropout': None}, 'dropout=None'),
    ({'batch_norm': 2}, 'batch_norm=2'),
    ({'batch_norm': 'false'}, "batch_norm='false'"),
    ({'padding': 3}, 'padding=3'),
    ({'learning_rate': 'fast'}, "learning_rate='fast'"),
])
def test_apply_sweep_params_rejects_unknown_fields_and_misfit_values(params, message):
  with pytest.raises(sweep.SweepError, match=message):
    sweep.apply_sweep_params(optimal.get_config(), params)


# ---------------------------------------------------------------------------- `wandb agent`

AGENT_VALUES = {'first_layer_filters': 4, 'filter_org': 1, 'data_aug': False, 'batch_norm': True,
                'dropout': 0.2, 'kernel_size': 3, 'dense_size': 8, 'activation': 'relu',
                'num_epochs': 1, 'optimizer': 'adam', 'conv_layers': 2}


def write_agent_files(base_dir: pathlib.Path, sweep_id: str, run_id: str,
                      values: dict) -> tuple[pathlib.Path, pathlib.Path]:
  """The two files `wandb agent` writes for a run, made by wandb's own functions and paths."""
  command = {'args': {k: {'value': v} for k, v in values.items()}}
  folder = base_dir / 'wandb' / f'sweep-{sweep_id}'
  folder.mkdir(parents=True, exist_ok=True)
  json_path = folder / f'config-{run_id}.json'
  json_path.write_text(agent_utils.create_sweep_command_args(command)['args_json'][0])
  yaml_path = folder / f'config-{run_id}.yaml'
  config_util.save_config_file_from_dict(str(yaml_path), command['args'])
  return json_path, yaml_path


def test_the_agent_writes_args_json_file_where_and_how_we_read_it():
  # Pins this wandb version's agent: the macro exists and the file is the args_json dump.
  source = inspect.getsource(wandb.wandb_agent.Agent._command_run)
  assert '"${args_json_file}" in sweep_command' in source
  assert 'fp.write(sweep_vars["args_json"][0])' in source
  assert 'f"config-{run_id}.json"' in source and 'f"sweep-{sweep_id}"' in source
  assert 'sweep_vars["args_json_file"] = [args_json_file_path]' in source


def test_load_agent_params_reads_both_agent_files(tmp_path):
  json_path, yaml_path = write_agent_files(tmp_path, 'abc123', 'run42', AGENT_VALUES)
  assert json.loads(json_path.read_text()) == AGENT_VALUES  # the format: a flat JSON object
  assert sweep.load_agent_params(str(json_path)) == AGENT_VALUES
  assert sweep.load_agent_params(str(yaml_path)) == AGENT_VALUES
  bad = tmp_path / 'bad.json'
  bad.write_text('[1, 2]')
  with pytest.raises(sweep.SweepError, match='expected a JSON object'):
    sweep.load_agent_params(str(bad))


def test_agent_config_applies_the_values_and_names_the_run(tmp_path):
  json_path, yaml_path = write_agent_files(tmp_path, 's1', 'r1', AGENT_VALUES)
  base = optimal.get_config()
  c = sweep.agent_config(base, str(json_path), env={})
  assert (c.conv_layers, c.dense_size, c.filter_org, c.num_epochs) == (2, 8, 1.0, 1)
  assert c.run_name == 'filters_4_org_1_aug_False_bn_True_drop_0.2_k_3_dense_8'
  # Without --sweep_params, the agent's $WANDB_SWEEP_PARAM_PATH is read.
  from_env = sweep.agent_config(base, '', env={'WANDB_SWEEP_PARAM_PATH': str(yaml_path)})
  assert from_env.to_dict() == c.to_dict()
  assert sweep.agent_config(base, '', env={}) is base
  named = base.copy_and_resolve_references()
  named.run_name = 'mine'
  assert sweep.agent_config(named, str(json_path), env={}).run_name == 'mine'


@pytest.mark.parametrize('name', ['sweep.yaml', 'sweep_bayes.yaml'])
def test_yaml_command_uses_macros_the_agent_fills(name):
  spec = yaml.safe_load((REPO / 'configs' / name).read_text())
  assert spec['program'] == 'main.py'
  # The agent substitutes whole items only (`c.startswith("${") and c.endswith("}")`), and
  # writes the JSON file only when the item `${args_json_file}` is in the command.
  assert spec['command'] == ['${env}', '${interpreter}', '${program}',
                             '--config=configs/optimal.py', '--sweep_params', '${args_json_file}']
  source = inspect.getsource(wandb.wandb_agent.Agent._command_run)
  assert 'if c.startswith("${") and c.endswith("}"):' in source
  for macro in ('env', 'interpreter', 'program', 'args_json_file'):
    assert f'sweep_vars["{macro}"] = ' in source


# ---------------------------------------------------------------------------- the YAML files


@pytest.mark.parametrize('name,method,combinations', [
    ('sweep.yaml', 'random', 648), ('sweep_bayes.yaml', 'bayes', 1296)])
def test_sweep_yamls_validate_and_all_their_values_pass_the_config_check(name, method,
                                                                         combinations):
  spec = sweep.load_sweep_config(str(REPO / 'configs' / name))
  assert spec['method'] == method
  assert spec['metric'] == {'name': 'val_acc', 'goal': 'maximize'}
  for param, values in REFERENCE_SPACE.items():
    assert spec['parameters'][param]['values'] == values
  base = optimal.get_config()  # 256 px, VALID padding
  sweep.check_parameters(spec, base)
  # Every categorical combination (and both ends of learning_rate) passes cnn.config.validate.
  assert sweep.check_space(spec, base) == (combinations, 0, '')
  for i in range(10):
    params = sweep.propose(spec, [], 0, i)
    assert {type(v) for v in params.values()} <= {bool, int, float, str}  # no numpy scalars
    config_lib.validate(sweep.apply_sweep_params(base, params))
  if method == 'bayes':
    assert spec['early_terminate'] == {'type': 'hyperband', 'min_iter': 3, 'eta': 3}
    assert spec['parameters']['learning_rate']['distribution'] == 'log_uniform_values'
    lrs = [sweep.propose(spec, [], 0, i)['learning_rate'] for i in range(10)]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs)


@pytest.mark.parametrize('filters,org', [(64, 2.0), (32, 0.5)])
def test_the_extreme_sampled_models_build_at_256px(filters, org):
  # Kernel 7 shrinks the map most: 256 -> 250/2=125 -> 119/2=59 -> 53/2=26 -> 20/2=10 -> 4/2=2.
  c = sweep.apply_sweep_params(optimal.get_config(), {
      'first_layer_filters': filters, 'filter_org': org, 'kernel_size': 7, 'dense_size': 128,
      'batch_norm': False})
  model = models.create_model(c, 10)
  variables = jax.eval_shape(lambda k: models.init_variables(model, 256, k), jax.random.PRNGKey(0))
  logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 256, 256, 3))), variables)
  assert logits.shape == (2, 10)
  widths = [int(filters * org**i) for i in range(5)]
  conv = sum(7 * 7 * cin * cout + cout for cin, cout in zip([3] + widths[:-1], widths))
  dense = 2 * 2 * widths[-1] * 128 + 128 + 128 * 10 + 10
  assert models.count_parameters(variables['params']) == conv + dense


def test_the_config_check_announces_kernels_too_big_for_small_images():
  spec = sweep.load_sweep_config(str(REPO / 'configs' / 'sweep.yaml'))
  base = optimal.get_config()
  base.image_size = 64  # VALID: 5 blocks of kernel 3 already shrink 64 px to nothing
  total, rejected, first = sweep.check_space(spec, base)
  assert (total, rejected) == (648, 648)
  assert 'too small' in first and 'padding=SAME' in first
  base.padding = 'SAME'  # the setting of the CPU sweep in the README
  assert sweep.check_space(spec, base) == (648, 0, '')


def test_sweep_config_errors_are_clear(tmp_path):
  bad = write_spec(tmp_path / 'bad.yaml', {'method': 'annealing', 'parameters': {'a': {}}})
  with pytest.raises(sweep.SweepError, match='not a valid W&B sweep config'):
    sweep.load_sweep_config(bad)
  spec = {'method': 'random', 'parameters': {'cache_dir': {'values': ['a', 'b']}}}
  with pytest.raises(sweep.SweepError, match='cache_dir cannot be swept'):
    sweep.check_parameters(spec, default.get_config())
  spec = {'method': 'random', 'parameters': {'kernel_size': {'values': [3, 4.5]}}}
  with pytest.raises(sweep.SweepError, match='kernel_size=4.5'):
    sweep.check_parameters(spec, default.get_config())


# ---------------------------------------------------------------------------- the engine


SMALL_SPACE = {'kernel_size': {'values': [3, 5, 7]}, 'batch_norm': {'values': [False, True]},
               'learning_rate': {'distribution': 'log_uniform_values', 'min': 1e-4, 'max': 1e-2},
               'num_epochs': {'value': 4}}


def analytic_base():
  c = default.get_config()
  c.wandb_mode = 'disabled'
  return c


def test_engine_runs_carry_the_history_that_bayes_uses(tmp_path):
  spec = {'method': 'random', 'metric': {'name': 'val_acc', 'goal': 'maximize'},
          'parameters': SMALL_SPACE}
  workdir = str(tmp_path / 'w')
  sweep.run_sweep(analytic_base(), workdir, sweep_config_path=write_spec(tmp_path / 's.yaml', spec),
                  sweep_count=4, overrides=(), train_fn=analytic_train, report=False)
  records = {r['run']: r for r in sweep.read_results(workdir)}
  runs = sweep.engine_runs(workdir)
  assert sorted(r.name for r in runs) == sorted(records)
  best = []
  for run in runs:
    logged = [m['val_acc'] for m in metrics_of(workdir, records[run.name])]
    assert len(logged) == 4
    assert run.metric_history('val_acc') == logged  # not silently dropped by pydantic 2
    assert run.summary_metrics['val_acc'] == logged[-1]
    assert {k: v['value'] for k, v in run.config.items()} == records[run.name]['params']
    best.append(max(logged))
  # What bayes fits its Gaussian process to: every run's best val_acc (negated, it minimises).
  bayes_spec = fill_validate_metric({**spec, 'method': 'bayes'})
  _, sample_x, _, y, _ = bayes_search._construct_gp_data(runs, bayes_spec)
  assert sample_x.shape == (4, 3)
  np.testing.assert_allclose(y, -np.asarray(best))


def test_bayes_proposes_from_past_results():
  spec = {'method': 'bayes', 'metric': {'name': 'val_acc', 'goal': 'maximize'},
          'parameters': {'dropout': {'min': 0.0, 'max': 1.0}}}
  f = lambda x: 0.9 - (x - 0.62)**2  # the best dropout is 0.62, between the tried 0.5 and 0.8
  xs = [0.05, 0.2, 0.35, 0.5, 0.8, 0.95]
  seen = [sweeps.SweepRun(name=str(x), state=sweeps.RunState.finished,
                          config={'dropout': {'value': x}},
                          sampledHistory=[{'val_acc': f(x)}], summaryMetrics={'val_acc': f(x)})
          for x in xs]
  blind = [sweeps.SweepRun(name=str(x), state=sweeps.RunState.finished,
                           config={'dropout': {'value': x}}) for x in xs]
  informed = [sweep.propose(spec, seen, seed, 6)['dropout'] for seed in range(4)]
  assert all(abs(x - 0.62) < 0.1 for x in informed), informed
  unaware = [sweep.propose(spec, blind, seed, 6)['dropout'] for seed in range(4)]
  assert any(abs(x - 0.62) > 0.1 for x in unaware), unaware


def test_offline_sweep_continues_draws_the_same_runs_and_refuses_another_spec(tmp_path):
  spec = {'method': 'random', 'metric': {'name': 'val_acc', 'goal': 'maximize'},
          'parameters': SMALL_SPACE}
  path = write_spec(tmp_path / 's.yaml', spec)
  one_go = str(tmp_path / 'one_go')
  sweep.run_sweep(analytic_base(), one_go, sweep_config_path=path, sweep_count=5, overrides=(),
                  train_fn=analytic_train, report=False)
  split = str(tmp_path / 'split')
  for count in (2, 5, 5):
    sweep.run_sweep(analytic_base(), split, sweep_config_path=path, sweep_count=count,
                    overrides=(), train_fn=analytic_train, report=False)
  a, b = results_lines(one_go), results_lines(split)
  assert len(b) == 5
  assert [r['params'] for r in a] == [r['params'] for r in b]  # seeded by (seed, run index)
  assert len({json.dumps(r['params'], sort_keys=True) for r in b}) == 5
  for r in b:
    assert r['state'] == 'finished' and r['epochs'] == 4
    c = sweep.apply_sweep_params(analytic_base(), r['params'])
    assert r['best_val_acc'] == pytest.approx(ceiling(c) * (1 - 2.0**-4))
  spec['parameters']['kernel_size'] = {'values': [3, 5]}
  with pytest.raises(sweep.SweepError, match='holds a sweep started with other settings'):
    sweep.run_sweep(analytic_base(), split, sweep_config_path=write_spec(tmp_path / 't.yaml', spec),
                    sweep_count=6, overrides=(), train_fn=analytic_train, report=False)


def test_an_interrupted_run_is_resumed_by_the_next_invocation(tmp_path):
  spec = {'method': 'grid', 'metric': {'name': 'val_acc', 'goal': 'maximize'},
          'parameters': {'kernel_size': {'values': [3, 5, 7]}, 'num_epochs': {'value': 3}}}
  path = write_spec(tmp_path / 's.yaml', spec)
  workdir = str(tmp_path / 'w')
  calls = []

  def interrupted_on_kernel_5(config, run_dir, *, epoch_callback=None):
    calls.append(config.kernel_size)
    if config.kernel_size == 5 and calls.count(5) == 1:
      raise KeyboardInterrupt  # Ctrl-C mid-run: not a failure of the run
    return analytic_train(config, run_dir, epoch_callback=epoch_callback)

  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(analytic_base(), workdir, sweep_config_path=path, sweep_count=3,
                    overrides=(), train_fn=interrupted_on_kernel_5, report=False)
  assert [r['params']['kernel_size'] for r in results_lines(workdir)] == [3]
  sweep.run_sweep(analytic_base(), workdir, sweep_config_path=path, sweep_count=3, overrides=(),
                  train_fn=interrupted_on_kernel_5, report=False)
  records = results_lines(workdir)
  assert [r['params']['kernel_size'] for r in records] == [3, 5, 7]
  assert [r['state'] for r in records] == ['finished'] * 3
  assert calls == [3, 5, 5, 7]
  assert len(os.listdir(os.path.join(workdir, sweep.RUNS_DIR))) == 3  # resumed in place


# The analytic run's functions are copied in by source: a test module is never imported.
WORKER = '\n'.join(['import json, os, sys, time', 'from cnn import sweep',
                     'from configs import default'] +
                    [inspect.getsource(f) for f in (ceiling, analytic_train, analytic_base)]) + """
workdir, spec_path, name = sys.argv[1:]
open(os.path.join(workdir, name + '.ready'), 'w').close()
while not os.path.exists(os.path.join(workdir, 'go')):
  time.sleep(0.05)
def slow_train(config, run_dir, *, epoch_callback=None):
  time.sleep(0.5)  # long enough for the other worker to draw meanwhile
  return analytic_train(config, run_dir, epoch_callback=epoch_callback)
sweep.run_sweep(analytic_base(), workdir, sweep_config_path=spec_path, sweep_count=6,
                overrides=(), train_fn=slow_train, report=False)
"""


def test_two_workers_share_one_sweep_directory(tmp_path):
  spec = {'method': 'random', 'metric': {'name': 'val_acc', 'goal': 'maximize'},
          'parameters': SMALL_SPACE}
  path = write_spec(tmp_path / 's.yaml', spec)
  workdir = tmp_path / 'w'
  workdir.mkdir()
  procs = [subprocess.Popen([sys.executable, '-c', WORKER, str(workdir), path, f'worker{i}'],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  deadline = time.time() + 120
  while not all((workdir / f'worker{i}.ready').exists() for i in range(2)):
    assert time.time() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.05)
  (workdir / 'go').touch()
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs
  records = results_lines(workdir)
  assert len(records) == 6  # together exactly sweep_count runs
  assert sorted(r['index'] for r in records) == list(range(6))
  assert len({r['run'] for r in records}) == 6
  assert len(os.listdir(workdir / sweep.RUNS_DIR)) == 6
  assert all('sweep: run ' in out for out in outputs), outputs  # both drew runs


def test_command_line_overrides_pin_fixed_parameters_and_clash_with_searched_ones(tmp_path):
  spec = {'method': 'random', 'metric': {'name': 'val_acc', 'goal': 'maximize'},
          'parameters': {'kernel_size': {'values': [3, 5]}, 'num_epochs': {'values': [50]}}}
  path = write_spec(tmp_path / 's.yaml', spec)
  base = analytic_base()
  base.num_epochs = 3
  sweep.run_sweep(base, str(tmp_path / 'a'), sweep_config_path=path, sweep_count=2,
                  overrides=('num_epochs', 'image_size'), train_fn=analytic_train, report=False)
  assert [r['epochs'] for r in results_lines(tmp_path / 'a')] == [3, 3]
  with pytest.raises(sweep.SweepError, match='--config.kernel_size .* searches kernel_size'):
    sweep.run_sweep(base, str(tmp_path / 'b'), sweep_config_path=path, sweep_count=2,
                    overrides=('kernel_size',), train_fn=analytic_train, report=False)


def test_hyperband_stops_a_clearly_worse_run(tmp_path):
  # Grid order: kernel 7 (ceiling 0.65), 5 (0.55), then 3 (0.45), 8 epochs each.
  spec = {'method': 'grid', 'metric': {'name': 'val_acc', 'goal': 'maximize'},
          'early_terminate': {'type': 'hyperband', 'min_iter': 2, 'eta': 2},
          'parameters': {'kernel_size': {'values': [7, 5, 3]}, 'num_epochs': {'value': 8}}}
  workdir = str(tmp_path / 'w')
  sweep.run_sweep(analytic_base(), workdir, sweep_config_path=write_spec(tmp_path / 's.yaml', spec),
                  sweep_count=3, overrides=(), train_fn=analytic_train, report=False)
  k7, k5, k3 = results_lines(workdir)
  acc = lambda ceil, epoch: ceil * (1 - 2.0**-epoch)
  # Bands 2, 4, 8: a run is judged once it has logged more than `band` values, i.e. at epoch 3.
  # There the threshold is the top 1/eta = half: with 3 runs, the second best (kernel 5).
  # Two runs alone never stop the worse one: its own value is the threshold.
  assert (k7['state'], k7['epochs']) == ('finished', 8)
  assert (k5['state'], k5['epochs']) == ('finished', 8)
  assert (k3['state'], k3['epochs']) == ('stopped', 3)
  assert k3['hyperband']['band'] == 2
  assert k3['hyperband']['threshold'] == pytest.approx(acc(0.55, 3))
  assert k3['best_val_acc'] == pytest.approx(acc(0.45, 3))
  assert len(metrics_of(workdir, k3)) == 3
  # The same decision from the engine itself, fed the stored histories.
  runs = sweep.engine_runs(workdir)
  for run in runs:
    run.state = sweeps.RunState.running
  stopped = sweeps.stop_runs(spec, runs)
  assert [r.name for r in stopped] == [k3['run']]


# ---------------------------------------------------------------------------- real training


TINY_SPACE = {'first_layer_filters': {'values': [2, 4]}, 'dense_size': {'values': [4, 8]},
              'batch_norm': {'values': [False, True]}, 'dropout': {'values': [0, 0.2]},
              'num_epochs': {'value': 2}}


@pytest.mark.slow
def test_offline_sweep_on_tiny_data_then_one_more_run(tiny_config, tmp_path):
  spec = {'name': 'tiny', 'method': 'random', 'metric': {'name': 'val_acc', 'goal': 'maximize'},
          'parameters': TINY_SPACE}
  path = write_spec(tmp_path / 'tiny.yaml', spec)
  workdir = str(tmp_path / 'sweep')
  sweep.run_sweep(tiny_config, workdir, sweep_config_path=path, sweep_count=3, overrides=())
  first = results_lines(workdir)
  assert len(first) == 3
  assert len({json.dumps(r['params'], sort_keys=True) for r in first}) == 3
  for r in first:
    assert r['state'] == 'finished' and r['error'] is None and r['epochs'] == 2
    run_dir = os.path.join(workdir, r['workdir'])
    with open(os.path.join(run_dir, 'config.json')) as f:
      trained = json.load(f)
    for k, v in r['params'].items():
      assert trained[k] == v
    assert trained['run_name'] == os.path.basename(run_dir) == r['run']
    assert trained['cache_dir'] == tiny_config.cache_dir  # one shared decoded-image cache
    accs = [m['val_acc'] for m in metrics_of(workdir, r)]
    assert (r['best_val_acc'], r['final_val_acc']) == (max(accs), accs[-1])
    with open(os.path.join(run_dir, 'summary.json')) as f:
      assert json.load(f)['best_val_accuracy'] == pytest.approx(r['best_val_acc'])
  report = os.path.join(workdir, 'report')
  for name in ('val_acc_vs_created.png', 'parallel_coordinates.png',
               'parameter_importance.png', 'summary.md', 'best_config.py'):
    assert os.path.getsize(os.path.join(report, name)) > 0

  sweep.run_sweep(tiny_config, workdir, sweep_config_path=path, sweep_count=4, overrides=())
  second = results_lines(workdir)
  assert len(second) == 4 and second[:3] == first
  assert second[3]['params'] not in [r['params'] for r in first]
  assert second[3]['state'] == 'finished'


@pytest.mark.slow
def test_offline_sweep_logs_each_run_to_wandb_offline(tiny_config, tmp_path):
  spec = {'name': 'wbgroup', 'method': 'grid', 'metric': {'name': 'val_acc', 'goal': 'maximize'},
          'parameters': {'dense_size': {'values': [4, 8]}, 'num_epochs': {'value': 1}}}
  tiny_config.wandb_mode = ''  # auto: offline in an offline sweep, credentials or not
  workdir = tmp_path / 'sweep'
  # A wandb session started before the sweep (as an earlier test leaves one) groups the sweep's
  # runs, and the runs after the sweep are not grouped.
  session = wandb.setup().settings
  before = (session.run_group, session.run_job_type)
  sweep.run_sweep(tiny_config, str(workdir), sweep_count=2, overrides=(),
                  sweep_config_path=write_spec(tmp_path / 's.yaml', spec))
  session = wandb.setup().settings
  assert (session.run_group, session.run_job_type) == before  # later runs are not grouped
  records = results_lines(workdir)
  assert [r['state'] for r in records] == ['finished', 'finished'], records
  for r in records:
    run_dirs = list((workdir / r['workdir'] / 'wandb').glob('offline-run-*'))
    assert len(run_dirs) == 1  # one W&B run per sweep run, kept beside it for `wandb sync`
    run = [x.run for x in conftest.finished_wandb_records(run_dirs[0])
           if x.WhichOneof('record_type') == 'run'][-1]
    assert (run.display_name, run.run_group, run.job_type) == (r['run'], 'wbgroup', 'sweep')
    assert r['config']['wandb_mode'] == 'offline'


@pytest.mark.slow
def test_failed_runs_are_recorded_and_the_sweep_goes_on(tiny_config, tmp_path):
  # Grid order: (kernel 31, lr 1e9), (31, 1e-3): rejected by the config check before training;
  # (3, 1e9): diverges in training; (3, 1e-3): trains.
  spec = {'method': 'grid', 'metric': {'name': 'val_acc', 'goal': 'maximize'},
          'parameters': {'kernel_size': {'values': [31, 3]},
                         'learning_rate': {'values': [1e9, 1e-3]}, 'num_epochs': {'value': 1}}}
  workdir = str(tmp_path / 'sweep')
  sweep.run_sweep(tiny_config, workdir, sweep_config_path=write_spec(tmp_path / 's.yaml', spec),
                  sweep_count=10, overrides=())
  records = results_lines(workdir)
  assert [(r['params']['kernel_size'], r['params']['learning_rate']) for r in records] == [
      (31, 1e9), (31, 1e-3), (3, 1e9), (3, 1e-3)]
  assert [r['state'] for r in records] == ['failed', 'failed', 'failed', 'finished']
  for r in records[:2]:
    assert r['error'].startswith('ConfigError: image_size=32 is too small')
    assert r['epochs'] == 0 and r['best_val_acc'] is None
  assert records[2]['error'].startswith(
      'TrainingDiverged: the training loss or parameters became NaN/inf')
  with open(os.path.join(workdir, records[2]['workdir'], 'error.txt')) as f:
    assert 'Traceback' in f.read()
  assert records[3]['error'] is None and records[3]['best_val_acc'] > 0
  with open(os.path.join(workdir, 'report', 'summary.md')) as f:
    summary = f.read()
  assert '1 finished, 0 stopped early by hyperband, 3 failed' in summary
  assert 'TrainingDiverged' in summary


@pytest.mark.slow
def test_wandb_agent_command_runs_main_with_the_agent_values(tiny_config, tmp_path):
  """main.py run exactly as `wandb agent` runs the YAML's command, offline, without a server."""
  if not (REPO / 'main.py').exists():
    pytest.fail('main.py is missing')
  spec = yaml.safe_load((REPO / 'configs' / 'sweep.yaml').read_text())
  sweep_id, run_id = 'offlinetest', 'run0001'
  json_path, yaml_path = write_agent_files(tmp_path, sweep_id, run_id, AGENT_VALUES)
  # The command as wandb_agent.Agent._command_run builds it, run from a checkout-like folder.
  (tmp_path / 'main.py').symlink_to(REPO / 'main.py')
  (tmp_path / 'configs').symlink_to(REPO / 'configs')
  sweep_vars = agent_utils.create_sweep_command_args(
      {'args': {k: {'value': v} for k, v in AGENT_VALUES.items()}})
  sweep_vars.update(interpreter=['python'], program=[spec['program']],
                    args_json_file=[str(json_path)], env=['/usr/bin/env'])
  command = []
  for c in agent_utils.create_sweep_command(spec['command']):
    c = str(c)
    if c.startswith('${') and c.endswith('}'):
      command += sweep_vars.get(c[2:-1]) or []
    else:
      command += [c]
  assert command[:6] == ['/usr/bin/env', 'python', 'main.py', '--config=configs/optimal.py',
                         '--sweep_params', str(json_path)]
  command += [f'--config.data_dir={tiny_config.data_dir}',
              f'--config.cache_dir={tiny_config.cache_dir}', '--config.download=False',
              '--config.image_size=32', '--config.batch_size=8', '--config.wandb_mode=offline']
  env = {**os.environ, 'PATH': f'{pathlib.Path(sys.executable).parent}:{os.environ["PATH"]}',
         'WANDB_SWEEP_ID': sweep_id, 'WANDB_RUN_ID': run_id, 'WANDB_DIR': str(tmp_path),
         'WANDB_SWEEP_PARAM_PATH': str(yaml_path), 'WANDB_SILENT': 'true'}
  proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  name = 'filters_4_org_1_aug_False_bn_True_drop_0.2_k_3_dense_8'
  workdir = tmp_path / 'workdirs' / f'sweep-{sweep_id}' / f'{name}-{run_id}'
  trained = json.loads((workdir / 'config.json').read_text())
  for k, v in AGENT_VALUES.items():
    assert trained[k] == v and type(trained[k]) is type(getattr(default.get_config(), k))
  assert trained['run_name'] == name
  assert trained['image_size'] == 32  # command-line overrides still apply
  assert len((workdir / 'metrics.jsonl').read_text().splitlines()) == 1
  offline_runs = list((workdir / 'wandb').glob(f'offline-run-*-{run_id}'))
  assert len(offline_runs) == 1  # W&B offline, under the agent's run id
  # The run's record inside the .wandb file is not checked here: under the agent's environment
  # wandb's service sometimes writes that file only after this test gives up (seen in CI).
  assert (offline_runs[0] / 'files').is_dir()


@pytest.mark.slow
def test_main_sweep_and_sweep_report_modes(tiny_config, tmp_path):
  """The offline sweep from the command line: --config.* overrides pin the YAML's fixed values."""
  spec = {'name': 'cli', 'method': 'random', 'metric': {'name': 'val_acc', 'goal': 'maximize'},
          'parameters': {'dense_size': {'values': [4, 8]}, 'num_epochs': {'values': [50]}}}
  path = write_spec(tmp_path / 'cli.yaml', spec)
  workdir = tmp_path / 'sweep'
  command = [sys.executable, 'main.py', '--mode=sweep', '--config=configs/default.py',
             f'--sweep_config={path}', '--sweep_count=2', f'--workdir={workdir}',
             f'--config.data_dir={tiny_config.data_dir}',
             f'--config.cache_dir={tiny_config.cache_dir}',
             '--config.download=False', '--config.image_size=32', '--config.conv_layers=2',
             '--config.first_layer_filters=4', '--config.batch_size=8', '--config.num_epochs=1',
             '--config.wandb_mode=disabled']
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  records = results_lines(workdir)
  assert sorted(r['params']['dense_size'] for r in records) == [4, 8]
  assert all(r['params']['num_epochs'] == 1 and r['epochs'] == 1 for r in records)
  shutil.rmtree(workdir / 'report')
  proc = subprocess.run([sys.executable, 'main.py', '--mode=sweep_report', f'--workdir={workdir}'],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  summary = (workdir / 'report' / 'summary.md').read_text()
  assert '2 runs: 2 finished' in summary


def test_each_run_header_says_where_the_sweep_stands():
  claim = {'index': 2, 'run': 'bs32-lr0.001'}
  assert sweep._run_header(claim, 20, []) == 'sweep: run 3/20: bs32-lr0.001'
  ended = [{'wall_time_s': 600.0}, {'wall_time_s': 660.0}, {'state': 'failed'}]
  assert sweep._run_header(claim, 20, ended) == (
      'sweep: run 3/20: bs32-lr0.001 (3 ended, 10.5 min a run)')


def test_sweep_tuned_yaml_is_bayes_with_hyperband_and_all_its_values_pass_the_config_check():
  spec = sweep.load_sweep_config(str(REPO / 'configs' / 'sweep_tuned.yaml'))
  assert spec['method'] == 'bayes' and spec['metric'] == {'name': 'val_acc', 'goal': 'maximize'}
  assert spec['early_terminate'] == {'type': 'hyperband', 'min_iter': 3, 'eta': 3}
  assert '--config=configs/tuned.py' in spec['command']
  base = tuned.get_config()
  sweep.check_parameters(spec, base)
  # Its recipe knobs, not the architecture, are what it searches.
  assert {'aug_erase', 'ema_epochs', 'label_smoothing', 'weight_decay'} <= set(spec['parameters'])
  assert not {'first_layer_filters', 'filter_org'} & set(spec['parameters'])
  total, rejected, first = sweep.check_space(spec, base)
  assert (total, rejected, first) == (5000, 0, '')  # the first 5000 combinations, all valid
  for i in range(10):
    config_lib.validate(sweep.apply_sweep_params(base, sweep.propose(spec, [], 0, i)))
