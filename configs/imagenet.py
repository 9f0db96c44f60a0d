"""The paper's run: ILSVRC-2012, batch 128, lr 0.01, momentum 0.9, wd 5e-4, 90 epochs.

Prepare the data once (ILSVRC tars, a train/val folder layout, or tfds:imagenet2012):

    python -m alexnet_jax.data.prepare --source=/path/to/ilsvrc2012 \
        --output_dir=/path/to/imagenet2012_prepared

then train on it (random 224 crops, mirrors, mean image, PCA colour: config.data):

    python launch.py --config=configs/imagenet.py --workdir=/path/to/workdir \
        --config.data.dir=/path/to/imagenet2012_prepared

The paper reports 40.7% top-1 / 18.2% top-5 error on the validation set for
one model, after 5-6 days on two GTX 580 GPUs.
"""

from alexnet_jax import config_lib


def get_config():
    config = config_lib.defaults()
    config.data.source = "prepared"
    config.data.dir = "~/data/imagenet2012_prepared"
    config.model.num_classes = 1000
    config.model.init_scheme = "paper"
    config.batch_size = 128
    config.num_epochs = 90
    config.optim.learning_rate = 0.01
    config.optim.schedule = "plateau"  # Sec. 5: /10 when the val error stops improving, 3 times.
    config.optim.plateau_patience = 3  # Evaluations (epochs) without a new best before a drop.
    config.optim.plateau_max_reductions = 3
    config.optim.lr_decay_factor = 0.1
    config.optim.momentum = 0.9
    config.optim.weight_decay = 5e-4
    config.optim.weight_decay_on_biases = True  # The paper decays all weights.
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2000
    return config
