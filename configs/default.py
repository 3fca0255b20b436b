"""Every knob of a run, with its default. Other configs start from this one.

Override any field on the command line: `--config.image_size=96`.
"""

import ml_collections


# PLR0915: a flat list of every field and its default, by design; splitting it hides fields.
def get_config() -> ml_collections.ConfigDict:  # noqa: PLR0915
  c = ml_collections.ConfigDict()

  # Data.
  c.data_dir = 'data/inaturalist_12K'  # holds train/<class>/ and val/<class>/ (val = test set)
  c.download = True  # fetch and extract `dataset_url` when data_dir does not exist
  c.dataset_url = 'https://storage.googleapis.com/wandb_datasets/nature_12K.zip'
  c.cache_dir = ''  # decoded-image cache; '' means $XDG_CACHE_HOME/inat_cnn (~/.cache/inat_cnn)
  c.holdout_fraction = 0.1  # class-balanced share of train/ held out for validation
  c.image_size = 256  # images are resized to image_size x image_size
  c.data_aug = False  # flips, rotation, shift, zoom, brightness inside the jitted train step
  # Augmentation strength (with data_aug); the defaults are the reference's ranges.
  c.aug_flip = True  # random horizontal flips
  c.aug_rotation = 20.0  # degrees: uniform in +-aug_rotation
  c.aug_shift = 0.2  # fraction of each side: uniform in +-aug_shift
  c.aug_zoom = 0.2  # per-axis zoom factor uniform in [1 - aug_zoom, 1 + aug_zoom]
  c.aug_brightness = 0.2  # brightness factor uniform in [1 - aug_brightness, 1 + aug_brightness]
  c.aug_crop_min_scale = 1.0  # random-resized crop of area fraction [this, 1]; 1.0 = no crop
  c.aug_erase = 0.0  # probability of random erasing: 2-33% of the image set to its mean colour

  # Model (names as in the reference's sweep).
  c.conv_layers = 5  # conv -> [BN] -> activation -> 2x2 max-pool blocks
  c.first_layer_filters = 32  # filters of block 1
  c.filter_org = 1.0  # block i has int(first_layer_filters * filter_org**i) filters
  c.kernel_size = 3  # k x k convolutions
  c.padding = 'VALID'  # VALID (the reference) or SAME
  c.activation = 'relu'  # relu, gelu, silu, elu, leaky_relu, mish, tanh
  c.dense_size = 64  # neurons of the hidden dense layer
  c.batch_norm = False  # batch norm after every conv and the dense layer
  c.bn_momentum = 0.99  # batch norm's running-average momentum (Keras' default, the reference's)
  c.dropout = 0.0  # dropout after the dense layer only, as in the reference
  c.dtype = 'float32'  # compute dtype (float32 or bfloat16); parameters stay float32
  # Layer kernels: 'xla' (nn.Conv, nn.BatchNorm), 'cpu_eigen' (cnn/layers.py: same parameters
  # and results, 1.3-18x faster training on XLA:CPU, no forward-mode autodiff) or 'auto'
  # (cpu_eigen when JAX runs on the CPU, xla on GPU/TPU).
  c.conv_impl = 'auto'

  # Optimisation.
  c.optimizer = 'adam'  # adam, adamw, nadam, sgd (with momentum), rmsprop
  c.learning_rate = 1e-3
  c.momentum = 0.9  # sgd and rmsprop only
  c.weight_decay = 1e-4  # adamw only (decoupled, scaled by the learning rate as in optax)
  c.lr_schedule = 'constant'  # constant, or cosine: decays to 0 at the end of num_epochs
  c.warmup_epochs = 0.0  # linear learning-rate warm-up from 0, in epochs (fractions allowed)
  c.label_smoothing = 0.0  # share of each target spread evenly over all classes
  c.batch_size = 32  # global batch, split over all local devices
  c.eval_batch_size = 128
  # Training images held on the device(s), each batch gathered there: 'auto' (on a GPU/TPU when
  # they fit in device_data_max_fraction of its memory), 'on' or 'off' (sliced on the host).
  c.device_data = 'auto'
  c.device_data_max_fraction = 0.25
  c.num_epochs = 50
  c.early_stopping_patience = 5  # epochs without a better val accuracy before stopping; 0 = off
  c.early_stopping_min_epochs = 0  # never stop for patience before this many epochs
  # Choose and stop on an EMA of val accuracy (this factor); 0 = raw.
  c.early_stopping_smoothing = 0.0
  c.seed = 0  # one seed drives init, hold-out split, shuffling, dropout and augmentation

  # Validation: what the eval-mode (running-statistics) model is scored with.
  # 'precise': before each validation, batch norm's statistics are recomputed as the average over
  # precise_bn_images un-augmented training images ("precise BN"), so eval mode tracks what the
  # model has learned from epoch 1 on; 'running': the running averages alone (the old evaluation,
  # which lags by ~1/(1 - bn_momentum) steps).
  c.bn_stats = 'precise'
  c.precise_bn_images = 192  # a fixed, seeded set of training images (whole batches of batch_size)
  # Validate (and keep as the best checkpoint, which evaluate, predict and guided_bp read) an
  # exponential moving average of the weights over about this many epochs; 0 = the weights.
  c.ema_epochs = 0.0
  # Average each image's prediction with its mirror's: validation, evaluate, predict.
  c.tta_flip = False
  # Diagnostic: per epoch, train-mode vs eval-mode accuracy on N training images.
  c.bn_gap_images = 0

  # Logging and checkpoints.
  # online, offline or disabled; '' = online if W&B credentials exist, else offline.
  c.wandb_mode = ''
  c.wandb_project = 'inaturalist-cnn'
  c.wandb_entity = ''  # '' = your default entity
  c.run_name = ''  # '' = named after the hyperparameters, as the reference did
  c.checkpoint_every_steps = 0  # extra mid-epoch checkpoints; 0 = only at the end of each epoch
  c.new_run = False  # allow a workdir that holds a run with another config (old run is kept)
  c.compilation_cache_dir = ''  # XLA's persistent cache; '' = ~/.cache/inat_cnn/jax, 'off' = none

  # Evaluation and guided backprop (--mode=evaluate / guided_bp).
  c.eval_image_seed = 0  # picks the test image shown in first-layer activations
  c.guided_bp_image = ''  # image file for guided backprop; '' = a seeded random test image
  c.guided_bp_layer = 'conv5'  # whose neurons are explained
  c.guided_bp_channels = ()  # channels to explain; () = the 10 this image activates most
  c.guided_bp_num_neurons = 10
  c.guided_bp_method = 'guided'  # guided, vanilla or deconvnet (comparison.png shows all three)
  return c
