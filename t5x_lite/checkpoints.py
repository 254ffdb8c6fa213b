"""Orbax checkpoints of the train state and the data iterator, saved together.

Each step directory holds `state` (params, optimizer state, step; sharded arrays written by
every host) and `data` (the input pipeline's iterator state as JSON), so a resumed run sees
exactly the batches it would have seen. Saves are asynchronous and atomic (Orbax writes to a
temporary directory and renames it), and only the newest `keep` steps are kept.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """`jax.ShapeDtypeStruct`s carrying the target shardings, the form restore wants."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
  """Saves every `save_every` steps, keeps the newest `keep`, restores into any mesh."""

  def __init__(self, directory: str, *, save_every: int, keep: int | None = 3,
               async_save: bool = True):
    # Orbax's default policy would also save the first step of a fresh run; we save only
    # multiples of `save_every` (and on a preemption Orbax detects).
    policy = ocp.checkpoint_managers.AnySavePolicy([
        ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
        ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policy, max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

  def latest_step(self) -> int | None:
    """The newest fully written step, or None."""
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether the save policy (every `save_every` steps) saves `step`."""
    return self._manager.should_save(step)

  def save(self, step: int, state: Any, data_state: dict[str, Any], *,
           force: bool = False) -> bool:
    """Starts saving (returns at once when async); True if this step is being saved."""
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """The state at `step`, laid out as `abstract_state`'s shardings, and the data state."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def latest_step(directory: str) -> int | None:
  """The newest finished step in a checkpoint directory, or None. Orbax renames a step's
  temporary directory to its bare number only once the save is complete."""
  if not os.path.isdir(directory):
    return None
  steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
  return max(steps, default=None)


def restore_params(directory: str, abstract_params: Any, step: int | None = None) -> Any:
  """Params only, from another run's checkpoints (fine-tuning from a pretrained model).

  Args:
    directory: that run's checkpoint directory (`<workdir>/checkpoints`).
    abstract_params: ShapeDtypeStructs with shardings for our params; every one must exist
      in the checkpoint with the same shape.
    step: which step; the newest when None.
  """
  step = latest_step(directory) if step is None else step
  if step is None:
    raise FileNotFoundError(f'No checkpoint found in {directory!r} to initialise from.')
  path = os.path.join(os.path.abspath(directory), str(step), 'state')
  target = {'params': abstract_params}
  restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  return restored['params']
