"""The benchmark's report: the machine and versions measured on, ratios and the printed table."""

import os
import pathlib
import platform
import subprocess
import sys



def machine() -> dict:
  model = platform.processor()
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        model = line.split(':', 1)[1].strip()
        break
  except OSError:
    pass
  load = os.getloadavg() if hasattr(os, 'getloadavg') else None
  try:
    commit = subprocess.run(['git', 'describe', '--always', '--dirty'], capture_output=True,
                            text=True, cwd=pathlib.Path(__file__).parent, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = None
  return {'cores': os.cpu_count(), 'cpu_model': model, 'load_average_at_start': load,
          'python': sys.version.split()[0], 'git': commit}


def versions(frameworks) -> dict:
  out = {}
  for name in ['jax', 'flax', 'optax'] + [{'keras': 'keras', 'torch': 'torch'}.get(f, '')
                                         for f in frameworks]:
    if not name or name in out:
      continue
    try:
      out[name] = __import__(name).__version__
    except ImportError:
      out[name] = None
  return out


def ratios(detail: dict, frameworks: list[str]) -> dict:
  """ours' images/s over each other framework's, per size."""
  speed = lambda d, fw: d.get(fw, {}).get('images_per_s')
  return {s: {f'ours_vs_{fw}': (speed(d, 'ours') / speed(d, fw)
                                if speed(d, 'ours') and speed(d, fw) else None)
              for fw in frameworks if fw != 'ours'} for s, d in detail.items()}


def fmt(x, spec='.1f'):
  return format(x, spec) if isinstance(x, (int, float)) else '-'


def print_table(out: dict, frameworks: list[str]) -> None:
  m = out['machine']
  print(f'\n{m["cores"]} cores, {m["cpu_model"]}, load average at start '
        f'{fmt(m["load_average_at_start"][0], ".2f") if m["load_average_at_start"] else "-"}')
  others = [fw for fw in frameworks if fw != 'ours']
  if 'train_step' in out:
    by_malloc = out.get('train_step_by_malloc', {out['malloc']: out['train_step']})
    ratios = out.get('ratios_by_malloc', {out['malloc']: out['ratios']})
    print('train step, images/s (median over interleaved rounds); ours / other')
    width = lambda name: max(9, len(name) + 2)
    print(f'  {"malloc":10s}{"size":>5s}' + ''.join(f'{fw:>{width(fw)}s}' for fw in frameworks)
          + ''.join(f'{"/" + fw:>{width(fw)}s}' for fw in others))
    for malloc, table in by_malloc.items():
      for s, row in table.items():
        print(f'  {malloc:10s}{s:>5s}'
              + ''.join(f'{fmt(row.get(fw)):>{width(fw)}s}' for fw in frameworks)
              + ''.join(f'{fmt(ratios[malloc][s].get("ours_vs_" + fw), ".2f"):>{width(fw)}s}'
                        for fw in others))
  if 'compile_s' in out:
    print('first step minus a later one (compilation, tracing), s')
    for s, row in out['compile_s'].items():
      print(f'  {s:>5s}  ' + '  '.join(f'{fw} {fmt(row.get(fw))}' for fw in frameworks))
  if out.get('input_pipeline'):
    p, o, k = out['input_pipeline'], out['input_pipeline']['ours'], out['input_pipeline']['keras']
    print(f'input pipeline, full-size photos to {p["size"]}px: ours decodes and caches '
          f'{fmt(o.get("cold_images_per_s"))} img/s once, Keras image_dataset_from_directory '
          f'decodes {fmt(k.get("images_per_s"))} img/s every epoch (median; fastest epoch '
          f'{fmt(k.get("fastest_images_per_s"))}): '
          f'{fmt(p["ours_cache_build_vs_keras_epoch"], ".2f")}x '
          f'({fmt(p["ours_cache_build_vs_keras_fastest_epoch"], ".2f")}x the fastest); '
          f'ours then serves '
          f'{fmt(o.get("cached_images_per_s"), ".0f")} img/s from the cache '
          f'({fmt(p["ours_cached_vs_train_step"], ".0f")}x the train step)')
  if out.get('end_to_end'):
    e, o, k = out['end_to_end'], out['end_to_end']['ours'], out['end_to_end']['keras']
    print(f'end to end at {e["size"]}px, {o.get("epochs")} epochs with augmentation, from '
          f'undecoded images: ours {fmt(o.get("wall_s"))} s, Keras {fmt(k.get("wall_s"))} s: '
          f'{fmt(e["wall_speedup_vs_keras"], ".2f")}x; median epoch after the first (train + '
          f'validation) ours {fmt(o.get("median_later_epoch_s"))} s, Keras '
          f'{fmt(k.get("median_later_epoch_s"))} s: {fmt(e["epoch_speedup_vs_keras"], ".2f")}x')
  print(f'total {out["total_s"]:.0f} s')
