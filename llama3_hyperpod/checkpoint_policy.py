"""The checkpoint policy, decided once from the config: whether a run checkpoints, how often, how many it keeps,
whether saves run in the background, whether it resumes, and what that means for a requeued job.

The plan shows it (plan.checkpoint_policy, with the dir and what each backend adds) and the torch trainer follows it
(torch_backend/train.py); on Neuron NxDT reads the same exp_manager keys itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from llama3_hyperpod.config import RunConfig


@dataclass(frozen=True)
class CheckpointPolicy:
    """What exp_manager says about checkpoints, read in one place (`from_config`)."""

    enabled: bool  # create_checkpoint_callback, and save_top_k not 0
    every_n_train_steps: int | None  # None: only at the end of the run
    keep: int  # save_top_k: how many complete checkpoints stay (-1: all)
    async_save: bool  # async_checkpointing
    resumes: bool  # resume_if_exists, or an explicit resume_from_checkpoint
    max_steps: int

    @classmethod
    def from_config(cls, rc: RunConfig) -> CheckpointPolicy:
        em = rc.cfg.exp_manager
        params = em.checkpoint_callback_params
        return cls(
            enabled=bool(em.create_checkpoint_callback) and params.save_top_k != 0,
            every_n_train_steps=params.every_n_train_steps,
            keep=int(params.save_top_k),
            async_save=bool(em.async_checkpointing),
            resumes=bool(em.resume_if_exists or em.resume_from_checkpoint),
            max_steps=int(rc.cfg.trainer.max_steps),
        )

    @property
    def save_every(self) -> int:
        """The cadence in steps; 0: no periodic save (only the last step, and before a stop)."""
        return int(self.every_n_train_steps or 0)

    def requeue_warnings(self) -> list[str]:
        """What a requeued or failed job would lose under this policy (at most one line)."""
        if not self.enabled:
            return ["checkpoints are off (exp_manager.create_checkpoint_callback false or save_top_k 0): "
                    "a requeued or resubmitted job starts over"]
        if not self.resumes:
            return ["exp_manager.resume_if_exists is false: a requeued or resubmitted job starts over instead of "
                    "resuming from its checkpoints"]
        if self.every_n_train_steps is None or self.every_n_train_steps >= self.max_steps:
            return ["exp_manager.checkpoint_callback_params.every_n_train_steps saves nothing before the end: "
                    "a failure loses the whole run"]
        return []
