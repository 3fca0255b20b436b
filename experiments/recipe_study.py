"""Trains named recipes for several seeds, scores each once on the test split, and tabulates.

    python -m experiments.recipe_study --data_dir=../shared/data/monkeys10 \
        --recipes=optimal_before_fix,optimal,tuned --seeds=0,1,2 --workdir=workdirs/study \
        --set=image_size=128

How long it takes: one run per (recipe, seed), each as long as `python main.py` with that
config; on a 2-core CPU at 128 px (AMD EPYC Zen 4), optimal.py's 30 epochs take about 9 minutes
and tuned.py's 45 about 14, so 3 recipes x 3 seeds takes about 90 minutes (from the
runs' own times; hosts with AVX2 alone have run 1.1-1.7x slower).
`--set` overrides every run's fields, a recipe's own included (`num_epochs=30` runs tuned.py
for 30 epochs, as `tuned_30ep` does).
Every run has its own workdir (WORKDIR/<recipe>/seed_<k>) and resumes through
`train_and_evaluate`, so an interrupted study continues where it stopped with the same command.
A recipe is chosen by its hold-out val only; each finished run reads the test split once (its
evaluation/test_metrics.json is reused after).

After every run (so a study cut short still reports) it writes WORKDIR/study.json (every run,
and per recipe the mean, standard deviation and spread (max - min) of best hold-out val, test
accuracy, val - test, epochs and wall time, the commit it ran on and the study's own wall time)
and WORKDIR/study.md (the same as tables). Each run's workdir keeps, in trained_on.txt, the
commits that trained it, so a study resumed or retabulated on later code still names them.
"""

import ast
import importlib.util
import os
import pathlib
import platform
import subprocess
import sys
import time

if __package__ in (None, ''):  # `python experiments/recipe_study.py`: the repo root on the path
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import ml_collections
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The optimal recipes run 30 epochs, the reference's run as measured (optimal.py's own cap is
# 50); `--set=num_epochs=N` still overrides that, as it does every run's field.
_OPTIMAL = {'num_epochs': 30}
# optimal.py validating its weights as they are, as it did before optimal_ema was kept.
_OPTIMAL_NO_EMA = {**_OPTIMAL, 'ema_epochs': 0.0}

# name -> (config file, overrides). A --recipes entry may also be a config file path.
RECIPES = {
    # optimal_before_fix: configs/optimal.py as it trained before the validation fix, with
    # running batch-norm averages, its weights validated as they are, and patience on the raw
    # val_acc from the first epoch on.
    'optimal_before_fix': ('configs/optimal.py', {**_OPTIMAL_NO_EMA, 'bn_stats': 'running',
                                                  'early_stopping_min_epochs': 0,
                                                  'early_stopping_smoothing': 0.0}),
    # The step between: precise BN and stopping on an EMA of val_acc.
    'optimal_no_ema': ('configs/optimal.py', _OPTIMAL_NO_EMA),
    'optimal': ('configs/optimal.py', _OPTIMAL),
    'tuned': ('configs/tuned.py', {}),
    # tuned.py validating an EMA of its weights over 3 epochs: tried, not kept (README Results).
    'tuned_ema': ('configs/tuned.py', {'ema_epochs': 3.0}),
    # tuned.py with random erasing of a quarter of its training images: tried, not kept.
    'tuned_erase': ('configs/tuned.py', {'aug_erase': 0.25}),
    # tuned.py at a 1.5x higher peak learning rate (3e-3): screened on seed 0, not kept.
    'tuned_lr3': ('configs/tuned.py', {'learning_rate': 3e-3}),
    # tuned.py with the random-resized crop and flips as its only geometric augmentation:
    # screened on seed 0, not kept.
    'tuned_rrc': ('configs/tuned.py', {'aug_rotation': 0.0, 'aug_shift': 0.0, 'aug_zoom': 0.0}),
    # tuned.py at half its peak learning rate (1e-3, the reference's), under its schedule:
    # screened on seed 0, not kept.
    'tuned_lr1': ('configs/tuned.py', {'learning_rate': 1e-3}),
    # tuned.py with 10x its weight decay (0.5): over its 900 steps 0.05 shrinks an idle weight
    # by 4% only, so the regulariser is all but off in a run this short. Screened on seed 0,
    # not kept.
    'tuned_wd5': ('configs/tuned.py', {'weight_decay': 0.5}),
    # tuned.py with twice its label smoothing (0.2): the recipes that fit their training images
    # faster (tuned_rrc, tuned_wd5) validated worse, so this softens the targets instead.
    # Screened on seed 0, not kept.
    'tuned_ls2': ('configs/tuned.py', {'label_smoothing': 0.2}),
    # tuned.py with a hidden dense layer twice as wide (256): its blocks end 8x wider than
    # optimal.py's, yet they still feed a 2048 -> 128 bottleneck, the reference's widest.
    # Screened on seed 0, not kept.
    'tuned_d256': ('configs/tuned.py', {'dense_size': 256}),
    # tuned.py at batch 16, its learning rate scaled by sqrt(1/2) (1.4e-3): on the 2-core CPU a
    # step of 16 images takes about half as long as one of 32, so this makes twice the updates
    # in about the same time (its epochs ran 10% longer). Tried on seeds 0, 1, 2, not kept.
    'tuned_b16': ('configs/tuned.py', {'batch_size': 16, 'learning_rate': 1.4e-3}),
    # tuned.py as it was before tuned_e38 was kept: 30 epochs.
    'tuned_30ep': ('configs/tuned.py', {'num_epochs': 30}),
    # tuned.py trained for 38 epochs instead of 30, its cosine decay stretched to match:
    # its training loss still falls, and val peaks, in its last epochs (best epochs 24-30), so it
    # is short of converged, and a longer run may give both accuracy and steadier seeds. The
    # rule, fixed before its runs (seeds 0, 1, 2 at 128 px, `--set=image_size=128`): it becomes
    # tuned.py if its mean best hold-out val is at least tuned.py's on this kind of CPU (0.865:
    # 0.835, 0.872, 0.890, AMD EPYC family 25 model 17, commit 6918249), every seed trains in
    # under 15 min and it takes at most 1.5x optimal.py's 30 epochs. Test plays no part.
    # It scored 0.890 (0.872, 0.899, 0.899), 11.5 min a seed: kept, it was tuned.py until
    # tuned_e42 was kept. Its seeds were no steadier on test (README Results).
    'tuned_e38': ('configs/tuned.py', {'num_epochs': 38}),
    # optimal.py (30 epochs) validating, and keeping as its checkpoint, an EMA of its weights
    # over 3 epochs: an evaluation change, listed by issue 12 beside precise BN; its training is
    # optimal.py's step for step. At a constant learning rate its weights keep jittering, so its
    # val jumps from epoch to epoch (by 0.032 on average after epoch 10) and the best of 30
    # such epochs flatters what it reports (val - test 0.062); averaged weights should jitter
    # less. The rule, fixed before its runs (seeds 0, 1, 2, `--set=image_size=128`, AMD EPYC
    # family 25 model 17): its evaluation becomes optimal.py's if, against optimal.py in the
    # final study (f38f000), its mean best hold-out val is at least 0.847, its mean |change of
    # val between epochs| over epochs 10-30 is below 0.032, and its median epoch (training and
    # validation) takes at most 1.10x optimal.py's 17.8 s. Test plays no part.
    # It scored 0.847 (0.862, 0.826, 0.853: 277 of 327 hold-out images, as many as optimal.py
    # then, now optimal_no_ema), val moved 0.012 between epochs, and an epoch took 1.02x: kept,
    # its evaluation is now optimal.py's (README Results).
    'optimal_ema': ('configs/optimal.py', {**_OPTIMAL, 'ema_epochs': 3.0}),
    # tuned.py trained for 42 epochs instead of 38, its cosine decay stretched to match: going from
    # 30 to 38 raised best hold-out val on every seed, and three of the five 38-epoch seeds still
    # validated best in their last three epochs with training accuracy rising (0.96), so the
    # schedule may still be short. 42, not more, keeps a margin under the time limits (18.1 s an
    # epoch: about 12.7 min a seed, 1.37x optimal.py); the two evaluation-only ideas screened before
    # it are in README Results. The rule, fixed before its runs (seeds 0, 1, 2,
    # `--set=image_size=128`, AMD EPYC family 25 model 17): it becomes tuned.py if its mean best
    # hold-out val is at least tuned.py's in the final study (0.890), every seed trains in under 15
    # min, and its mean wall time a seed is at most 1.5x optimal.py's there (557.2 s: 835.8 s). Test
    # plays no part.
    # It scored 0.896 (0.872, 0.908, 0.908: 293 of 327 hold-out images against 291), 12.8 min
    # a seed (at most 13.2; 765 s, 1.37x): kept, it was tuned.py until tuned_e45 was kept.
    'tuned_e42': ('configs/tuned.py', {'num_epochs': 42}),
    # tuned.py trained for 45 epochs instead of 42, its cosine decay stretched to match: each
    # lengthening so far raised mean best hold-out val (30 -> 38 -> 42: 0.865, 0.890, 0.896), and
    # 45 is the longest schedule whose expected wall time fits the limit (18.2 s an epoch in the
    # final study: about 819 s a seed, 1.47x optimal.py). The rule, fixed before its runs
    # (c8fccdf): tuned_e42's above, with tuned_e42's 0.896 as the bar to meet.
    # It scored 0.896 (0.881, 0.890, 0.917: 293 of 327 hold-out images, a tie, which the rule
    # keeps), 13.7 min a seed (at most 14.1; 821 s, 1.47x): kept, it is now tuned.py (README
    # Results).
    'tuned_e45': ('configs/tuned.py', {'num_epochs': 45}),
}
METRICS = ('best_val_accuracy', 'test_accuracy', 'val_minus_test', 'epochs_run', 'wall_time_s')

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The study's flags; defined on use, so importing this module (tests) adds no flags."""
  flags.DEFINE_string('data_dir', 'data/inaturalist_12K', 'train/<class>/ and val/<class>/.')
  flags.DEFINE_list('recipes', ['optimal_before_fix', 'optimal', 'tuned'],
                    f'Names ({", ".join(RECIPES)}) or config files.')
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'One run per recipe and seed.')
  flags.DEFINE_string('workdir', 'workdirs/study', 'A workdir per run under it, and the tables.')
  flags.DEFINE_list('set', [], 'FIELD=VALUE overrides for every run, e.g. image_size=128.')

def load_config_file(path: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location('recipe_config', ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string: padding=SAME


def recipe_config(recipe: str, seed: int, common: dict) -> ml_collections.ConfigDict:
  """The recipe's config with the study's overrides and this seed."""
  path, overrides = RECIPES.get(recipe, (recipe, {}))
  config = load_config_file(path)
  config.update({**overrides, **common, 'seed': seed})
  return config


def trained_on(workdir: str, code: str | None) -> str:
  """The commits that trained this run, kept in its workdir; `code` (this study's) joins them
  when it trained too. A study resumed, or retabulated, on later code so still names the code
  each run came from."""
  path = pathlib.Path(workdir) / 'trained_on.txt'
  seen = path.read_text().split() if path.exists() else []
  if code and code not in seen:
    seen.append(code)
    from cnn import atomic  # pylint: disable=g-import-not-at-top
    atomic.atomic_write(path, lambda f: f.write('\n'.join(seen) + '\n'))
  return ', '.join(seen) or 'unrecorded'


def run_one(config: ml_collections.ConfigDict, workdir: str, code: str) -> dict:
  """Trains (or resumes, or finds finished) one run, then its one read of the test split."""
  from cnn import checkpoints  # pylint: disable=g-import-not-at-top
  from cnn import evaluate  # pylint: disable=g-import-not-at-top
  from cnn import train  # pylint: disable=g-import-not-at-top

  def note_code(epoch, metrics):  # after every epoch this process trains, so a run killed and
    del epoch, metrics            # resumed on other code names both commits
    trained_on(workdir, code)
    return False

  summary = train.train_and_evaluate(config, workdir, epoch_callback=note_code)
  commits = trained_on(workdir, None)
  test_path = os.path.join(workdir, 'evaluation', 'test_metrics.json')
  if os.path.exists(test_path):
    test = checkpoints.read_json(test_path)
  else:
    test = evaluate.evaluate(config, workdir)
  return {'best_val_accuracy': summary['best_val_accuracy'],
          'test_accuracy': test['test_accuracy'],
          'val_minus_test': summary['best_val_accuracy'] - test['test_accuracy'],
          'best_epoch': summary['best_epoch'], 'epochs_run': summary['epochs_run'],
          'wall_time_s': summary['wall_time_s'],
          'num_holdout_images': summary['num_holdout_images'],
          'num_test_images': test['num_test_images'], 'commit': commits}


def aggregate(rows: list[dict]) -> dict:
  """Per metric: mean, sample standard deviation and spread (max - min) over the seeds."""
  out = {}
  for m in METRICS:
    v = np.asarray([r[m] for r in rows], np.float64)
    out[m] = {'mean': float(v.mean()), 'std': float(v.std(ddof=1)) if len(v) > 1 else 0.0,
              'spread': float(v.max() - v.min()), 'values': v.tolist()}
  return out


def machine() -> str:
  """The CPU the wall times were measured on (they change with it)."""
  model = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      model = next(ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return f'{model}, {os.cpu_count()} cores'


def commit() -> str:
  def git(*args):
    return subprocess.run(['git', *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
  head = git('rev-parse', '--short', 'HEAD') or 'unknown'
  return head + ('+uncommitted' if git('status', '--porcelain', '--untracked-files=no') else '')


def _cell(stats: dict, fmt: str = '.3f') -> str:
  if len(stats['values']) == 1:  # no spread to show
    return f'{stats["mean"]:{fmt}} (one seed)'
  return (f'{stats["mean"]:{fmt}} ± {stats["std"]:{fmt}} (spread {stats["spread"]:{fmt}})')


def markdown(study: dict) -> str:
  trained = sorted({r['commit'] for r in study['runs']})
  lines = [f'# Recipe study ({study["commit"]}, {study["data_dir"]}, seeds '
           f'{", ".join(map(str, study["seeds"]))}, overrides {study["overrides"]})', '',
           f'Wall times on {study.get("machine", "an unrecorded machine")}. Runs trained on '
           f'{"; ".join(trained) or "-"} (per run below); tables written on {study["commit"]}.',
           '',
           '| recipe | best hold-out val | test | val - test | epochs | wall time per run |',
           '|---|---|---|---|---|---|']
  for name, agg in study['recipes'].items():
    cells = [_cell(agg[m]) for m in ('best_val_accuracy', 'test_accuracy', 'val_minus_test')]
    lines.append(f'| {name} | {" | ".join(cells)} | {_cell(agg["epochs_run"], ".1f")} | '
                 f'{agg["wall_time_s"]["mean"] / 60:.1f} min |')
  runs_min = sum(r['wall_time_s'] for r in study['runs']) / 60
  lines += ['', 'mean ± standard deviation over the seeds (spread = max - min). The runs took '
            f'{runs_min:.1f} min in all; this invocation {study["wall_time_s"] / 60:.1f} min '
            '(runs it found finished cost it nothing).', '', '## Runs', '',
            '| recipe | seed | best val (epoch) | test | epochs | wall | trained on |',
            '|---|---|---|---|---|---|---|']
  for r in study['runs']:
    lines.append(f'| {r["recipe"]} | {r["seed"]} | {r["best_val_accuracy"]:.3f} '
                 f'({r["best_epoch"]}) | {r["test_accuracy"]:.3f} | {r["epochs_run"]} | '
                 f'{r["wall_time_s"] / 60:.1f} min | {r["commit"]} |')
  return '\n'.join(lines) + '\n'


def tabulate(runs: list[dict], context: dict) -> dict:
  """The study as it stands: `context` (commit, machine, ...) with each recipe's statistics."""
  by_recipe = {}
  for r in runs:
    by_recipe.setdefault(r['recipe'], []).append(r)
  return {**context, 'recipes': {k: aggregate(v) for k, v in by_recipe.items()}, 'runs': runs}


def write_tables(study: dict, workdir: str) -> None:
  """Atomically, so a reader never sees half a table; workdir exists: the runs are under it."""
  from cnn import atomic  # pylint: disable=g-import-not-at-top
  from cnn import checkpoints  # pylint: disable=g-import-not-at-top
  checkpoints.write_json(os.path.join(workdir, 'study.json'), study)
  atomic.atomic_write(os.path.join(workdir, 'study.md'), lambda f: f.write(markdown(study)))


def run_study(recipes: list[str], seeds: list[int], common: dict, workdir: str) -> dict:
  """Trains every (recipe, seed) in turn; the tables are rewritten after each run, so a study
  cut short still reports the runs it finished."""
  t0, runs = time.time(), []
  context = {'commit': commit(),  # the code the runs start on, not the one at the end
             'machine': machine(), 'data_dir': common.get('data_dir'), 'seeds': seeds,
             'overrides': {k: v for k, v in common.items() if k != 'data_dir'}}
  study = tabulate(runs, {**context, 'wall_time_s': 0.0})  # no recipes or seeds: empty tables
  for recipe in recipes:
    for seed in seeds:
      name = pathlib.Path(recipe).stem if recipe not in RECIPES else recipe
      run_dir = os.path.join(workdir, name, f'seed_{seed}')
      print(f'=== {name}, seed {seed}: {run_dir}', flush=True)
      runs.append({'recipe': name, 'seed': seed,
                   **run_one(recipe_config(recipe, seed, common), run_dir, context['commit'])})
      study = tabulate(runs, {**context, 'wall_time_s': time.time() - t0})
      write_tables(study, workdir)
  return study


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every step of every save at INFO
  common = {'data_dir': FLAGS.data_dir, 'wandb_mode': 'disabled'}
  common.update({k: _value(v) for k, v in (kv.split('=', 1) for kv in FLAGS.set)})
  print(markdown(run_study(FLAGS.recipes, [int(s) for s in FLAGS.seeds], common, FLAGS.workdir)))


if __name__ == '__main__':
  define_flags()
  app.run(main)
