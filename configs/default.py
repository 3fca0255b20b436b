"""Every knob of a run, with its default: `cnn/config.py` lists each field with its meaning.

Other configs start from this one. Override any field on the command line:
`python main.py --config=configs/default.py --config.image_size=96`.
"""

from cnn import config


def get_config():
  return config.default_config()
