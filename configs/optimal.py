"""The reference's best sweep result: 446,730 parameters + 896 batch-norm statistics at 256x256."""

from configs import default


def get_config():
  c = default.get_config()
  c.first_layer_filters = 64
  c.filter_org = 1.0
  c.data_aug = True
  c.batch_norm = True
  c.dropout = 0.2
  c.kernel_size = 3
  c.dense_size = 128
  return c
