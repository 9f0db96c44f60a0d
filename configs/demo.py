"""The built-in demo: trains AlexNet end to end on generated data, no downloads.

    python launch.py --config=configs/demo.py --workdir=/tmp/alexnet_demo

Ten classes of drawn shapes and textures (3,000 training / 500 validation
images, generated once into ``data.dir``). The network is the paper's
(two towers, LRN, overlapping pooling, dropout, 224x224 crops), at a quarter
of the paper's width so that it learns within minutes on a 2-core CPU, and
with variance-scaling init (the paper's N(0, 0.01) init stays at chance for
hundreds of steps from scratch).
"""

from alexnet_jax import config_lib


def get_config():
    config = config_lib.defaults()
    config.data.source = "demo"
    config.data.dir = "~/.cache/alexnet_jax/demo"
    config.model.num_classes = 10
    config.model.width = 0.25
    config.model.init_scheme = "he"
    config.data.input_scale = 1 / 64  # Roughly unit-variance inputs suit the "he" init.
    config.batch_size = 64
    config.eval_batch_size = 100
    config.num_epochs = 15
    config.optim.learning_rate = 0.01
    # One drop (/10) for the last third: with a constant rate the final error swung between
    # 3% and 11% from run to run (float-order noise grows fast early on); with it, 0.8-3.0%.
    config.optim.schedule = "step"
    config.optim.lr_step_epochs = (10,)
    config.log_every_steps = 10
    config.checkpoint_every_steps = 100
    return config
