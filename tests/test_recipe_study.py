"""The recipe study: one resumable run per (recipe, seed), one test read each, the tables."""

import json
import os

import pytest

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
                                                                  tmp_path, capsys):
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
  # The same study again finds every run finished and reuses its one test read.
  capsys.readouterr()
  again = recipe_study.run_study([str(recipe)], [0, 1], common, str(tmp_path / 'study'))
  assert capsys.readouterr().out.count('already complete') == 2
  assert [r['test_accuracy'] for r in again['runs']] == values
  assert os.path.exists(tmp_path / 'study' / 'tiny_recipe' / 'seed_0' / 'summary.json')
