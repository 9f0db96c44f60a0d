"""orbax checkpoints of the train state together with the grain iterator state."""

from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
    """Saves ``state`` and the data iterator in one step; keeps the last ``keep``."""

    def __init__(self, workdir: str, *, save_every_steps: int, keep: int):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every_steps),
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data_iter")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def maybe_save(
        self, step: int, state: Any, data_iter: grain.DatasetIterator, *, force: bool = False
    ) -> bool:
        """Saves if the interval policy says so (or ``force``); returns whether it saved."""
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data_iter=grain.checkpoint.CheckpointSave(data_iter),
            ),
            force=force,
        )
        if saved:
            logging.info("Saving checkpoint at step %d to %s", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state: Any, data_iter: grain.DatasetIterator) -> Any:
        """Restores the state (with ``abstract_state``'s shardings) and the iterator in place."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data_iter=grain.checkpoint.CheckpointRestore(data_iter),
            ),
        )
        return restored.state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
