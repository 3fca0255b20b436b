"""The one base class of errors a user can fix; `main.py` prints them as one `error:` line, exit 2.

Every module raises a subclass of `UserError` (or `UserError` itself) for bad input, missing or
unusable data, a failed download, a workdir that belongs to another run, or a diverged run; the
message says what was wrong and how to fix it. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """Something the user can fix; the message says what and how."""


class WorkdirError(UserError):
  """The workdir cannot be used for this command (another run's config, no checkpoint, ...)."""


class TrainingDiverged(UserError, RuntimeError):
  """The loss or the parameters became NaN or infinite; checkpoints from before it are kept."""
