"""The config schema: defaults, checks that name the field, moved fields, and its consumers."""

import dataclasses
import importlib.util
import os

import pytest

from alexnet_jax import config_lib, model, optim
from alexnet_jax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _experiment(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("name", ["demo", "imagenet", "imagenet_pod", "finetune"])
def test_every_experiment_config_holds_exactly_the_schemas_fields(name):
    config = _experiment(name)
    config_lib.validate(config)
    assert set(config_lib.flatten(config.to_dict())) == set(config_lib.BY_NAME)


def test_defaults_are_the_declared_ones_and_pass_their_own_checks():
    flat = config_lib.flatten(config_lib.defaults().to_dict())
    assert len(flat) == len(config_lib.FIELDS) == 68
    for f in config_lib.FIELDS:
        value = tuple(flat[f.name]) if isinstance(flat[f.name], list) else flat[f.name]
        assert value == f.default and f.accepts.test(value), f.name
        assert f.doc and len(f.doc) <= 90, f.name  # One line.


def _bad_value(field):
    """A value outside the field's accepted set, built from its declaration."""
    if isinstance(field.default, bool):
        return "yes"
    if isinstance(field.default, str):
        return 3 if field.accepts.test("x-not-a-choice") else "x-not-a-choice"
    if isinstance(field.default, tuple):
        return (5, 0, -5)
    return -100


@pytest.mark.parametrize(
    "field",
    [f for f in config_lib.FIELDS if f.accepts is not config_lib.ANY_TEXT],  # Any string passes.
    ids=lambda f: f.name,
)
def test_a_bad_value_is_named_with_what_the_field_accepts(field):
    config = config_lib.defaults()
    config.unlock()
    *parents, leaf = field.name.split(".")
    node = config
    for p in parents:
        node = node[p]
    node.unlock()
    node.__dict__["_fields"][leaf] = _bad_value(field)  # Bypass ml_collections' type check.
    with pytest.raises(config_lib.ConfigError) as raised:
        config_lib.validate(config)
    assert str(raised.value).startswith(f"config.{field.name} = ")
    assert field.accepts.description in str(raised.value)


def test_process_id_must_lie_below_num_processes():
    config = config_lib.defaults()
    config.distributed.num_processes, config.distributed.process_id = 2, 2
    with pytest.raises(config_lib.ConfigError, match=r"config.distributed.process_id = 2 "):
        config_lib.validate(config)


def test_the_schemas_choices_are_the_ones_its_consumers_implement():
    choices = {
        f.name: f.accepts.description
        for f in config_lib.FIELDS
        if "one of" in f.accepts.description
    }
    assert choices["model.init_scheme"] == f"one of {model.INIT_SCHEMES}"
    assert choices["optim.schedule"] == f"one of {optim.SCHEDULES}"
    assert choices["optim.name"] == f"one of {optim.OPTIMIZERS}"
    assert choices["data.mean_subtraction"] == f"one of {pipeline.MEAN_SUBTRACTION_MODES}"
    assert choices["data.pca_stats"] == f"one of {pipeline.PCA_STATS_SOURCES}"
    assert choices["data.dtype"] == f"one of {pipeline.DTYPES}"
    assert config_lib.NUM_TOWERS == model.NUM_TOWERS
    assert choices["model.variant"] == f"one of {tuple(model.VARIANTS)}"
    assert choices["model.lrn_convention"] == f"one of {('auto', *model.LRN_CONVENTIONS)}"


def test_only_the_papers_variant_splits_towers_over_devices():
    config = config_lib.defaults()
    config.mesh_shape = (1, 2)
    config_lib.validate(config)
    for variant in ("torchvision", "bvlc_alexnet", "caffenet"):
        config.model.variant = variant
        with pytest.raises(
            config_lib.ConfigError, match=r"config.mesh_shape = \(1, 2\) .*tower axis of 1"
        ):
            config_lib.validate(config)


def test_fixed_rgb_means_need_channel_mean_subtraction():
    config = config_lib.defaults()
    config.data.rgb_mean = (123.675, 116.28, 103.53)
    with pytest.raises(config_lib.ConfigError, match=r"config.data.rgb_mean = .*mean_subtraction"):
        config_lib.validate(config)
    config.data.mean_subtraction = "channel"
    config_lib.validate(config)


def test_layer_names_are_the_networks_parameters_in_order():
    import jax
    import jax.numpy as jnp

    shapes = jax.eval_shape(
        lambda: model.AlexNet(num_classes=3, width=1 / 16).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), train=False
        )["params"]
    )
    assert tuple(shapes) == config_lib.LAYERS


def test_fine_tuning_fields_are_checked_and_freezing_is_kept_on_resume():
    config = config_lib.defaults()
    config.optim.frozen_layers = ("conv1", "fc7")
    config_lib.validate(config)
    config.optim.frozen_layers = ("conv1", "conv1")
    with pytest.raises(config_lib.ConfigError, match="distinct layer names"):
        config_lib.validate(config)
    config.optim.frozen_layers, config.init_from_step = (), 5
    with pytest.raises(config_lib.ConfigError, match=r"init_from_step = 5 .* config.init_from"):
        config_lib.validate(config)
    config.init_from = "/runs/source"
    config_lib.validate(config)
    assert (
        *config_lib.MODEL_DEFINING_FIELDS,
        "optim.name",
        "optim.weight_decay_on_biases",
        "optim.frozen_layers",
    ) == config_lib.RESUME_FIXED_FIELDS


def test_model_fields_are_the_networks_attributes():
    """config.model goes to AlexNet as it is (inference.build_model), but for the schedule."""
    attributes = {f.name for f in dataclasses.fields(model.AlexNet)} - {"parent", "name"}
    schema = {
        f.name.removeprefix("model.") for f in config_lib.FIELDS if f.name.startswith("model.")
    }
    assert schema - attributes == {"conv_chunk_size"}
    assert attributes - schema == {"mesh", "kernels"}


def test_model_defining_fields_are_the_network_and_its_input():
    assert config_lib.MODEL_DEFINING_FIELDS == (
        "data.input_scale",
        "data.mean_subtraction",
        "data.rgb_mean",
        "data.rgb_std",
        "data.crop_size",
        "model.num_classes",
        "model.width",
        "model.init_scheme",
        "model.dropout_rate",
        "model.use_lrn",
        "model.variant",
        "model.lrn_convention",
    )


def test_a_config_saved_before_the_optimizer_fields_moved_loads_with_its_values():
    old = {  # A run saved by the first version: optimizer fields at the root.
        "learning_rate": 0.05,
        "schedule": "step",
        "lr_step_epochs": [3, 6],
        "optimizer": "lars",
        "weight_decay": 1e-4,
        "batch_size": 32,
        "model": {"width": 0.25, "num_classes": 10},
        "host_allocator": "mimalloc",  # Since removed: dropped.
    }
    config = config_lib.from_saved(old)
    assert (config.optim.learning_rate, config.optim.schedule) == (0.05, "step")
    assert config.optim.lr_step_epochs == (3, 6) and config.optim.name == "lars"
    assert config.optim.weight_decay == 1e-4 and config.batch_size == 32
    assert (config.model.width, config.model.num_classes) == (0.25, 10)
    assert config.optim.momentum == 0.9  # Not saved: today's default.
    assert "learning_rate" not in config and "host_allocator" not in config
    config_lib.validate(config)


def test_describe_lists_every_field_with_default_and_accepted_values():
    text = config_lib.describe()
    for f in config_lib.FIELDS:
        assert f"{f.name} " in text and f.accepts.description in text
    assert text.count("[defines the model]") == len(config_lib.MODEL_DEFINING_FIELDS)
