"""`MMTrainerCallback`: how [`~mm_trainer.MMSFTTrainer`] follows the Trainer's loop through public hooks.

- `on_train_begin` comes after `accelerator.prepare`: FSDP2 has replaced every parameter by a sharded one by then
  and DeepSpeed owns the optimizer, so the trainer re-binds its adapters (telemetry, audit, IMoD, dominance rate) to
  the parameters of the prepared model there ([`~mm_trainer.MMSFTTrainer.bind_prepared_model`]).
- `on_save` comes after the Trainer wrote every file of a `checkpoint-N` folder (adapter, optimizer, RNG, trainer
  state): the trainer marks the checkpoint complete there, last ([`~mm_trainer.MMSFTTrainer.mark_checkpoint_complete`]).
"""

from __future__ import annotations

import weakref
from typing import Any

from transformers import TrainerCallback

from ..utils.checkpoints import checkpoint_dir


class MMTrainerCallback(TrainerCallback):
    """Connects an [`~mm_trainer.MMSFTTrainer`] to the training loop (added by the trainer itself).

    Args:
        trainer: The trainer (held by a weak reference: the trainer owns its callbacks).
    """

    def __init__(self, trainer: Any) -> None:
        self._trainer = weakref.ref(trainer)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self._trainer()
        if trainer is not None:
            trainer.bind_prepared_model()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self._trainer()
        if trainer is None:
            return
        checkpoint = checkpoint_dir(args.output_dir, state.global_step)
        if checkpoint.is_dir():
            trainer.mark_checkpoint_complete(checkpoint)
