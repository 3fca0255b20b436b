r"""Train-step, compile, input-pipeline and end-to-end timings: ours vs Keras 3/TF vs PyTorch.

  python experiments/benchmark.py                       # everything, about 10 min on 2 cores
  python -m experiments.benchmark --parts=train_step --sizes=128 --out=/tmp/b.json
  python -m experiments.benchmark --parts=train_step --malloc=system,hugepages,tcmalloc

Every framework runs the same network (5 x [conv 64 k3 VALID, BN, ReLU, 2x2 max-pool], dense
128, BN, ReLU, dropout 0.2, dense 10; Adam 1e-3; batch 32; float32; no augmentation) in a
process of its own, so one framework's thread pools never run beside another's. Ours is
`cnn.train.create_train_state` + `cnn.train.steps_for(...).train` with configs/optimal.py (and, as
`ours_bf16`, with config.dtype=bfloat16). Keras runs as the reference did: `jit_compile=False`,
`train_on_batch` on in-memory tensors. PyTorch runs eagerly with channels-last tensors (needs
the `bench` extra: `pip install -e .[bench]`).

The train-step part interleaves: each round runs a few steps of every framework in turn and
the medians over rounds are reported, so load from other users of the machine falls on all
frameworks alike. `compile` is the first step's time minus a later one's. `pipeline` times
`cnn.input_pipeline` on full-size photos (decode + cache once, then batches placed on the
devices) against the reference loader, `image_dataset_from_directory`, which decodes every
epoch. `e2e` times `--e2e_epochs` epochs with augmentation, starting from undecoded images, of
`cnn.train.train_and_evaluate` against the reference recipe (that loader with a 10% validation
split, Keras' augmentation layers, `model.fit`).

This file is the command line: what is measured is experiments/bench_measure.py, the processes
it runs in experiments/bench_harness.py, the table experiments/bench_report.py.
"""

import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ''):
  # Run as a script (python experiments/benchmark.py): sys.path holds experiments/, not the
  # repository that `cnn`, `configs` and `experiments` live in.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

from experiments import bench_harness  # pylint: disable=g-import-not-at-top
from experiments import bench_measure  # pylint: disable=g-import-not-at-top
from experiments import bench_report  # pylint: disable=g-import-not-at-top

_PARTS = flags.DEFINE_list('parts', ['train_step', 'compile', 'pipeline', 'e2e'],
                           'Parts to run: train_step, compile, pipeline, e2e.')
_SIZES = flags.DEFINE_list('sizes', ['128', '256'], 'Image sizes of the train-step part.')
_FRAMEWORKS = flags.DEFINE_list('frameworks', ['ours', 'ours_bf16', 'keras', 'torch'],
                                'Frameworks of the train-step and compile parts: ours, '
                                'ours_bf16 (config.dtype=bfloat16), keras, torch, flax_nn_conv '
                                '(ours with nn.Conv instead of cnn.layers.Conv).')
_ROUNDS = flags.DEFINE_integer('rounds', 4, 'Interleaved rounds of the train-step part.')
_STEPS = flags.DEFINE_integer('steps_per_round', 2, 'Timed steps per framework and round.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Batch size.')
_MALLOC = flags.DEFINE_list(
    'malloc', ['system'],
    'Allocators to run the train-step part under, each for every framework: system (glibc '
    'as is), hugepages (glibc with GLIBC_TUNABLES=glibc.malloc.hugetlb=1), tcmalloc '
    '(LD_PRELOAD of libtcmalloc_minimal.so.4). glibc maps every large buffer afresh, so each '
    'step page-faults all of its activations; the others reuse or map them in 2 MB pages.')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', os.environ.get('CNN_TEST_DATA', str(
        pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'monkeys10')),
    'Image folder (train/<class>/, val/<class>/) of the pipeline and e2e parts.')
_FULLRES_DIR = flags.DEFINE_string(
    'fullres_dir', str(pathlib.Path(_DATA_DIR.default).parent / 'monkeys10_fullres_sample'),
    'Full-size photos (train/<class>/) whose decoding the pipeline part times.')
_E2E_SIZE = flags.DEFINE_integer('e2e_size', 128, 'Image size of the pipeline and e2e parts.')
_E2E_EPOCHS = flags.DEFINE_integer('e2e_epochs', 5, 'Epochs of the e2e part.')
_OUT = flags.DEFINE_string('out', 'benchmark.json', 'Where the JSON results go.')
_CONV_IMPL = flags.DEFINE_enum('conv_impl', 'auto', ['auto', 'cpu_eigen', 'xla'],
                               'Our convolutions: config.conv_impl of the runs timed as ours.')


def _check_flags() -> None:
  """app.UsageError for a part, allocator or framework the benchmark does not know."""
  known = {'--parts': {'train_step', 'compile', 'pipeline', 'e2e'},
           '--malloc': set(bench_harness.MALLOC_ENV), '--frameworks': set(bench_measure.BUILDERS)}
  for flag, values in (('--parts', _PARTS.value), ('--malloc', _MALLOC.value),
                       ('--frameworks', _FRAMEWORKS.value)):
    unknown = set(values) - known[flag]
    if unknown:
      raise app.UsageError(f'unknown {flag} {sorted(unknown)}; known: {sorted(known[flag])}')


def main(argv):
  del argv
  _check_flags()
  parts, frameworks = set(_PARTS.value), list(_FRAMEWORKS.value)
  out: dict[str, Any] = {'machine': bench_report.machine(), 'batch_size': _BATCH.value,
                         'malloc': _MALLOC.value[0], 'conv_impl': _CONV_IMPL.value}
  t_all = time.perf_counter()
  if parts & {'train_step', 'compile'}:
    _train_step_part(out, parts, frameworks)
  tmp = tempfile.mkdtemp(prefix='cnn_bench_')
  try:
    if 'pipeline' in parts:
      out['input_pipeline'] = _pipeline_part(out, tmp)
    if 'e2e' in parts:
      out['end_to_end'] = _e2e_part(tmp)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  out['versions'] = bench_report.versions(frameworks)
  out['total_s'] = time.perf_counter() - t_all
  bench_report.print_table(out, frameworks)
  pathlib.Path(_OUT.value).write_text(json.dumps(out, indent=2) + '\n')
  print(f'wrote {_OUT.value}')


def _train_step_part(out: dict, parts: set[str], frameworks: list[str]) -> None:
  """Interleaved train steps of every framework, per allocator and size, into `out`."""
  builders = {fw: bench_measure.BUILDERS[fw] for fw in frameworks}
  by_malloc = {}
  for malloc in _MALLOC.value:
    detail = by_malloc[malloc] = {}
    for size in (int(s) for s in _SIZES.value):
      print(f'train step at {size}px, {malloc} malloc ...', flush=True)
      setup = bench_harness.StepSetup(size, _BATCH.value, _CONV_IMPL.value)
      detail[str(size)] = bench_harness.time_train_steps(
          builders, setup, _ROUNDS.value, _STEPS.value, malloc)
  detail = by_malloc[_MALLOC.value[0]]  # the headline figures: the first allocator's
  pick = lambda d, key: {s: {fw: r.get(key) for fw, r in x.items()} for s, x in d.items()}
  if 'train_step' in parts:
    out['train_step'] = pick(detail, 'images_per_s')
    out['train_step_detail'] = detail
    out['ratios'] = bench_report.ratios(detail, frameworks)
    if len(by_malloc) > 1:
      out['train_step_by_malloc'] = {m: pick(d, 'images_per_s') for m, d in by_malloc.items()}
      out['ratios_by_malloc'] = {m: bench_report.ratios(d, frameworks)
                                 for m, d in by_malloc.items()}
      out['train_step_detail_by_malloc'] = by_malloc
  if 'compile' in parts:
    out['compile_s'] = pick(detail, 'compile_s')


def _in_process(fn, *args) -> dict:
  return bench_harness.run_in_process(fn, _MALLOC.value[0], *args)


def _pipeline_part(out: dict, tmp: str) -> dict | None:
  """Decoding the full-size photos: our one-off cache build against Keras' every epoch."""
  if not os.path.isdir(os.path.join(_FULLRES_DIR.value, 'train')):
    print(f'skipping pipeline: no photos at {_FULLRES_DIR.value} (--fullres_dir)')
    return None
  print('input pipeline ...', flush=True)
  data_dir = bench_measure.fullres_folder(_FULLRES_DIR.value, os.path.join(tmp, 'fullres'))
  size = _E2E_SIZE.value
  ours = _in_process(bench_measure.ours_pipeline, data_dir, size, _BATCH.value,
                      os.path.join(tmp, 'fullres_cache'))
  keras_ref = _in_process(bench_measure.keras_pipeline, data_dir, size, _BATCH.value)
  step = out.get('train_step_detail', {}).get(str(size), {}).get('ours', {})
  ok = 'error' not in ours and 'error' not in keras_ref
  return {'size': size, 'photos': _FULLRES_DIR.value, 'ours': ours, 'keras': keras_ref,
          'ours_cache_build_vs_keras_epoch': (ours['cold_images_per_s'] / keras_ref['images_per_s']
                                              if ok else None),
          'ours_cache_build_vs_keras_fastest_epoch': (
              ours['cold_images_per_s'] / keras_ref['fastest_images_per_s'] if ok else None),
          'ours_cached_vs_train_step': (ours['cached_images_per_s'] / step['images_per_s']
                                        if ok and 'images_per_s' in step else None)}


def _e2e_part(tmp: str) -> dict | None:
  """`--e2e_epochs` epochs with augmentation, from nothing decoded, ours against Keras'."""
  if not os.path.isdir(os.path.join(_DATA_DIR.value, 'train')):
    print(f'skipping e2e: no image folder at {_DATA_DIR.value} (--data_dir)')
    return None
  print('end to end ...', flush=True)
  size, epochs = _E2E_SIZE.value, _E2E_EPOCHS.value
  run = bench_measure.E2ERun(_DATA_DIR.value, size, _BATCH.value, epochs)
  ours = _in_process(bench_measure.ours_e2e, run, os.path.join(tmp, 'run'),
                      os.path.join(tmp, 'cache'), _CONV_IMPL.value)
  keras_ref = _in_process(bench_measure.keras_e2e, *run)
  ratio = lambda key: (keras_ref[key] / ours[key]
                       if ours.get(key) and keras_ref.get(key) else None)
  for r in (ours, keras_ref):
    if r.get('later_epochs_s'):
      r['median_later_epoch_s'] = statistics.median(r['later_epochs_s'])
  return {'size': size, 'ours': ours, 'keras': keras_ref,
          'wall_speedup_vs_keras': ratio('wall_s'),
          'epoch_speedup_vs_keras': ratio('median_later_epoch_s')}


if __name__ == '__main__':
  app.run(main)
