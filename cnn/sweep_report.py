"""The sweep report, offline: W&B's sweep panels as PNGs and a summary.md, in WORKDIR/report/.

    val_acc_vs_created.png     each run's val_acc by creation time, with the best so far
    parallel_coordinates.png   one line per run through its values, coloured by val_acc
    parameter_importance.png   random-forest importance and correlation with val_acc
    val_acc_curves.png         val_acc per epoch of every run (hyperband stops end early)
    summary.md                 the top 10 runs and the best config as a configs/*.py block
    best_config.py             that block, ready to copy to configs/

val_acc is a run's best epoch's validation accuracy: the checkpoint the run keeps.
"""

import datetime
import json
import os
from typing import Any, Sequence

import matplotlib
from matplotlib import cm
from matplotlib import colors
from matplotlib import dates as mdates
from matplotlib.figure import Figure
import ml_collections
import numpy as np

from cnn import atomic
from cnn import config as config_lib
from cnn import figures
from cnn import sweep

TOP_RUNS = 10


def _scored(records: Sequence[dict]) -> list[dict]:
  return [r for r in records if r.get('best_val_acc') is not None]


def _ranked(records: Sequence[dict]) -> list[dict]:
  return sorted(_scored(records), key=lambda r: -r['best_val_acc'])


# ---------------------------------------------------------------------------- importance


def _features(records: Sequence[dict], params: Sequence[str]) -> tuple[list[str], np.ndarray]:
  """Columns as W&B's importance panel builds them: numbers and booleans as they are, other
  categorical values one-hot (`optimizer=adam`)."""
  names, columns = [], []
  for name in params:
    values = [r['params'].get(name) for r in records]
    if all(isinstance(v, (bool, int, float)) for v in values):
      names.append(name)
      columns.append([float(v) for v in values])
    else:
      for level in sorted({json.dumps(v) for v in values}):
        names.append(f'{name}={json.loads(level)}')
        columns.append([float(json.dumps(v) == level) for v in values])
  matrix = np.asarray(columns, np.float64).T if columns else np.zeros((len(records), 0))
  return names, matrix


def parameter_importance(records: Sequence[dict], params: Sequence[str],
                         seed: int = 0) -> list[dict]:
  """[{feature, importance, correlation}] of the varying features, by importance: a random
  forest's impurity importance fitted on val_acc (None under 3 runs), and Pearson's r."""
  from sklearn.ensemble import RandomForestRegressor
  runs = _scored(records)
  if len(runs) < 2:
    return []
  names, x = _features(runs, params)
  y = np.asarray([r['best_val_acc'] for r in runs], np.float64)
  varying = [i for i in range(x.shape[1]) if np.ptp(x[:, i]) > 0]
  names, x = [names[i] for i in varying], x[:, varying]
  if not names:
    return []
  importance = [None] * len(names)
  if len(runs) >= 3 and np.ptp(y) > 0:
    forest = RandomForestRegressor(n_estimators=200, random_state=seed).fit(x, y)
    importance = [float(v) for v in forest.feature_importances_]
  rows = []
  for i, name in enumerate(names):
    corr = float(np.corrcoef(x[:, i], y)[0, 1]) if np.ptp(y) > 0 else None
    rows.append({'feature': name, 'importance': importance[i], 'correlation': corr})
  return sorted(rows, key=lambda r: -(r['importance'] or 0.0))


# ---------------------------------------------------------------------------- plots


def _save(fig: Figure, path: str, empty: str = '') -> None:
  """Saves `fig`; with `empty`, a figure that says why there is nothing to draw instead."""
  if empty:
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, empty, ha='center', va='center')
    ax.set_axis_off()
  figures.save(fig, path, dpi=120, facecolor='auto', bbox_inches='tight')


def plot_val_acc_vs_created(records: Sequence[dict], path: str) -> None:
  runs = sorted(_scored(records), key=lambda r: r['created'])
  fig = Figure(figsize=(8, 4.5))
  if not runs:
    return _save(fig, path, 'no run has a val_acc yet')
  t = [mdates.date2num(datetime.datetime.fromisoformat(r['created'])) for r in runs]
  acc = np.asarray([r['best_val_acc'] for r in runs])
  ax = fig.add_subplot()
  ax.step(t, np.maximum.accumulate(acc), where='post', color='0.6', label='best so far')
  points = ax.scatter(t, acc, c=acc, cmap='viridis', zorder=3, edgecolors='k', linewidths=0.5)
  fig.colorbar(points, ax=ax, label='val_acc')
  locator = mdates.AutoDateLocator()
  ax.xaxis.set_major_locator(locator)
  ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
  ax.set_xlabel('created (UTC)')
  ax.set_ylabel('val_acc')
  failed = len(records) - len(runs)
  ax.set_title(f'val_acc v. created ({len(runs)} runs' + (f', {failed} failed)' if failed else ')'))
  ax.legend(loc='lower right')
  _save(fig, path)


def _axis_positions(p: dict, values: Sequence[Any]) -> tuple[np.ndarray, list, list]:
  """Values -> [0, 1] on the axis of the parameter spec `p`, with tick positions and labels."""
  if 'values' in p:  # searched, so two or more
    where = dict(zip(map(json.dumps, p['values']), np.linspace(0, 1, len(p['values']))))
    return (np.asarray([where[json.dumps(v)] for v in values]), list(where.values()),
            [str(v) for v in p['values']])
  # A normal distribution has no range: the drawn values span the axis.
  lo, hi = float(p.get('min', min(values))), float(p.get('max', max(values)))
  log = 'log' in p.get('distribution', '') and lo > 0
  f = np.log10 if log else (lambda v: np.asarray(v, np.float64))
  a, b = f(lo), f(hi)
  span = (b - a) or 1.0
  tick_values = np.linspace(a, b, 5)
  shown = 10**tick_values if f is np.log10 else tick_values
  return ((f(np.asarray(values, np.float64)) - a) / span, list((tick_values - a) / span),
          [f'{v:.3g}' for v in shown])


def plot_parallel_coordinates(records: Sequence[dict], params: dict[str, dict], path: str) -> None:
  runs = sorted(_scored(records), key=lambda r: r['best_val_acc'])  # best drawn last, on top
  fig = Figure(figsize=(1.6 * (len(params) + 1) + 2, 5))
  if not runs or not params:
    return _save(fig, path, 'the sweep varies no parameter' if runs else 'no run has a val_acc yet')
  acc = np.asarray([r['best_val_acc'] for r in runs])
  lo, hi = float(acc.min()), float(acc.max())
  if hi - lo < 1e-9:
    lo, hi = lo - 0.01, hi + 0.01
  axes = list(params) + ['val_acc']
  columns = [_axis_positions(p, [r['params'].get(name) for r in runs])
             for name, p in params.items()]
  columns.append(_axis_positions({'min': lo, 'max': hi}, acc))
  norm = colors.Normalize(lo, hi)
  cmap = matplotlib.colormaps['viridis']
  ax = fig.add_subplot()
  xs = np.arange(len(axes))
  for y, a in zip(np.stack([pos for pos, _, _ in columns], axis=1), acc):
    ax.plot(xs, y, color=cmap(norm(a)), alpha=0.85, linewidth=1.5)
  for x, (_, tick_pos, tick_labels) in zip(xs, columns):
    ax.axvline(x, color='0.3', linewidth=1)
    for tp, tl in zip(tick_pos, tick_labels):
      ax.text(x - 0.04, tp, tl, ha='right', va='center', fontsize=8,
              bbox={'facecolor': 'white', 'edgecolor': 'none', 'alpha': 0.7, 'pad': 0.5})
  ax.set_xticks(xs, axes, rotation=20, ha='right')
  ax.set_xlim(-0.5, len(axes) - 0.7)
  ax.set_ylim(-0.05, 1.05)
  ax.set_yticks([])
  for side in ('left', 'right', 'top'):
    ax.spines[side].set_visible(False)
  fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label='val_acc')
  ax.set_title(f'parallel coordinates, {len(runs)} runs')
  _save(fig, path)


def plot_parameter_importance(rows: Sequence[dict], path: str) -> None:
  fig = Figure(figsize=(10, 0.45 * max(len(rows), 2) + 1.5))
  if not rows:
    return _save(fig, path, 'no parameter varies across runs with a val_acc')
  names = [r['feature'] for r in rows][::-1]
  ax_imp, ax_cor = fig.subplots(1, 2, sharey=True)
  if rows[0]['importance'] is None:
    ax_imp.text(0.5, 0.5, 'importance needs 3 runs\nwith different val_acc', ha='center',
                va='center', transform=ax_imp.transAxes)
  else:
    ax_imp.barh(names, [r['importance'] for r in rows][::-1], color='tab:blue')
  ax_imp.set_xlabel('importance (random forest)')
  corr = [r['correlation'] if r['correlation'] is not None else 0.0 for r in rows][::-1]
  ax_cor.barh(names, corr, color=['tab:green' if c >= 0 else 'tab:red' for c in corr])
  ax_cor.axvline(0, color='0.3', linewidth=0.8)
  ax_cor.set_xlim(-1, 1)
  ax_cor.set_xlabel('correlation with val_acc')
  fig.suptitle('parameter importance with respect to val_acc')
  _save(fig, path)


def plot_val_acc_curves(records: Sequence[dict], workdir: str, path: str) -> None:
  fig = Figure(figsize=(8, 4.5))
  curves = [(r, sweep.read_metrics(os.path.join(workdir, r['workdir']))) for r in records]
  curves = [(r, rows) for r, rows in curves if rows]
  if not curves:
    return _save(fig, path, 'no run has logged an epoch yet')
  ax = fig.add_subplot()
  for r, rows in curves:
    style = '--' if r['state'] == 'stopped' else '-'
    ax.plot([row['epoch'] for row in rows], [row['val_acc'] for row in rows], style,
            marker='o', markersize=3, label=r['run'] if len(curves) <= 10 else None)
  ax.set_xlabel('epoch')
  ax.set_ylabel('val_acc')
  ax.set_title('val_acc per epoch (dashed: stopped by hyperband)')
  if len(curves) <= 10:
    ax.legend(fontsize=6)
  _save(fig, path)


# ---------------------------------------------------------------------------- summary.md


def best_config_block(record: dict, sweep_name: str = '') -> str:
  """The best run's config as a configs/*.py module: default.get_config() (which is
  cnn.config.default_config()) plus its changes."""
  defaults = config_lib.default_config()
  lines = []
  for key, value in record['config'].items():
    if key in config_lib.NON_REPORT_FIELDS:
      continue
    if key in defaults:
      value = tuple(value) if isinstance(defaults[key], tuple) else value
      if value == defaults[key] and type(value) is type(defaults[key]):
        continue
    lines.append(f'  c.{key} = {value!r}')
  acc = record['best_val_acc']
  title = f'Best run of sweep {sweep_name}' if sweep_name else 'Best run of a sweep'
  return (f'"""{title}: val_acc {acc:.4f} at epoch {record["best_epoch"]} of {record["epochs"]}, '
          f'run {record["run"]}."""\n\nfrom configs import default\n\n\ndef get_config():\n'
          '  c = default.get_config()\n' + ''.join(f'{line}\n' for line in lines) + '  return c\n')


def _cell(value: Any) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    return f'{value:.4g}'
  return str(value).replace('|', '\\|')


def summary_markdown(records: Sequence[dict], spec: dict, importance: Sequence[dict],
                     images: dict[str, str], best_block: str) -> str:
  params = sweep.searched_parameters(spec)
  ranked = _ranked(records)
  states = {s: sum(r['state'] == s for r in records) for s in ('finished', 'stopped', 'failed')}
  metric = spec.get('metric', {})
  name = spec.get('name', '')
  out = [f'# Sweep report{": " + name if name else ""}', '',
         f'{len(records)} runs: {states["finished"]} finished, {states["stopped"]} stopped early '
         f'by hyperband, {states["failed"]} failed. Method {spec.get("method", "?")}, metric '
         f'{metric.get("name", "val_acc")} ({metric.get("goal", "maximize")}). val_acc is the best '
         f'epoch\'s validation accuracy (the checkpoint each run keeps).', '',
         f'## Top {min(TOP_RUNS, len(ranked))} runs', '']
  header = ['#', 'run', 'val_acc', 'final val_acc', 'best epoch', 'epochs', 'state',
            'minutes'] + list(params)
  out += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for i, r in enumerate(ranked[:TOP_RUNS]):
    cells = [i + 1, r['run'], r['best_val_acc'], r['final_val_acc'], r['best_epoch'],
             r['epochs'], r['state'], (r.get('wall_time_s') or 0) / 60]
    cells += [r['params'].get(name) for name in params]
    out.append('| ' + ' | '.join(_cell(c) for c in cells) + ' |')
  if best_block:
    out += ['', '## Best config', '',
            f'Save as `configs/best_sweep.py` (also written to '
            f'`{sweep.REPORT_DIR}/best_config.py`) and train with '
            f'`python main.py --config=configs/best_sweep.py --workdir=WORKDIR`:', '',
            '```python', best_block.rstrip(), '```']
  if importance:
    out += ['', '## Parameter importance (val_acc)', '',
            '| parameter | importance | correlation |', '|---|---|---|']
    out += [f'| {_cell(r["feature"])} | {_cell(r["importance"])} | {_cell(r["correlation"])} |'
            for r in importance]
  failed = [r for r in records if r['state'] == 'failed']
  if failed:
    out += ['', '## Failed runs', '', '| run | error |', '|---|---|']
    out += [f'| {_cell(r["run"])} | {_cell((r.get("error") or "").splitlines()[0][:300])} |'
            for r in failed]
  out += ['', '## Plots', '']
  out += [f'![{title}]({os.path.basename(p)})' for title, p in images.items()]
  return '\n'.join(out) + '\n'


def write_report(workdir: str) -> dict[str, str]:
  """Writes WORKDIR/report/ from the sweep's files and the runs' metrics; returns the paths."""
  records = sweep.read_results(workdir)
  spec = sweep.read_spec(workdir)['spec']
  params = sweep.searched_parameters(spec)
  importance = parameter_importance(records, list(params))
  out_dir = os.path.join(workdir, sweep.REPORT_DIR)
  paths = {name: os.path.join(out_dir, f'{name}.png') for name in (
      'val_acc_vs_created', 'parallel_coordinates', 'parameter_importance', 'val_acc_curves')}
  plot_val_acc_vs_created(records, paths['val_acc_vs_created'])
  plot_parallel_coordinates(records, params, paths['parallel_coordinates'])
  plot_parameter_importance(importance, paths['parameter_importance'])
  plot_val_acc_curves(records, workdir, paths['val_acc_curves'])
  images = {name.replace('_', ' '): path for name, path in paths.items()}
  ranked = _ranked(records)
  block = best_config_block(ranked[0], spec.get('name', '')) if ranked else ''
  summary = summary_markdown(records, spec, importance, images, block)
  paths['summary'] = os.path.join(out_dir, 'summary.md')
  atomic.atomic_write(paths['summary'], lambda f: f.write(summary))
  if block:
    paths['best_config'] = os.path.join(out_dir, 'best_config.py')
    atomic.atomic_write(paths['best_config'], lambda f: f.write(block))
  print(f'sweep report: {out_dir}/ ({len(records)} runs'
        + (f', best val_acc {ranked[0]["best_val_acc"]:.4f}: {ranked[0]["run"]})' if ranked
           else ')'))
  return paths


def run_sweep_report(config: ml_collections.ConfigDict, workdir: str,
                     argv_rest: Sequence[str]) -> int:
  """--mode=sweep_report: the report of the sweep in `workdir` (the config is not needed)."""
  del config
  if argv_rest:
    raise sweep.SweepError(f'--mode=sweep_report takes no positional arguments, got {argv_rest}')
  if not os.path.exists(os.path.join(workdir, sweep.RESULTS_FILE)):
    raise sweep.SweepError(f'no {sweep.RESULTS_FILE} in {workdir}: run a sweep there first '
                           '(--mode=sweep --sweep_config=configs/sweep.yaml)')
  write_report(workdir)
  return 0
