"""A recipe beyond the reference's: a model that widens with depth, trained better.

The architecture is a point of the reference's own sweep space: 32 filters doubling every block
(32, 64, 128, 256, 512; filter_org 2) instead of optimal.py's five blocks of 64. It costs the
same multiply-adds per image (202M against 199M at 128 px), but its last blocks, where the
features are, are 8x wider (1.83M parameters at 128 px). How it is trained and scored changes
too: AdamW with decoupled weight decay, a linear warm-up then cosine decay of the learning rate
over 30 epochs, label smoothing, milder geometric augmentation plus a random-resized crop, flip
averaging at test time, and no early stop before the schedule ends (the checkpoint is chosen on
an EMA of hold-out accuracy, so a lucky epoch on a small hold-out does not win it).

How it was chosen (hold-out val only, seed 0, monkeys10 at 128 px, 30 epochs): this recipe on
optimal.py's architecture reached best val 0.826, with the widening architecture 0.862.
The 3-seed study of the final recipe is in the README's "Results".
"""

from configs import optimal


def get_config():
  c = optimal.get_config()
  c.optimizer = 'adamw'
  c.learning_rate = 2e-3
  c.weight_decay = 0.05
  c.lr_schedule = 'cosine'
  c.warmup_epochs = 2.0
  c.label_smoothing = 0.1
  c.first_layer_filters = 32
  c.filter_org = 2.0
  c.num_epochs = 30
  c.aug_rotation = 10.0
  c.aug_shift = 0.1
  c.aug_zoom = 0.1
  c.aug_crop_min_scale = 0.5
  c.tta_flip = True
  c.early_stopping_patience = 0  # the cosine schedule runs to its end
  c.early_stopping_smoothing = 0.5
  return c
