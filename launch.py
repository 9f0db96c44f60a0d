"""Entry point: parses the config and workdir, then trains.

python launch.py --config=configs/demo.py --workdir=/tmp/alexnet_demo --config.batch_size=32

Process-level settings (not part of an experiment; alexnet_jax/tuning.py):
ALEXNET_JAX_HOST_ALLOCATOR=auto|mimalloc|system, ALEXNET_JAX_CPU_CONVS=eigen|ynnpack.
"""

import os
import sys
from typing import NoReturn

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from alexnet_jax import allocator, cli, config_lib, errors, train, tuning

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/demo.py.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])
LIST_FIELDS = "`python -m alexnet_jax.config_lib` lists every field with its default"


def initialize_distributed(config) -> None:
    """Joins the multi-host job that ``config.distributed`` describes; call before using devices."""
    d = config.distributed
    if not d.initialize:
        return
    # Cross-process collectives between CPU hosts (tests, CPU clusters) use gloo;
    # GPU and TPU backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=d.coordinator_address or None,
        num_processes=None if d.num_processes == -1 else d.num_processes,
        process_id=None if d.process_id == -1 else d.process_id,
        heartbeat_timeout_seconds=d.heartbeat_timeout_seconds,
    )


def _fail(message: str, code: int = cli.EXIT_USAGE) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _end_now(message: str, code: int) -> NoReturn:
    """The error line, then exit skipping ``jax.distributed``'s shutdown.

    With a process of the job gone, the shutdown barrier would wait for it
    and then abort with C++ stacks; nothing is left to save.
    """
    logging.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def _renamed_overrides(argv: list[str]) -> list[str]:
    """ "config.old is now config.new" for each --config.<old>=... override of a moved field."""
    lines = []
    for arg in argv[1:]:
        name = arg.removeprefix("--config.").split("=")[0]
        if arg.startswith("--config.") and name in config_lib.RENAMED:
            lines.append(f"--config.{name} is now --config.{config_lib.RENAMED[name]}")
    return lines


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; a bad flag or --config.* override is one message and exit 2."""
    if renamed := _renamed_overrides(argv):
        _fail("; ".join(renamed) + " (the optimizer's fields moved under config.optim)")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(f"{e}\nSee `python launch.py --helpfull`; {LIST_FIELDS}.")
    except (KeyError, AttributeError) as e:  # ml_collections: no such field in the config.
        while e.args and isinstance(e.args[0], BaseException):
            e = e.args[0]
        text = str(e.args[0] if e.args else e).replace("'", "").replace("\n", ". ", 1)
        text = " ".join(text.split())
        _fail(f"unknown config field in a --config.* override: {text} ({LIST_FIELDS})")


def check_workdir(workdir: str) -> str:
    """The absolute workdir, created if needed; ConfigError-style failure if unusable."""
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        _fail(f"--workdir={path} is a file, not a directory: give a directory for the run.")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        _fail(f"--workdir={path} cannot be created ({e.strerror}): give a writable directory.")
    if not os.access(path, os.W_OK | os.X_OK):
        _fail(f"--workdir={path} is not writable by this user: give a writable directory.")
    return path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.quiet_library_logs()
    try:
        config_lib.validate(_CONFIG.value)
        workdir = check_workdir(_WORKDIR.value)
        tuning.configure_process()  # Before JAX starts its backends.
        allocator.use(tuning.host_allocator())  # May restart this command once.
        initialize_distributed(_CONFIG.value)
        logging.info(
            "JAX process %d/%d, local devices: %s",
            jax.process_index(),
            jax.process_count(),
            jax.local_devices(),
        )
        train.train_and_evaluate(_CONFIG.value, workdir)
    except Exception as e:
        code = cli.exit_code(e)  # The one mapping of user errors to exit codes (cli.py).
        if code is None:
            raise  # A bug: keep its traceback.
        if isinstance(e, errors.PeerLostError):
            _end_now(str(e), code)
        _fail(str(e), code)  # Once, on stderr (not also as a log line).


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
