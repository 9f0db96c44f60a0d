"""Fine-tuning a trained AlexNet on your own images: a few classes, tens to thousands of images.

    python -m alexnet_jax.data.prepare --source=~/pets --output_dir=~/pets_prepared
    python launch.py --config=configs/finetune.py:demo --workdir=/tmp/pets_finetune \
        --config.init_from=/tmp/alexnet_demo --config.data.dir=~/pets_prepared \
        --config.model.num_classes=3
    python -m alexnet_jax.predict --workdir=/tmp/pets_finetune photo.jpg

``~/pets`` holds one folder per class (``cat/ dog/ bird/``, the names become
the class names), or ``train/<class>/`` and ``val/<class>/``; without a val/
folder, prepare holds out 20% of each class. The variant after the colon is the
source's network: ``imagenet`` (the default: the paper's, as configs/imagenet.py
trains it) or ``demo`` (configs/demo.py's quarter-width one). Its model fields
and input scale are that config's, because the source's must be kept
(``alexnet_jax/finetune.py`` names any that differ).

Defaults for small datasets, where training everything from a high rate
overfits or diverges within a few steps: conv1-conv5 frozen (their features
are kept; fc6-fc8 adapt), learning rate 0.001 (a tenth of the from-scratch
rate: pretrained layers should move little), cosine decay to 0 over 10 epochs,
a variance-scaling (he) init of the new fc8, batch 16. With very few images per
class, freeze fc6 and fc7 too (a linear classifier on fc7 features):
``--config.optim.frozen_layers="('conv1','conv2','conv3','conv4','conv5','fc6','fc7')"``.
"""

from alexnet_jax import config_lib
from configs import demo, imagenet

SOURCES = {"imagenet": imagenet, "demo": demo}


def get_config(source: str = "imagenet"):
    if source not in SOURCES:
        raise ValueError(
            f"configs/finetune.py:{source}: the variant names the source's network, one of "
            f"{sorted(SOURCES)} (e.g. --config=configs/finetune.py:demo)"
        )
    base = SOURCES[source].get_config()
    config = config_lib.defaults()
    # The source's network and what it sees; the head's size comes from the new dataset.
    config.model = base.model
    config.data.input_scale = base.data.input_scale
    config.data.mean_subtraction = base.data.mean_subtraction
    config.model.init_scheme = "he"  # Only the new fc8 is initialized.
    config.model.num_classes = 2  # Set it to the prepared dataset's class count.

    config.init_from = ""  # The trained workdir: --config.init_from=DIR.
    config.data.source = "prepared"
    config.data.dir = "~/data/my_images_prepared"
    config.batch_size = 16
    config.eval_batch_size = 50
    config.num_epochs = 10
    config.optim.learning_rate = 0.001
    config.optim.schedule = "warmup_cosine"
    config.optim.warmup_epochs = 0.0
    config.optim.frozen_layers = ("conv1", "conv2", "conv3", "conv4", "conv5")
    config.log_every_steps = 5
    config.checkpoint_every_steps = 200
    config.keep_checkpoints = 2
    return config
