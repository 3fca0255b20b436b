"""The sweep report: importance and correlation, parallel-coordinate axes, plots, summary.md."""

import datetime
import json
import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from cnn import config as config_lib
from cnn import sweep
from cnn import sweep_report
from configs import default

SPEC = {
    'name': 'synthetic', 'method': 'random', 'metric': {'name': 'val_acc', 'goal': 'maximize'},
    'parameters': {
        'kernel_size': {'values': [3, 5, 7]}, 'batch_norm': {'values': [False, True]},
        'optimizer': {'values': ['adam', 'sgd', 'rmsprop']},
        'learning_rate': {'distribution': 'log_uniform_values', 'min': 1e-4, 'max': 1e-2},
        'activation': {'values': ['relu']}, 'num_epochs': {'value': 3}},
}


def synthetic_records(n: int = 12) -> list[dict]:
  """Runs whose val_acc is set by kernel_size alone (plus a little from batch_norm)."""
  rng = np.random.default_rng(0)
  start = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
  records = []
  for i in range(n):
    params = {'kernel_size': [3, 5, 7][i % 3], 'batch_norm': bool(i % 2),
              'optimizer': ['adam', 'sgd', 'rmsprop'][(i // 3) % 3],
              'learning_rate': float(10**rng.uniform(-4, -2)), 'activation': 'relu',
              'num_epochs': 3}
    acc = 0.1 * params['kernel_size'] + 0.01 * params['batch_norm']
    config = default.get_config().to_dict()
    config.update(params, data_dir='/somewhere/data', wandb_mode='offline')
    name = f'run_{i:02d}'
    config['run_name'] = name
    records.append({
        'run': name, 'index': i, 'params': params, 'config': config, 'state': 'finished',
        'error': None, 'best_val_acc': acc, 'final_val_acc': acc - 0.01, 'best_epoch': 2,
        'epochs': 3, 'num_params': 1000, 'hyperband': None, 'wall_time_s': 60.0 * (i + 1),
        'workdir': os.path.join(sweep.RUNS_DIR, name),
        'created': (start + datetime.timedelta(minutes=5 * i)).isoformat(),
        'ended': (start + datetime.timedelta(minutes=5 * i + 4)).isoformat()})
  return records


def write_sweep(workdir, records: list[dict], spec: dict = SPEC) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, sweep.SPEC_FILE), 'w') as f:
    json.dump({'spec': spec, 'base_config': default.get_config().to_dict()}, f)
  with open(os.path.join(workdir, sweep.RESULTS_FILE), 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
  for r in records:
    run_dir = os.path.join(workdir, r['workdir'])
    os.makedirs(run_dir, exist_ok=True)
    if r['best_val_acc'] is None:
      continue
    with open(os.path.join(run_dir, 'metrics.jsonl'), 'w') as f:
      for e, acc in enumerate([r['best_val_acc'] - 0.2, r['best_val_acc'], r['final_val_acc']]):
        f.write(json.dumps({'epoch': e + 1, 'val_acc': acc}) + '\n')


def test_searched_parameters_are_the_varying_ones():
  assert list(sweep.searched_parameters(SPEC)) == [
      'kernel_size', 'batch_norm', 'optimizer', 'learning_rate']


def test_parameter_importance_and_correlation():
  records = synthetic_records()
  records.append({**records[0], 'run': 'failed', 'state': 'failed', 'best_val_acc': None})
  rows = sweep_report.parameter_importance(records, list(sweep.searched_parameters(SPEC)))
  by_name = {r['feature']: r for r in rows}
  # Numbers and booleans are one column each, strings one-hot; constant activation is left out.
  assert set(by_name) == {'kernel_size', 'batch_norm', 'learning_rate', 'optimizer=adam',
                          'optimizer=rmsprop', 'optimizer=sgd'}
  scored = records[:-1]
  y = np.asarray([r['best_val_acc'] for r in scored])
  columns = {
      'kernel_size': [r['params']['kernel_size'] for r in scored],
      'batch_norm': [float(r['params']['batch_norm']) for r in scored],
      'learning_rate': [r['params']['learning_rate'] for r in scored],
      'optimizer=sgd': [float(r['params']['optimizer'] == 'sgd') for r in scored]}
  for name, x in columns.items():
    assert by_name[name]['correlation'] == pytest.approx(np.corrcoef(x, y)[0, 1])
  assert by_name['kernel_size']['correlation'] > 0.99
  assert rows[0]['feature'] == 'kernel_size'  # val_acc is set by kernel_size
  assert by_name['kernel_size']['importance'] > 0.9
  assert sum(r['importance'] for r in rows) == pytest.approx(1.0)


def test_importance_needs_three_runs_with_different_val_acc():
  rows = sweep_report.parameter_importance(synthetic_records(2),
                                           list(sweep.searched_parameters(SPEC)))
  assert rows and all(r['importance'] is None for r in rows)
  assert {r['feature']: r['correlation'] for r in rows}['kernel_size'] == pytest.approx(1.0)


def test_axis_positions_categorical_and_log():
  pos, ticks, labels = sweep_report._axis_positions(
      {'values': [0.5, 1, 2]}, [2, 0.5, 1, 2])
  np.testing.assert_allclose(pos, [1.0, 0.0, 0.5, 1.0])
  assert labels == ['0.5', '1', '2'] and ticks == [0.0, 0.5, 1.0]
  pos, _, labels = sweep_report._axis_positions(
      SPEC['parameters']['learning_rate'], [1e-4, 1e-3, 1e-2])
  np.testing.assert_allclose(pos, [0.0, 0.5, 1.0])
  assert labels[0] == '0.0001' and labels[2] == '0.001' and labels[-1] == '0.01'


def test_report_files_and_summary(tmp_path):
  workdir = str(tmp_path / 'sweep')
  records = synthetic_records(12)
  records.append({**records[0], 'run': 'broken', 'index': 12, 'state': 'failed',
                  'best_val_acc': None, 'final_val_acc': None, 'best_epoch': None, 'epochs': 0,
                  'error': 'ConfigError: image_size=32 is too small\nmore', 'config': None,
                  'workdir': os.path.join(sweep.RUNS_DIR, 'broken')})
  write_sweep(workdir, records)
  assert sweep_report.run_sweep_report(None, workdir, []) == 0
  report = os.path.join(workdir, sweep.REPORT_DIR)
  for name in ('val_acc_vs_created', 'parallel_coordinates', 'parameter_importance',
               'val_acc_curves'):
    with Image.open(os.path.join(report, f'{name}.png')) as img:
      pixels = np.asarray(img.convert('L'), np.float32)
    assert img.width > 500 and img.height > 250
    assert pixels.std() > 10  # something is drawn
  with open(os.path.join(report, 'summary.md')) as f:
    summary = f.read()
  assert '13 runs: 12 finished, 0 stopped early by hyperband, 1 failed' in summary
  table = [line for line in summary.splitlines() if re.match(r'\| \d+ \| run_', line)]
  assert len(table) == 10
  shown = [float(line.split('|')[3]) for line in table]
  expected = sorted((r['best_val_acc'] for r in records if r['best_val_acc'] is not None),
                    reverse=True)[:10]
  np.testing.assert_allclose(shown, expected, atol=1e-4)
  assert '| broken | ConfigError: image_size=32 is too small |' in summary
  for png in ('val_acc_vs_created.png', 'parallel_coordinates.png', 'parameter_importance.png'):
    assert f']({png})' in summary

  # The best config block is a working configs/*.py module that rebuilds the best run's config.
  best = max((r for r in records if r['best_val_acc'] is not None),
             key=lambda r: r['best_val_acc'])
  with open(os.path.join(report, 'best_config.py')) as f:
    source = f.read()
  assert source in summary.replace('```python\n', '').replace('\n```', '\n')
  namespace = {}
  exec(compile(source, 'best_config.py', 'exec'), namespace)  # pylint: disable=exec-used
  rebuilt = namespace['get_config']().to_dict()
  for key, value in best['config'].items():
    if key not in config_lib.NON_REPORT_FIELDS:
      assert rebuilt[key] == (tuple(value) if isinstance(rebuilt[key], tuple) else value), key
  assert 'data_dir' not in source and 'wandb_mode' not in source
  assert f'run {best["run"]}' in source


def test_report_with_only_failed_runs_still_writes_everything(tmp_path):
  workdir = str(tmp_path / 'sweep')
  records = [{**r, 'state': 'failed', 'best_val_acc': None, 'final_val_acc': None,
              'error': 'TrainingDiverged: nan'} for r in synthetic_records(3)]
  write_sweep(workdir, records)
  paths = sweep_report.write_report(workdir)
  assert 'best_config' not in paths
  for path in paths.values():
    assert os.path.getsize(path) > 0
  with open(paths['summary']) as f:
    assert '3 runs: 0 finished, 0 stopped early by hyperband, 3 failed' in f.read()


def test_run_sweep_report_needs_a_sweep(tmp_path):
  with pytest.raises(sweep.SweepError, match='no sweep_results.jsonl'):
    sweep_report.run_sweep_report(None, str(tmp_path), [])
  with pytest.raises(sweep.SweepError, match='no positional arguments'):
    sweep_report.run_sweep_report(None, str(tmp_path), ['extra'])


def test_the_report_reads_the_sweep_files_without_the_engine_or_configs():
  record = {'config': {'kernel_size': 5}, 'best_val_acc': 0.5, 'best_epoch': 1, 'epochs': 2,
            'run': 'r'}
  code = (f'import sys; import cnn.sweep_report; cnn.sweep_report.best_config_block({record}); '
          'assert "sweeps" not in sys.modules and "configs" not in sys.modules; '
          'del sys.modules["cnn.sweep_report"], sys.modules["cnn.sweep"]; import cnn.sweep; '
          'assert "cnn.sweep_report" not in sys.modules')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
