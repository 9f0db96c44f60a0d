"""Defaults shared by every experiment; each config file overrides what differs.

Every knob is here, with its default and a one-line comment, so a locked
config rejects a misspelt override.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # Seeds parameters, dropout and the data order.

    config.data = ml_collections.ConfigDict()
    config.data.source = "prepared"  # "demo" (generated), "prepared" (ArrayRecord) or "tfds".
    config.data.dir = "~/data/imagenet2012_prepared"  # Where the prepared dataset lives.
    config.data.tfds_name = "imagenet2012"  # tfds only: registered name or a built dataset's dir.
    config.data.tfds_data_dir = ""  # tfds only: tfds data_dir ("" = tfds's default).
    config.data.tfds_stats_images = 2000  # tfds only: images sampled for mean image and PCA.
    config.data.demo_train_per_class = 300  # Demo only: generated training images per class.
    config.data.demo_val_per_class = 50  # Demo only: generated validation images per class.
    config.data.num_workers = 0  # grain worker processes for decoding and augmentation; 0 = none.
    config.data.num_threads = 2  # grain reader threads per process (PIL decodes without the GIL).
    config.data.input_scale = 1.0  # Multiplies mean-subtracted pixels; the paper feeds 0-255 (1.0).
    config.data.prefetch = 0  # Records decoded ahead per process; 0 = two batches' worth.
    config.data.mean_subtraction = "image"  # "image" (the paper's mean image) or "channel" (RGB).
    config.data.pca_colour = True  # PCA colour augmentation on training images (Sec. 4.1).
    config.data.pca_stats = "prepared"  # "prepared" (the dataset's RGB PCA) or "paper" (constants).
    config.data.pca_std = 0.1  # Standard deviation of the PCA coefficients alpha (the paper: 0.1).
    config.data.dtype = "float32"  # Batch image dtype: "float32" or "bfloat16" (half the bytes).

    config.model = ml_collections.ConfigDict()
    config.model.num_classes = 1000  # Must match the dataset's class count.
    config.model.width = 1.0  # Multiplies every layer's channel count; 1.0 is the paper's net.
    config.model.init_scheme = (
        "paper"  # "paper" (N(0,0.01), bias 1) or "he" (variance scaling, bias 0.1).
    )
    config.model.dropout_rate = 0.5  # On fc6 and fc7 outputs during training.
    config.model.use_lrn = True  # Local response normalization after conv1 and conv2.
    config.model.compute_dtype = "float32"  # "float32" or "bfloat16" (GPU/TPU); params stay f32.
    # Examples per chunk in which conv1-pool5 run on each data shard (same result, another
    # schedule; alexnet_jax/tuning.py); 0 = whole batch; -1 = the backend's choice (CPU: 8).
    config.model.conv_chunk_size = -1

    config.batch_size = 128  # Global batch, split over the mesh's data axis.
    config.eval_batch_size = 256  # Global batch for validation.
    config.num_epochs = 90.0  # Training length in epochs (fractions allowed).
    config.max_steps = -1  # Stop after this many steps if > 0 (overrides num_epochs).
    config.learning_rate = 0.01  # Base learning rate.
    config.schedule = "constant"  # "constant", "plateau" (the paper's), "step" or "warmup_cosine".
    config.lr_decay_factor = 0.1  # plateau and step: multiply the learning rate by this per drop.
    config.plateau_patience = 3  # plateau: evaluations without improvement before a drop.
    config.plateau_max_reductions = 3  # plateau: at most this many drops (the paper made 3).
    config.plateau_min_delta = 0.0  # plateau: a new best must beat the old val top-1 by more.
    config.lr_step_epochs = (30, 60, 80)  # step: epochs at which the learning rate drops.
    config.warmup_epochs = 5.0  # warmup_cosine: linear warmup from 0, then cosine decay to 0.
    config.momentum = 0.9  # SGD momentum.
    config.optimizer = "sgd"  # "sgd" (the paper's rule) or "lars" (layer-wise steps, big batches).
    config.lars_trust_coefficient = 0.001  # lars: a layer's step is this times ||w|| / ||g||.
    config.lr_reference_batch_size = 0  # > 0: learning_rate is per this batch, scaled linearly.
    config.weight_decay = 5e-4  # Applied to all weights, as in the paper.
    config.weight_decay_on_biases = True  # The paper decays biases too.

    config.mesh_shape = (-1, 1)  # (data, tower) device mesh; -1 takes the remaining devices.

    # Multi-host: each process runs launch.py with the same config. On TPU pods, SLURM and
    # Open MPI, initialize=True alone suffices (JAX detects the cluster); elsewhere set the rest.
    config.distributed = ml_collections.ConfigDict()
    config.distributed.initialize = False  # Call jax.distributed.initialize before training.
    config.distributed.coordinator_address = ""  # "host:port" of process 0; "" = auto-detect.
    config.distributed.num_processes = -1  # Processes in the job; -1 = auto-detect.
    config.distributed.process_id = -1  # This process's index (0 = coordinator); -1 = auto-detect.

    config.log_every_steps = 50  # Log a progress line (and write metrics) this often.
    config.eval_every_epochs = 1.0  # Evaluate on the validation split this often (and at the end).
    config.checkpoint_every_steps = 1000  # Save a checkpoint this often (and at the end).
    config.keep_checkpoints = 3  # Keep this many latest checkpoints (and the best by val error).
    return config
