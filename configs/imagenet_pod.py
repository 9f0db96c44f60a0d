"""ImageNet with a pod-size batch: towers on device pairs, LARS, linear scaling, warmup, bf16.

Every process runs the same command; the mesh puts the two towers of each
model replica on a device pair (``mesh_shape = (-1, 2)``) and splits the
8192-image batch over the remaining ``data`` axis.

TPU pod slice (run on every host, e.g. with ``gcloud ... tpu-vm ssh --worker=all``;
JAX finds the coordinator itself). The workdir must be one directory that all
hosts see (NFS, or a bucket mounted with gcsfuse): every host writes its shards
of each checkpoint there.

    python launch.py --config=configs/imagenet_pod.py --workdir=/mnt/shared/alexnet_pod \
        --config.data.dir=/mnt/imagenet2012_prepared

GPU hosts (here 2 hosts x 8 GPUs; process i on host i, host 0 reachable as HOST0):

    python launch.py --config=configs/imagenet_pod.py --workdir=/shared/alexnet_pod \
        --config.data.dir=/data/imagenet2012_prepared \
        --config.distributed.coordinator_address=HOST0:1234 \
        --config.distributed.num_processes=2 --config.distributed.process_id=i

Under SLURM or Open MPI the last three flags can be dropped (auto-detected).

The learning rate follows the linear scaling rule (Goyal et al., 2017):
``learning_rate`` is per 256 images, so the batch of 8192 trains at 32x it,
reached by a linear warmup over ``warmup_epochs`` and followed by a cosine
decay. LARS (You et al., 2017) keeps each layer's step proportional to its
weights, which is what let AlexNet train with batches of 8k and more. These
hyperparameters are a starting point that has not been run on ImageNet in
this project; expect to tune ``learning_rate`` and ``warmup_epochs``.

Variant ``:single_host`` skips jax.distributed (one host, all its devices).
"""

from configs import imagenet


def get_config(variant: str | None = None):
    config = imagenet.get_config()
    config.mesh_shape = (-1, 2)  # One model replica per device pair; towers on separate devices.
    config.distributed.initialize = variant != "single_host"

    config.batch_size = 8192
    config.eval_batch_size = 4096
    config.num_epochs = 90
    config.model.init_scheme = "he"  # Learns from step 0; the paper's N(0, 0.01) stalls at first.
    config.model.compute_dtype = "bfloat16"  # bf16 matmuls and convs; params stay float32.

    config.optim.name = "lars"
    config.optim.lars_trust_coefficient = 0.001
    config.optim.learning_rate = 0.3  # Per 256 images: 9.6 at batch 8192 (after warmup).
    config.optim.lr_reference_batch_size = 256
    config.optim.schedule = "warmup_cosine"
    config.optim.warmup_epochs = 5.0
    config.optim.momentum = 0.9
    config.optim.weight_decay = 5e-4
    config.optim.weight_decay_on_biases = False  # Large-batch practice: biases undecayed.

    config.log_every_steps = 20  # 156 steps per epoch.
    config.checkpoint_every_steps = 500
    return config
