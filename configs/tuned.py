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
Measured (README "Results": one study on commit 69b4847, monkeys10 at 128 px, 30 epochs,
seeds 0, 1, 2, 2-core AMD EPYC):

  recipe                          best hold-out val        test                     wall a seed
  optimal.py before the val fix   0.783 +- 0.043 (0.083)   0.714 +- 0.046 (0.081)   11.2 min
  optimal.py                      0.847 +- 0.045 (0.083)   0.799 +- 0.015 (0.029)   12.5 min
  tuned.py                        0.875 +- 0.011 (0.018)   0.868 +- 0.029 (0.051)   13.7 min
  (mean +- standard deviation (spread); tuned.py per seed: test 0.882, 0.835, 0.886)

Seeds 3 and 4 (commit 8faef24, run to see the spread, not to choose): best hold-out val 0.908
on both, test 0.857 and 0.860; over the five seeds test 0.864 +- 0.021 (0.835 to 0.886).

Tried on top of it and not kept (chosen on hold-out val, a rule fixed before the runs; study on
commit 935118c, seeds 0, 1, 2): validating an EMA of the weights over 3 epochs (`ema_epochs=3`,
the study's `tuned_ema` recipe) trained identically but scored best hold-out val 0.869 +- 0.014
(spread 0.028) against this recipe's 0.875 +- 0.011 (0.018); random erasing of a quarter of the
images (`aug_erase=0.25`, recipe `tuned_erase`, commit 8e0e58e) scored 0.862 +- 0.016 (spread
0.028). Screened on seed 0 (commit 0a3fedf), against this recipe's 0.862 there: a peak learning
rate of 3e-3 (`tuned_lr3`) 0.826, of 1e-3 (`tuned_lr1`, commit 445d86f) 0.835, and the crop and
flips without rotation, shift or zoom (`tuned_rrc`) 0.844. That one fits its training images
faster, and its val sinks in the last epochs. Then (commits 8387df9, 8faef24): a weight decay of
0.5 (`tuned_wd5`; 0.05 shrinks an idle weight by only 4% over the run) 0.844, and a label
smoothing of 0.2 (`tuned_ls2`) 0.853. Then, on an AVX-512 host (commits 40c45aa, 6918249): a
hidden dense layer of 256 (`tuned_d256`) 0.835 on seed 0; batch 16 at a learning rate of 1.4e-3
(`tuned_b16`) 0.890 on seed 0 but 0.865 +- 0.023 over seeds 0, 1, 2. On that host this recipe
itself scored the same 0.865 +- 0.028 (test 0.874 +- 0.019, spread 0.037, 9.0 min a seed): the
same seed trains bit-identically on one kind of CPU, not across kinds (README "Results").

On stand-ins at 96 px (seeds 0, 1, 2) it beats optimal.py on every seed: 30% of the training
images, test 0.718 +- 0.011 against 0.574 +- 0.045; 5 of the 10 classes, 0.913 +- 0.033
against 0.874 +- 0.023.
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
  c.num_epochs = 38
  c.aug_rotation = 10.0
  c.aug_shift = 0.1
  c.aug_zoom = 0.1
  c.aug_crop_min_scale = 0.5
  c.tta_flip = True
  c.early_stopping_patience = 0  # the cosine schedule runs to its end
  c.early_stopping_smoothing = 0.5
  return c
