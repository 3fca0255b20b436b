"""Parameters and multiply-accumulates (MACs) of one forward pass of one image, per layer.

Conventions, as in the textbook count of a CNN's cost:
  * A conv layer does H_out * W_out * k * k * C_in * C_out MACs; with 'same' padding this
    includes the taps that land on the zero border (XLA skips those, see `conv_macs`).
  * A dense layer does in * out MACs.
  * Bias adds, batch norm, activations, pooling and the softmax are not MACs: they are one
    cheap operation per element, a few percent of the total for this network.
  * FLOPs = 2 * MACs (a multiply and an add per MAC), the convention of XLA's cost analysis.
XLA's own count of the compiled forward pass (`xla_forward_flops`) adds the per-element ops and
skips padding taps; tests/test_count.py reconciles the two exactly.
"""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cnn import checkpoints
from cnn import errors
from cnn import layers
from cnn import models

# The reference's dataset (iNaturalist 12K) has 10 classes; `count` needs no data folder.
DEFAULT_NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class LayerCost:
  name: str
  kind: str  # conv, batch_norm, pool, dense
  output_shape: tuple[int, ...]  # of one image, without the batch axis
  params: int
  batch_stats: int
  macs: int
  macs_no_padding: int  # MACs without the taps on 'same' padding's zero border


def _valid_taps(in_size: int, out_size: int, k: int, padding: str) -> int:
  """Sum over output positions of the kernel taps that fall inside the input (stride 1)."""
  lo = (k - 1) // 2 if padding == 'SAME' else 0  # XLA/TF put the odd extra pad at the end
  return sum(min(i - lo + k, in_size) - max(i - lo, 0) for i in range(out_size))


def conv_macs(in_hw: tuple[int, int], out_hw: tuple[int, int], kernel_shape: tuple[int, ...],
              padding: str) -> tuple[int, int]:
  """(textbook MACs, MACs without padding taps) of a stride-1 (k, k, c_in, c_out) convolution."""
  k, _, c_in, c_out = kernel_shape
  textbook = out_hw[0] * out_hw[1] * k * k * c_in * c_out
  inside = (_valid_taps(in_hw[0], out_hw[0], k, padding)
            * _valid_taps(in_hw[1], out_hw[1], k, padding) * c_in * c_out)
  return textbook, inside


def _abstract_variables(model: models.CNN, image_size: int) -> dict:
  return jax.eval_shape(lambda: models.init_variables(model, image_size, jax.random.key(0)))


def layer_costs(model: models.CNN, image_size: int) -> list[LayerCost]:
  """Every layer of `model` on one image_size x image_size RGB image, in forward order.

  Shapes come from tracing the model (no compute) and recording each convolution's output, so the
  count follows the code, not a copy of its arithmetic.
  """
  variables = _abstract_variables(model, image_size)
  params = variables['params']
  stats = variables.get('batch_stats', {})
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  conv_out = {}

  def record(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if isinstance(context.module, (nn.Conv, layers.Conv)) and context.method_name == '__call__':
      conv_out[context.module.name] = tuple(y.shape[1:])
    return y

  with nn.intercept_methods(record):
    jax.eval_shape(model.apply, variables, x)

  size = models.count_parameters
  rows, in_hw = [], (image_size, image_size)
  for i in range(1, len(model.filters) + 1):
    out = conv_out[f'conv{i}']
    macs, inside = conv_macs(in_hw, out[:2], params[f'conv{i}']['kernel'].shape, model.padding)
    rows.append(LayerCost(f'conv{i}', 'conv', out, size(params[f'conv{i}']), 0, macs, inside))
    if f'bn{i}' in params:
      rows.append(LayerCost(f'bn{i}', 'batch_norm', out, size(params[f'bn{i}']),
                            size(stats[f'bn{i}']), 0, 0))
    in_hw = (out[0] // 2, out[1] // 2)
    rows.append(LayerCost(f'pool{i}', 'pool', (*in_hw, out[2]), 0, 0, 0, 0))
  for name in ('dense', 'bn_dense', 'logits'):
    if name not in params:
      continue
    if name.startswith('bn'):
      n = params[name]['scale'].shape[0]
      rows.append(LayerCost(name, 'batch_norm', (n,), size(params[name]), size(stats[name]), 0, 0))
    else:
      fan_in, fan_out = params[name]['kernel'].shape
      rows.append(LayerCost(name, 'dense', (fan_out,), size(params[name]), 0, fan_in * fan_out,
                            fan_in * fan_out))
  return rows


def totals(rows: list[LayerCost]) -> dict[str, int]:
  out = {f: sum(getattr(r, f) for r in rows)
         for f in ('params', 'batch_stats', 'macs', 'macs_no_padding')}
  out['flops'] = 2 * out['macs']
  return out


def xla_forward_flops(model: models.CNN, image_size: int) -> float:
  """FLOPs of the compiled forward pass of one image by XLA's HloCostAnalysis.

  XLA counts 2 per MAC (skipping padding taps), one per element of elementwise ops and 3 per
  output of a 2x2 max pool. Variables are arguments, not constants, so nothing folds away.
  """
  # The textbook convolutions: cnn.layers.Conv computes extra zero columns to pick a kernel.
  model = model.clone(conv_impl='xla')
  variables = _abstract_variables(model, image_size)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return float(jax.jit(model.apply).lower(variables, x).compile().cost_analysis()['flops'])


@dataclasses.dataclass(frozen=True)
class ClosedForm:
  """The textbook network's totals: L conv layers of m k x k filters, n dense neurons, c classes."""
  params_formula: str
  macs_formula: str
  sizes_formula: str  # defines h_i (conv i's output side) and s_L (side after the last pool)
  params: int
  macs: int


def _poly(terms: list[tuple[int, str]]) -> str:
  """'a·x + b·y + c' from (coefficient, symbol) pairs, dropping zero terms and 1· factors."""
  return ' + '.join(sym if sym and coef == 1 else f'{coef}{sym}' for coef, sym in terms if coef)


# PLR0913: the symbols of the formula (m, k, n, s) and the network's shape.
def closed_form(m: int, k: int, n: int, s: int, padding: str, *, conv_layers: int = 5,  # noqa: PLR0913
                num_classes: int = DEFAULT_NUM_CLASSES, batch_norm: bool = False) -> ClosedForm:
  """Parameters and MACs of the textbook CNN as formulas in (m, k, n, s) and as numbers.

  Block i is conv (stride 1) -> 2x2 max pool that drops an odd row. With s_0 = s:
    valid: h_i = s_{i-1} - (k-1),  s_i = floor(h_i / 2), which unrolls to
           s_i = floor((s - (2^i - 1)(k-1)) / 2^i)   (the floors nest exactly);
    same:  h_i = s_{i-1},  s_i = floor(s / 2^i).
  params = (L-1)k²m² + C·k²m + L·m [conv] + s_L²·m·n + n [dense] + (n+1)c [logits]
           (+ 2(L·m + n) with batch norm: scale and offset; the running mean and variance
           are 2(L·m + n) batch statistics, not parameters);
  MACs   = C·k²·m·h_1² + k²m²·(h_2² + ... + h_L²) + s_L²·m·n + n·c.
  """
  padding = padding.upper()
  L, c, C = conv_layers, num_classes, 3  # C: RGB input channels
  if padding == 'VALID':
    h = [(s - (2**(i - 1) - 1) * (k - 1)) // 2**(i - 1) - (k - 1) for i in range(1, L + 1)]
    s_last = (s - (2**L - 1) * (k - 1)) // 2**L
    sizes = (f'h_i = ⌊(s − (2^(i−1) − 1)(k − 1)) / 2^(i−1)⌋ − (k − 1),  '
             f's_{L} = ⌊(s − {2**L - 1}(k − 1)) / {2**L}⌋')
  elif padding == 'SAME':
    h = [s // 2**(i - 1) for i in range(1, L + 1)]
    s_last = s // 2**L
    sizes = f'h_i = ⌊s / 2^(i−1)⌋,  s_{L} = ⌊s / {2**L}⌋'
  else:
    raise ValueError(f'padding {padding!r} is neither VALID nor SAME')
  if min(h + [s_last]) < 1:
    raise ValueError(f'image size {s} is too small for {L} {padding} blocks of kernel {k}')

  bn = 2 if batch_norm else 0
  params = ((L - 1) * k * k * m * m + C * k * k * m + (L + bn * L) * m
            + s_last**2 * m * n + (1 + bn + c) * n + c)
  macs = (C * k * k * m * h[0]**2 + k * k * m * m * sum(x * x for x in h[1:])
          + s_last**2 * m * n + n * c)
  params_formula = _poly([(L - 1, 'k²m²'), (C, 'k²m'), (L + bn * L, 'm'), (1, f's_{L}²·m·n'),
                          (1 + bn + c, 'n'), (c, '')])
  deep = ' + '.join(f'h_{i}²' for i in range(2, L + 1))
  macs_formula = _poly([(C, 'k²·m·h_1²'), (1, f'k²m²·({deep})' if deep else ''),
                        (1, f's_{L}²·m·n'), (c, 'n')])
  if padding == 'SAME' and s % 2**L == 0:
    # h_i = s / 2^(i-1) exactly: the deep layers' sum is a geometric series.
    geo = sum(4**(L - 1) // 4**(i - 1) for i in range(2, L + 1))
    macs_formula += (f'  =  k²·m·s²·({C} + {geo}m/{4**(L - 1)}) + m·n·s²/{4**L} + {c}n'
                     if L > 1 else '')
  return ClosedForm(params_formula, macs_formula, sizes, params, macs)


def format_table(rows: list[LayerCost]) -> str:
  """A fixed-width table of every layer and the totals, numbers with thousands separators."""
  header = ('layer', 'output shape', 'params', 'BN stats', 'MACs', 'FLOPs')
  body = [(r.name, '×'.join(map(str, r.output_shape)), f'{r.params:,}',
           f'{r.batch_stats:,}' if r.batch_stats else '', f'{r.macs:,}' if r.macs else '',
           f'{2 * r.macs:,}' if r.macs else '') for r in rows]
  t = totals(rows)
  total = ('total', '', f'{t["params"]:,}', f'{t["batch_stats"]:,}' if t['batch_stats'] else '',
           f'{t["macs"]:,}', f'{t["flops"]:,}')
  widths = [max(len(row[j]) for row in [header, *body, total]) for j in range(len(header))]

  def line(row):
    cells = enumerate(zip(row, widths))
    return '  '.join(v.ljust(w) if j < 2 else v.rjust(w) for j, (v, w) in cells)

  rule = '-' * len(line(header))
  return '\n'.join([line(header), rule, *map(line, body), rule, line(total)])


def report(config: ml_collections.ConfigDict, num_classes: int) -> str:
  """The whole `--mode=count` text for `config`: layer table, closed forms, XLA's count."""
  model = models.create_model(config, num_classes)
  s = config.image_size
  rows = layer_costs(model, s)
  t = totals(rows)
  out = [f'Cost of one forward pass of one {s}x{s}x3 image, {num_classes} classes, '
         f'{model.padding} padding, filters {list(model.filters)}, kernel '
         f'{model.kernel_size}x{model.kernel_size}, dense {model.dense_size}:', '',
         format_table(rows), '',
         f'Parameters: {t["params"]:,}' + (f' (+ {t["batch_stats"]:,} batch-norm running '
                                           'statistics, not trained)' if t['batch_stats'] else ''),
         f'MACs: {t["macs"]:,} ({t["macs"] / 1e9:.3f} G)   FLOPs = 2·MACs: {t["flops"]:,} '
         f'({t["flops"] / 1e9:.3f} GFLOPs)',
         'Bias adds, batch norm, activations and pooling are not counted as MACs.']
  if model.padding == 'SAME':
    out.append('Without the taps on the zero border (as XLA counts): '
               f'{t["macs_no_padding"]:,} MACs.')
  xla = xla_forward_flops(model, s)
  out.append(f'XLA cost analysis of the compiled forward pass: {xla:,.0f} FLOPs '
             f'({xla / t["flops"] - 1:+.2%} vs 2·MACs; XLA also counts bias adds, activations, '
             'batch norm and pooling, and skips padding taps).')

  m, k, n = config.first_layer_filters, config.kernel_size, config.dense_size
  out += ['', f'Textbook closed form: {config.conv_layers} conv layers of m filters of k x k '
              f'(input 3 channels), n dense neurons, {num_classes} outputs, image s x s; '
              f'here m={m}, k={k}, n={n}, s={s}.']
  if config.filter_org != 1:
    out.append(f'(This config has filter_org={config.filter_org}, so its layers do not all have '
               'm filters: the closed form describes the textbook network, not this one.)')
  for padding in ('VALID', 'SAME'):
    this = '  (this config)' if padding == model.padding else ''
    try:
      forms = [closed_form(m, k, n, s, padding, conv_layers=config.conv_layers,
                           num_classes=num_classes, batch_norm=bn)
               for bn in sorted({False, bool(config.batch_norm)})]
    except ValueError as e:
      out += ['', f'  {padding} padding{this}: {e}']
      continue
    cf = forms[0]
    out += ['', f'  {padding} padding{this}:  {cf.sizes_formula}',
            f'    params = {cf.params_formula} = {cf.params:,}']
    if len(forms) > 1:
      out.append(f'    params with batch norm = {forms[1].params_formula} = {forms[1].params:,}')
    out.append(f'    MACs   = {cf.macs_formula} = {cf.macs:,}  (FLOPs {2 * cf.macs:,})')
  return '\n'.join(out)


def run_count(config: ml_collections.ConfigDict, workdir: str = '', argv_rest=()) -> int:
  """--mode=count: prints the cost report; uses the run's class count when workdir has one."""
  if argv_rest:
    raise errors.UserError(f'--mode=count takes no positional arguments, got {list(argv_rest)}')
  summary = os.path.join(workdir, 'summary.json') if workdir else ''
  names = checkpoints.read_json(summary).get('class_names') if os.path.isfile(summary) else None
  print(report(config, len(names) if names else DEFAULT_NUM_CLASSES), flush=True)
  return 0
