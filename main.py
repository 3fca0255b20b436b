"""Entry point: `python main.py --config=configs/optimal.py --workdir=DIR [--mode=MODE]`.

Any config field can be overridden: `--config.image_size=96 --config.wandb_mode=disabled`.
Modes other than train and count start from a trained workdir and reuse its config.json.
"""

import importlib
import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cnn import config as config_lib
from cnn import errors

FLAGS = flags.FLAGS


def fail(message) -> int:
  """Prints `message` as the one `error:` line a user sees; returns the exit status, 2."""
  print('error: ' + ' '.join(str(message).split()), file=sys.stderr)
  return 2


def unknown_field(e: AttributeError) -> str:
  """ml_collections' AttributeError(KeyError("'field'\nDid you mean ...")) as one sentence."""
  detail = e.args[0] if e.args else e
  detail = detail.args[0] if isinstance(detail, KeyError) and detail.args else str(detail)
  field, _, hint = str(detail).partition('\n')
  return (f'--config.{field.strip(chr(39))} is not a field of the config. '
          f'{hint + " " if hint else ""}configs/default.py lists every field with its meaning.')


try:  # without --config=FILE this already reads the --config.FIELD overrides from sys.argv
  config_flags.DEFINE_config_file('config', 'configs/default.py', 'Config file (get_config()).')
except AttributeError as e:
  sys.exit(fail(unknown_field(e)))

flags.DEFINE_string('workdir', '', 'Where a run keeps everything; default workdirs/<run name>.')
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate', 'predict', 'guided_bp', 'count', 'sweep',
                                   'sweep_report'], 'What to do.')
flags.DEFINE_bool('json', False, 'predict: print JSON instead of one line per image.')
flags.DEFINE_string('sweep_config', 'configs/sweep_bayes.yaml', 'sweep: the sweep YAML.')
flags.DEFINE_integer('sweep_count', 10, 'sweep: total number of runs in the workdir.')
flags.DEFINE_string('sweep_params', '', 'JSON file of sweep values (W&B agent ${args_json_file}).')
flags.DEFINE_string('coordinator_address', None, 'Multi-host: HOST:PORT of process 0, for '
                    'jax.distributed.initialize (with --num_processes and --process_id).')
flags.DEFINE_integer('num_processes', None, 'Multi-host: how many processes train the run.')
flags.DEFINE_integer('process_id', None, 'Multi-host: this process, 0 .. num_processes - 1.')
flags.DEFINE_bool('distributed', None, 'Multi-host where JAX finds the processes itself (SLURM, '
                  'Cloud TPU pods); default: with --coordinator_address or '
                  'JAX_COORDINATOR_ADDRESS.')


def _cnn(module: str):
  """cnn.<module>, imported on use: a mode pays only for the libraries it needs."""
  return importlib.import_module(f'cnn.{module}')


def _sweep(config, workdir, args):
  if args or not workdir:
    raise app.UsageError('--mode=sweep takes no positional arguments and needs --workdir=DIR')
  overridden = FLAGS['config'].override_values
  _cnn('sweep').run_sweep(config, workdir, sweep_config_path=FLAGS.sweep_config,
                          sweep_count=FLAGS.sweep_count,
                          overrides=tuple(dict.fromkeys(k.split('.')[0] for k in overridden)))
  return 0


# mode -> (function of (config, workdir, positional args), needs the workdir of a trained run).
MODES = {
    'train': (lambda c, w, a: _cnn('runs').run_train(c, w, a), False),
    'evaluate': (lambda c, w, a: _cnn('evaluate').run_evaluate(c, w, a), True),
    'predict': (lambda c, w, a: _cnn('predict').run_predict(c, w, a, json_output=FLAGS.json),
                True),
    'guided_bp': (lambda c, w, a: _cnn('guided_backprop').run_guided_bp(c, w, a), True),
    'count': (lambda c, w, a: _cnn('count').run_count(c, w, a), False),
    'sweep': (_sweep, False),
    'sweep_report': (lambda c, w, a: _cnn('sweep_report').run_sweep_report(c, w, a), False),
}


def default_workdir(config) -> str:
  sweep_id, run_id = os.environ.get('WANDB_SWEEP_ID'), os.environ.get('WANDB_RUN_ID')
  if sweep_id and run_id:  # under `wandb agent`: one folder per agent-assigned run
    return os.path.join('workdirs', f'sweep-{sweep_id}', f'{config_lib.run_name(config)}-{run_id}')
  return os.path.join('workdirs', config_lib.run_name(config))


def start_distributed() -> None:
  """jax.distributed.initialize with the flags given (JAX fills in the rest from its cluster
  environment); CPU collectives over gloo, so several CPU processes train one run."""
  import jax
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                             num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)


def resolve_config(mode: str, workdir: str):
  """The config for `mode`: the file's, or a trained workdir's, plus command-line overrides."""
  config = FLAGS.config
  if FLAGS.sweep_params or os.environ.get('WANDB_SWEEP_PARAM_PATH'):
    config = _cnn('sweep').agent_config(config, FLAGS.sweep_params)
  if MODES[mode][1]:
    config = _cnn('checkpoints').load_run_config(workdir)
    config.update_from_flattened_dict(dict(FLAGS['config'].override_values))
  return config


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but every bad flag is one `error:` line and exit status 2."""
  try:
    argv = FLAGS(argv)
    FLAGS.config.get('run_name')  # a --config FILE that failed to load raises only once used
    return argv
  except flags.Error as e:  # unknown flag, bad enum or literal; absl would add a usage hint
    sys.exit(fail(f'{e}. --helpshort lists the flags'))
  except AttributeError as e:
    sys.exit(fail(unknown_field(e)))
  except OSError as e:  # ml_collections' words for a --config FILE it could not load
    sys.exit(fail(str(e).removeprefix('Configuration is not available because of an earlier '
                                      'failure to load: ')))


def main(argv):
  """Runs FLAGS.mode; errors the user can fix propagate (run() prints them)."""
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every step of every save at INFO
  mode = FLAGS.mode
  fn, needs_workdir = MODES[mode]
  if needs_workdir and not FLAGS.workdir:
    raise app.UsageError(f'--mode={mode} needs --workdir=DIR of a trained run')
  if FLAGS.distributed or (FLAGS.distributed is None and (
      FLAGS.coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS'))):
    start_distributed()
  config = resolve_config(mode, FLAGS.workdir)
  workdir = FLAGS.workdir or (default_workdir(config) if mode == 'train' else '')
  if not needs_workdir:
    config_lib.validate(config)
  return fn(config, workdir, argv[1:])


def run(argv: list[str]) -> int:
  """main(argv) -> exit status; an error the user can fix is one `error:` line and status 2.

  app.UsageError is caught here too: absl would print the whole usage text before it.
  """
  try:
    return _leave(main(argv))
  except errors.DiskFullError as e:
    _silence_stderr()  # Orbax's threads would add a traceback for every array they lost
    return _leave(fail(e), now=True)
  except (errors.UserError, app.UsageError) as e:
    return _leave(fail(e))
  except Exception as e:
    if not _multi_process():
      raise
    import jax
    if not isinstance(e, jax.errors.JaxRuntimeError):
      traceback.print_exc()
      return _leave(1)
    return _leave(fail(
        f'process {jax.process_index()} of {jax.process_count()} lost the rest of the run '
        f'({str(e).splitlines()[0][:200]}). Run the same command on every process to resume '
        'from the last checkpoint'))


def _silence_stderr() -> None:
  """From here on only this thread's sys.stderr reaches the terminal; fd 2 goes nowhere."""
  sys.stderr.flush()
  sys.stderr = os.fdopen(os.dup(2), 'w')
  os.dup2(os.open(os.devnull, os.O_WRONLY), 2)


def _multi_process() -> bool:
  jax = sys.modules.get('jax')
  return jax is not None and jax.process_count() > 1


def _leave(status: int, now: bool = False) -> int:
  """`status`, or (`now`, or in a multi-process run) an exit with it now: jax.distributed's
  shutdown at exit waits for every process, and one that failed or was killed never comes."""
  if now or _multi_process():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
  return status


if __name__ == '__main__':
  app.run(run, flags_parser=parse_flags)
