"""--mode=predict on files and folders, one of them corrupt, in-process and through main.py."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from cnn import checkpoints
from cnn import errors
from cnn import input_pipeline
from cnn import models
from cnn import predict

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def trained(trained_workdir):
  """The shared trained run (read-only: predict writes nothing into a workdir)."""
  return checkpoints.load_run_config(trained_workdir), trained_workdir


@pytest.fixture
def inputs(tiny_data_dir, tmp_path):
  """Three good images (two named, one folder of them) and a corrupt JPEG."""
  good = [str(tiny_data_dir / 'val' / 'red' / 'red_0.jpg'),
          str(tiny_data_dir / 'val' / 'blue' / 'blue_1.png')]
  corrupt = tmp_path / 'corrupt.jpg'
  corrupt.write_bytes(b'\xff\xd8\xff\xe0 truncated, not really a JPEG')
  return good, str(corrupt), str(tiny_data_dir / 'val' / 'green')


def _expected_probs(config, workdir, path):
  variables, _ = checkpoints.restore_best(workdir)
  model = models.create_model(config, 3)
  image = input_pipeline.read_image(path, config.image_size)
  return np.asarray(jax.nn.softmax(model.apply(variables, image[None] / np.float32(255))))[0]


def test_image_files_expands_folders_and_reports_bad_paths(tmp_path):
  (tmp_path / 'a' / 'sub').mkdir(parents=True)
  for name in ('a/x.jpg', 'a/sub/y.PNG', 'a/notes.txt', 'a/.hidden.jpg', 'z.bin'):
    (tmp_path / name).write_bytes(b'')
  (tmp_path / 'empty').mkdir()
  files, errors = predict.image_files([str(tmp_path / 'a'), str(tmp_path / 'z.bin'),
                                       str(tmp_path / 'missing.jpg'), str(tmp_path / 'empty')])
  assert files == [str(tmp_path / 'a' / 'sub' / 'y.PNG'), str(tmp_path / 'a' / 'x.jpg'),
                   str(tmp_path / 'z.bin')]  # a named file is tried whatever its suffix
  assert set(errors) == {str(tmp_path / 'missing.jpg'), str(tmp_path / 'empty')}
  assert errors[str(tmp_path / 'missing.jpg')] == 'no such file or folder'
  assert errors[str(tmp_path / 'empty')].startswith('folder holds no images')


def test_predict_files_top3_and_a_per_file_error(trained, inputs):
  config, workdir = trained
  good, corrupt, _ = inputs
  model, variables, names, _ = checkpoints.load_best_model(config, workdir)
  assert names == ['blue', 'green', 'red']
  config.eval_batch_size = 2
  results = predict.predict_files(model, variables, names, [good[0], corrupt, good[1]], config)
  assert [r['path'] for r in results] == [good[0], corrupt, good[1]]
  assert set(results[1]) == {'path', 'error'}
  assert results[1]['error'].startswith('not a readable image')
  for r in (results[0], results[2]):
    assert set(r) == {'path', 'top'}
    expected = _expected_probs(config, workdir, r['path'])
    order = np.argsort(-expected)
    assert [t['class'] for t in r['top']] == [names[k] for k in order]
    np.testing.assert_allclose([t['probability'] for t in r['top']], expected[order], atol=1e-6)


def test_run_predict_lines_and_json(trained, inputs, capsys):
  config, workdir = trained
  good, corrupt, folder = inputs
  args = [good[0], corrupt, folder, good[1]]
  assert predict.run_predict(config, workdir, args, json_output=False) == 0
  captured = capsys.readouterr()
  lines = captured.out.strip().splitlines()
  assert len(lines) == 2 + 6  # two files and the six images of the green folder
  assert lines[0].startswith(f'{good[0]}: ') and lines[0].count('%') == 3
  assert captured.err.strip().splitlines()[-1].startswith(f'{corrupt}: ERROR not a readable')

  assert predict.run_predict(config, workdir, args, json_output=True) == 0
  out = json.loads(capsys.readouterr().out)
  assert len(out) == 9
  by_path = {r['path']: r for r in out}
  assert set(by_path[corrupt]) == {'path', 'error'}
  for r in out:
    if r['path'] != corrupt:
      probs = [t['probability'] for t in r['top']]
      assert len(r['top']) == 3 and probs == sorted(probs, reverse=True)
      assert sum(probs) == pytest.approx(1, abs=1e-5)  # 3 classes: the top 3 is all of them
  expected = _expected_probs(config, workdir, good[1])
  assert by_path[good[1]]['top'][0]['class'] == ['blue', 'green', 'red'][expected.argmax()]


def test_run_predict_exit_status_when_nothing_is_readable(trained, inputs, tmp_path, capsys):
  config, workdir = trained
  _, corrupt, _ = inputs
  assert predict.run_predict(config, workdir, [corrupt, str(tmp_path / 'nope.jpg')],
                             json_output=False) == 1
  err = capsys.readouterr().err
  assert 'none of the 2 inputs could be predicted' in err and 'no such file' in err
  with pytest.raises(errors.UserError, match='needs image files'):
    predict.run_predict(config, workdir, [], json_output=False)


def test_main_predict_json_exit_status(trained, inputs):
  """Through main.py: --json reaches run_predict and its return value is the exit status
  (1: nothing could be predicted; the mixed case returns 0 above)."""
  _, workdir = trained
  _, corrupt, _ = inputs
  cmd = [sys.executable, 'main.py', '--mode=predict', f'--workdir={workdir}', '--json', corrupt]
  run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=300)
  assert run.returncode == 1, run.stderr[-2000:]
  out = json.loads(run.stdout)
  assert [set(r) for r in out] == [{'path', 'error'}] and out[0]['path'] == corrupt
  assert 'none of the 1 inputs could be predicted' in run.stderr
