"""The recipe study: one resumable run per (recipe, seed), one test read each, the tables."""

import json
import os

import pytest

from cnn import config as config_lib
from configs import tuned
from experiments import recipe_study

_TINY = '''
from configs import default
def get_config():
  c = default.get_config()
  c.update(dict(download=False, image_size=32, first_layer_filters=4, conv_layers=2,
                dense_size=8, batch_size=8, eval_batch_size=16, num_epochs=2, batch_norm=True))
  return c
'''


def test_study_trains_each_seed_once_and_tabulates_mean_and_spread(tiny_data_dir, tiny_cache_dir,
                                                                  tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(recipe_study, 'commit', lambda: 'abc1234')
  recipe = tmp_path / 'tiny_recipe.py'
  recipe.write_text(_TINY)
  common = {'data_dir': str(tiny_data_dir), 'cache_dir': str(tiny_cache_dir),
            'wandb_mode': 'disabled'}
  study = recipe_study.run_study([str(recipe)], [0, 1], common, str(tmp_path / 'study'))
  runs = study['runs']
  assert [(r['recipe'], r['seed']) for r in runs] == [('tiny_recipe', 0), ('tiny_recipe', 1)]
  for r in runs:
    test = json.load(open(tmp_path / 'study' / 'tiny_recipe' / f'seed_{r["seed"]}' /
                          'evaluation' / 'test_metrics.json'))
    assert r['test_accuracy'] == test['test_accuracy'] and r['num_test_images'] == 18
    assert r['val_minus_test'] == pytest.approx(r['best_val_accuracy'] - r['test_accuracy'])
  agg = study['recipes']['tiny_recipe']['test_accuracy']
  values = [r['test_accuracy'] for r in runs]
  assert agg['mean'] == pytest.approx(sum(values) / 2)
  assert agg['spread'] == pytest.approx(max(values) - min(values))
  table = recipe_study.markdown(study)
  assert '| tiny_recipe |' in table and f'{agg["mean"]:.3f} ±' in table
  # The tables are on disk (rewritten after each run, so a cut-off study still reports).
  assert (tmp_path / 'study' / 'study.md').read_text() == table
  assert json.load(open(tmp_path / 'study' / 'study.json'))['runs'] == runs
  assert [r['commit'] for r in runs] == ['abc1234', 'abc1234'] and '| abc1234 |' in table
  # The same study again, on later code, finds every run finished, reuses its one test read and
  # still names the code that trained it.
  capsys.readouterr()
  monkeypatch.setattr(recipe_study, 'commit', lambda: 'def5678')
  again = recipe_study.run_study([str(recipe)], [0, 1], common, str(tmp_path / 'study'))
  assert capsys.readouterr().out.count('already complete') == 2
  assert [r['test_accuracy'] for r in again['runs']] == values
  assert [r['commit'] for r in again['runs']] == ['abc1234', 'abc1234']
  assert 'Runs trained on abc1234 (per run below); tables written on def5678.' in (
      tmp_path / 'study' / 'study.md').read_text()
  assert os.path.exists(tmp_path / 'study' / 'tiny_recipe' / 'seed_0' / 'summary.json')


@pytest.mark.parametrize('name', sorted(recipe_study.RECIPES))
def test_each_named_recipe_changes_only_existing_fields_of_its_config(name):
  # ConfigDict.update adds a misspelt field silently: the study would train the base recipe.
  path, overrides = recipe_study.RECIPES[name]
  base = recipe_study.load_config_file(path)
  config = recipe_study.recipe_config(name, 3, {'image_size': 128})
  assert set(overrides) <= set(base.keys())
  for field, value in overrides.items():
    assert type(config[field]) is type(base[field]) and config[field] == value
  assert config.seed == 3 and config.image_size == 128
  config_lib.validate(config)


def test_the_study_set_overrides_a_recipes_own_value():
  # optimal is compared at 30 epochs; `--set=num_epochs=15` (the README's 96 px study) wins.
  assert recipe_study.recipe_config('optimal', 0, {}).num_epochs == 30
  assert recipe_study.recipe_config('optimal', 0, {'num_epochs': 15}).num_epochs == 15
  assert recipe_study.recipe_config('tuned', 0, {}).num_epochs == tuned.get_config().num_epochs


def test_a_recipe_with_one_seed_shows_no_spread():
  runs = [{'recipe': 'r', 'seed': 0, 'best_val_accuracy': 0.8, 'test_accuracy': 0.75,
           'val_minus_test': 0.05, 'best_epoch': 3, 'epochs_run': 4, 'wall_time_s': 60.0,
           'commit': 'abc1234'}]
  study = recipe_study.tabulate(runs, {'commit': 'abc1234', 'machine': 'm', 'data_dir': 'd',
                                       'seeds': [0], 'overrides': {}, 'wall_time_s': 60.0})
  row = next(ln for ln in recipe_study.markdown(study).splitlines() if ln.startswith('| r |'))
  assert row == ('| r | 0.800 (one seed) | 0.750 (one seed) | 0.050 (one seed) | '
                 '4.0 (one seed) | 1.0 min |')


def test_a_run_names_each_commit_that_trained_it_once(tmp_path):
  assert recipe_study.trained_on(str(tmp_path), None) == 'unrecorded'  # a run from before
  assert recipe_study.trained_on(str(tmp_path), 'abc1234') == 'abc1234'
  assert recipe_study.trained_on(str(tmp_path), 'abc1234') == 'abc1234'  # every epoch notes it
  assert recipe_study.trained_on(str(tmp_path), 'def5678') == 'abc1234, def5678'  # resumed
  assert recipe_study.trained_on(str(tmp_path), None) == 'abc1234, def5678'
