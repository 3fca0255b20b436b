"""A recipe beyond the reference's: a model that widens with depth, trained better.

The architecture is a point of the reference's own sweep space: 32 filters doubling every block
(32, 64, 128, 256, 512; filter_org 2) instead of optimal.py's five blocks of 64. It costs the
same multiply-adds per image (202M against 199M at 128 px), but its last blocks, where the
features are, are 8x wider (1.83M parameters at 128 px). How it is trained and scored changes
too: AdamW with decoupled weight decay, a linear warm-up then cosine decay of the learning rate
over 45 epochs, label smoothing, milder geometric augmentation plus a random-resized crop, flip
averaging at test time, and no early stop before the schedule ends (the checkpoint is chosen on
an EMA of hold-out accuracy, so a lucky epoch on a small hold-out does not win it).

Every step was chosen on hold-out val only (README "Results" lists the twelve candidates tried
on top of it, and the rule each had to pass). The last three kept: 38 epochs instead of 30,
42 instead of 38, each of which raised mean best hold-out val, then 45 (the longest that fits
the time limit), which tied it. Measured (README "Results":
monkeys10 at 128 px, seeds 0, 1, 2, 2-core AMD EPYC Zen 4; optimal.py for 30 epochs):

  recipe                          best hold-out val        test                     wall a seed
  optimal.py before the val fix   0.719 +- 0.054 (0.101)   0.665 +- 0.038 (0.066)    7.0 min
  + precise BN, val-EMA stopping  0.847 +- 0.005 (0.009)   0.786 +- 0.013 (0.026)    8.8 min
  optimal.py (+ weights' EMA)     0.847 +- 0.019 (0.037)   0.808 +- 0.008 (0.015)    9.3 min
  tuned.py at 30 epochs           0.865 +- 0.028 (0.055)   0.874 +- 0.019 (0.037)    9.0 min
  tuned.py at 38 epochs           0.890 +- 0.016 (0.028)   0.875 +- 0.028 (0.055)   11.5 min
  tuned.py at 42 epochs           0.896 +- 0.021 (0.037)   0.884 +- 0.027 (0.051)   12.8 min
  tuned.py (45 epochs)            0.896 +- 0.019 (0.037)   0.890 +- 0.020 (0.040)   13.7 min
  (mean +- standard deviation (spread); this recipe per seed: test 0.893, 0.868, 0.908;
  over seeds 0-4, 0.882 +- 0.019, range 0.048; the 30-epoch row is an earlier study on the
  same CPU)

On stand-ins at 96 px (seeds 0, 1, 2; README "Results") it beats optimal.py on five of the six
seeds and ties the sixth: 30% of the training images, test 0.743 +- 0.015 against
0.570 +- 0.056; 5 of the 10 classes, 0.925 +- 0.018 against 0.908 +- 0.027.
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
  c.num_epochs = 45
  c.aug_rotation = 10.0
  c.aug_shift = 0.1
  c.aug_zoom = 0.1
  c.aug_crop_min_scale = 0.5
  c.tta_flip = True
  c.early_stopping_patience = 0  # the cosine schedule runs to its end
  c.early_stopping_smoothing = 0.5
  c.ema_epochs = 0.0  # its cosine schedule already settles the weights (tuned_ema was not kept)
  return c
