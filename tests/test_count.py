"""The cost counts against the model's real parameters, hand arithmetic and XLA's cost analysis."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from cnn import count
from cnn import errors
from cnn import models
from configs import default
from configs import optimal


def _model(m, k, n, padding, batch_norm=False):
  """The 5-block, 10-class CNN with `m` filters per block, kernel `k` and dense size `n`."""
  return models.CNN(filters=(m,) * 5, kernel_size=k, dense_size=n, num_classes=10,
                    padding=padding, batch_norm=batch_norm)


def _init_shapes(model, s):
  """The variables `init_variables` creates, as shapes: tracing gives them without compiling."""
  return jax.eval_shape(lambda: models.init_variables(model, s, jax.random.key(0)))


def _xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])


# (m, k, n, s): odd and even sizes, sizes that do not halve evenly, kernels 3/5/7.
CASES = [(4, 3, 8, 96), (3, 3, 10, 101), (8, 5, 16, 163), (16, 3, 32, 128), (6, 7, 12, 250)]


def _case_id(case):
  """A case's test id, as pytest would write its fields as separate parameters: `4-3-8-96`."""
  return '-'.join(map(str, case))


@pytest.mark.parametrize('case', CASES, ids=_case_id)
@pytest.mark.parametrize('padding', ['VALID', 'SAME'])
@pytest.mark.parametrize('batch_norm', [False, True])
def test_closed_form_matches_the_initialised_model(case, padding, batch_norm):
  m, k, n, s = case
  model = _model(m, k, n, padding, batch_norm)
  variables = _init_shapes(model, s)
  cf = count.closed_form(m, k, n, s, padding, batch_norm=batch_norm)
  assert cf.params == models.count_parameters(variables['params'])
  # MACs: the closed form against the per-layer count traced from the model.
  assert cf.macs == count.totals(count.layer_costs(model, s))['macs']
  # The model really produces s_L x s_L x m before flattening: the dense kernel has s_L²·m rows.
  fan_in = variables['params']['dense']['kernel'].shape[0]
  s_last = s // 32 if padding == 'SAME' else (s - 31 * (k - 1)) // 32
  assert fan_in == s_last * s_last * m


def test_closed_form_by_hand():
  # m=2, k=3, n=4, s=64, VALID: conv outputs 62, 29, 12, 4, 0 -> too small at block 5 ...
  with pytest.raises(ValueError, match='too small'):
    count.closed_form(2, 3, 4, 64, 'VALID')
  # ... at s=96: conv outputs 94, 45, 20, 8, 2; after the last pool 1.
  cf = count.closed_form(2, 3, 4, 96, 'VALID')
  macs = 94**2 * 27 * 2 + (45**2 + 20**2 + 8**2 + 2**2) * 9 * 2 * 2 + 1 * 2 * 4 + 4 * 10
  params = (27 * 2 + 2) + 4 * (9 * 2 * 2 + 2) + (1 * 2 * 4 + 4) + (4 * 10 + 10)
  assert (cf.macs, cf.params) == (macs, params)
  # SAME at s=96: conv outputs 96, 48, 24, 12, 6; after the last pool 3.
  cf = count.closed_form(2, 3, 4, 96, 'SAME')
  assert cf.macs == (96**2 * 27 * 2 + (48**2 + 24**2 + 12**2 + 6**2) * 36 + 9 * 2 * 4 + 40)
  assert cf.params == params - 8 + 9 * 2 * 4
  assert 'k²·m·s²·(3 + 85m/256)' in cf.macs_formula  # 96 = 3·32 halves evenly: geometric form
  # The geometric form's value equals the exact one when s halves evenly.
  m, k, n, s = 2, 3, 4, 96
  assert cf.macs == k * k * m * s * s * (3 + 85 * m / 256) + m * n * s * s / 1024 + 10 * n


def test_reference_optimal_config_has_446730_parameters(capsys):
  config = optimal.get_config()
  rows = count.layer_costs(models.create_model(config, 10), config.image_size)
  t = count.totals(rows)
  assert (t['params'], t['batch_stats']) == (446_730, 896)
  with pytest.raises(errors.UserError, match='positional'):
    count.run_count(config, '', ['x'])
  assert count.run_count(config, '', []) == 0
  out = capsys.readouterr().out
  assert 'Parameters: 446,730 (+ 896 batch-norm' in out
  assert 'params with batch norm = 4k²m² + 3k²m + 15m + s_5²·m·n + 13n + 10 = 446,730' in out
  total_line = next(line for line in out.splitlines() if line.startswith('total'))
  assert total_line.split()[1:] == ['446,730', '896', f'{t["macs"]:,}', f'{2 * t["macs"]:,}']
  # One table row per conv, batch norm and pool of 5 blocks, then dense, bn_dense and logits.
  names = [r.name for r in rows]
  assert names[:3] == ['conv1', 'bn1', 'pool1'] and names[-3:] == ['dense', 'bn_dense', 'logits']
  assert len(rows) == 5 * 3 + 3


def test_layer_rows_agree_with_the_variables():
  config = default.get_config()
  config.batch_norm, config.image_size, config.first_layer_filters = True, 96, 8
  config.filter_org = 2.0  # 8, 16, 32, 64, 128 filters: not the textbook network
  model = models.create_model(config, 7)
  variables = _init_shapes(model, 96)
  rows = count.layer_costs(model, 96)
  t = count.totals(rows)
  assert t['params'] == models.count_parameters(variables['params'])
  assert t['batch_stats'] == models.count_parameters(variables['batch_stats'])
  conv = {r.name: r for r in rows if r.kind == 'conv'}
  # conv3: input 20x20x16 (96 -> 94 -> 47 -> 45 -> 22), output 20x20x32.
  assert conv['conv3'].output_shape == (20, 20, 32)
  assert conv['conv3'].macs == 20 * 20 * 9 * 16 * 32
  assert rows[-1].macs == 64 * 7  # logits: dense_size x classes


@pytest.mark.parametrize('padding', ['VALID', 'SAME'])
def test_single_ops_cost_exactly_two_flops_per_mac_in_xla(padding):
  """XLA counts 2 FLOPs per MAC of a conv, skipping the taps on 'same' padding's zero border."""
  x, w = jnp.zeros((1, 40, 40, 3)), jnp.zeros((5, 5, 3, 8))
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  out = 40 if padding == 'SAME' else 36
  textbook, inside = count.conv_macs((40, 40), (out, out), (5, 5, 3, 8), padding)
  assert textbook == out * out * 25 * 3 * 8
  assert _xla_flops(conv, x, w) == 2 * inside
  if padding == 'SAME':
    # Per axis the 40 positions see 5 taps each, less 2+1 at each border: 194 of 200.
    assert inside == 194 * 194 * 3 * 8
  else:
    assert inside == textbook
  assert _xla_flops(jnp.dot, jnp.zeros((1, 64)), jnp.zeros((64, 32))) == 2 * 64 * 32


@pytest.mark.parametrize('padding,m,s', [('VALID', 32, 128), ('SAME', 32, 128), ('VALID', 16, 96)])
def test_flops_agree_with_xla_cost_analysis(padding, m, s):
  """2·MACs is within 3% of XLA's count of the whole forward pass.

  XLA's total = 2·MACs (without padding taps) + one FLOP per element of each bias add and ReLU
  + 3 per output of each 2x2 max pool (a 4-way max). With >= 16 channels a conv does
  2·k²·C_in >= 288 FLOPs per output element against ~3 elementwise ones, so the gap is small.
  """
  model = _model(m, 3, 32, padding)
  rows = count.layer_costs(model, s)
  t = count.totals(rows)
  xla = count.xla_forward_flops(model, s)
  assert abs(xla - 2 * t['macs']) / xla < 0.03
  # The gap accounted for op by op: bias add and ReLU on every conv and dense output, pooling.
  elementwise = 0
  for r in rows:
    n = 1
    for d in r.output_shape:
      n *= d
    if r.kind == 'conv':
      elementwise += 2 * n
    elif r.kind == 'pool':
      elementwise += 3 * n
    elif r.name == 'dense':
      elementwise += 2 * n
    elif r.name == 'logits':
      elementwise += n  # bias only
  assert xla - 2 * t['macs_no_padding'] == pytest.approx(elementwise, rel=1e-3)


def test_main_count_prints_the_table():
  """`python main.py --mode=count --config=configs/optimal.py`, as a user would run it."""
  repo = pathlib.Path(__file__).resolve().parents[1]
  run = subprocess.run([sys.executable, 'main.py', '--mode=count', '--config=configs/optimal.py'],
                       cwd=repo, capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert run.returncode == 0, run.stderr[-2000:]
  assert 'Parameters: 446,730' in run.stdout
  assert 'VALID padding  (this config)' in run.stdout and 'SAME padding:' in run.stdout
