"""Orbax checkpoints of the train state and the data iterator, saved together.

Each step directory holds `state` (params, optimizer state, step; sharded arrays written by
every host), `data` (the input pipeline's iterator state as JSON) and `meta` (the step and a
checksum of one small array, to tell a torn or corrupt checkpoint from a good one), so a
resumed run sees exactly the batches it would have seen. Saves are asynchronous and atomic
(Orbax writes to a temporary directory and renames it once every item is written), and only
the newest `keep` steps are kept; Orbax removes older ones only after a newer one is committed.

A checkpoint that cannot be restored is renamed aside (`20.corrupt-<time>`, never deleted)
once an older one has restored in its place. Paths go through `etils.epath`, so a `gs://`
directory works as a local one.
"""

import json
import os
import socket
import threading
import time
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

PathLike = str | os.PathLike

_TMP_MARK = '.orbax-checkpoint-tmp'


class CheckpointError(RuntimeError):
  """No checkpoint restores, or a save failed; the message is one line for the user."""


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """`jax.ShapeDtypeStruct`s carrying the target shardings, the form restore wants."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def as_path(directory: PathLike) -> epath.Path:
  """An absolute epath (Orbax wants one); `gs://...` stays as it is."""
  path = epath.Path(directory)
  return path if '://' in os.fspath(directory) else path.absolute()


def _probe_leaf(state: Any) -> tuple[str, Any] | None:
  """The smallest floating-point array with more than one element: cheap to checksum, and a
  torn write of the state tends to leave some small array wrong too."""
  leaves = [(jax.tree_util.keystr(path), leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(state)
            if jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating) and leaf.size > 1]
  return min(leaves, key=lambda item: (item[1].size, item[0]), default=None)


def _fingerprint(step: int, state: Any) -> dict[str, Any]:
  probe = _probe_leaf(state)
  if probe is None:
    return {'step': step}
  name, leaf = probe
  data = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
  return {'step': step, 'leaf': name, 'crc32': zlib.crc32(data.tobytes())}


def _reason(error: BaseException) -> str:
  """The first line of an error, short enough for a one-line warning."""
  text = (str(error).strip().splitlines() or [''])[0]
  return f'{type(error).__name__}: {text[:200]}'


class Checkpointer:
  """Saves every `save_every` steps, keeps the newest `keep`, restores into any mesh."""

  def __init__(self, directory: PathLike, *, save_every: int, keep: int | None = 3,
               async_save: bool = True):
    """`keep` None or 0 keeps every checkpoint."""
    # Orbax's default policy would also save the first step of a fresh run; we save only
    # multiples of `save_every` (and on a preemption Orbax detects).
    policy = ocp.checkpoint_managers.AnySavePolicy([
        ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
        ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policy, max_to_keep=keep or None, create=True,
        enable_async_checkpointing=async_save)
    self.directory = as_path(directory)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest fully written step, or None."""
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether the save policy (every `save_every` steps) saves `step`."""
    return self._manager.should_save(step)

  def save(self, step: int, state: Any, data_state: dict[str, Any], *,
           force: bool = False) -> bool:
    """Starts saving (returns at once when async); True if this step is being saved.

    Raises:
      CheckpointError: this save, or the previous asynchronous one, failed (disk full,
        permission lost, ...); the half-written temporary directory is removed first.
    """
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(_fingerprint(step, state)))
    return self._guarded(f'saving checkpoints (at step {step})', self._manager.save, step, args=args,
                         force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """The state at `step`, laid out as `abstract_state`'s shardings, and the data state.

    Raises:
      ValueError: the step's saved checksum or step number does not match what was read.
    """
    items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    has_meta = (self.directory / str(step) / 'meta').exists()
    if has_meta:  # checkpoints written before the checksum was added have none
      items['meta'] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if has_meta:
      _verify(step, restored.state, restored.meta)
    return restored.state, restored.data

  def restore_newest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """The newest step that restores, with its state and data state; None if there are none.

    A step that fails to restore (a truncated or missing file, a wrong checksum, an empty
    directory) gets one warning line and the next older one is tried; once one restores,
    the failed ones are renamed aside (`<step>.corrupt-<time>`), never deleted.

    Raises:
      CheckpointError: there are checkpoints but none restores (nothing is renamed then: a
        config that does not fit them must not look like corruption).
    """
    failures = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state, data_state = self.restore(step, abstract_state)
      except Exception as e:  # any read error: the checkpoint cannot be used
        failures.append((step, _reason(e)))
        logging.warning('checkpoint step %d in %s cannot be restored (%s); trying an older '
                        'one', step, self.directory, _reason(e))
        continue
      for failed, _ in failures:
        self._set_aside(failed)
      self._manager.reload()
      return step, state, data_state
    if failures:
      raise CheckpointError(
          f'no checkpoint in {self.directory} restores: tried '
          f'{"; ".join(f"step {s} ({r})" for s, r in failures)}; fix the '
          'config to match the run, or move the checkpoints away to start afresh')
    return None

  def _set_aside(self, step: int) -> None:
    if jax.process_index() != 0:
      return
    target = self.directory / f'{step}.corrupt-{time.strftime("%Y%m%dT%H%M%S")}'
    (self.directory / str(step)).rename(target)
    logging.warning('renamed the unrestorable checkpoint %d to %s', step, target.name)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk.

    Raises:
      CheckpointError: a pending save failed.
    """
    self._guarded('finishing a checkpoint save', self._manager.wait_until_finished)

  def close(self) -> None:
    self._guarded('closing the checkpoint manager', self._manager.close)

  def _guarded(self, what: str, fn, *args, **kwargs):
    """`fn(...)`, turning a failed save into one line and removing what it half-wrote."""
    try:
      return fn(*args, **kwargs)
    except Exception as e:
      self.remove_temporary()
      raise CheckpointError(
          f'{what} in {self.directory} failed ({_reason(e)}); the earlier checkpoints are '
          'intact: free disk space or fix permissions, then run the same command again to '
          'resume') from e

  def remove_temporary(self) -> None:
    """Removes half-written step directories (`*.orbax-checkpoint-tmp*`) of this process's
    run; committed steps are never touched."""
    if jax.process_index() != 0 or not self.directory.exists():
      return
    for path in self.directory.iterdir():
      if _TMP_MARK in path.name:
        path.rmtree(missing_ok=True)


def _verify(step: int, state: Any, meta: dict[str, Any]) -> None:
  """Raises unless the restored state matches the step's saved fingerprint."""
  restored_step = getattr(state, 'step', meta['step'])
  if meta['step'] != step or int(restored_step) != step:
    raise ValueError(f'step mismatch: directory {step}, saved {meta["step"]}, state '
                     f'{int(restored_step)}')
  if 'crc32' in meta and _fingerprint(step, state) != meta:
    raise ValueError(f'checksum mismatch in {meta["leaf"]}')


def latest_step(directory: PathLike) -> int | None:
  """The newest finished step in a checkpoint directory, or None. Orbax renames a step's
  temporary directory to its bare number only once the save is complete."""
  path = epath.Path(directory)
  if not path.is_dir():
    return None
  return max((int(p.name) for p in path.iterdir() if p.name.isdigit()), default=None)


def restore_params(directory: PathLike, abstract_params: Any, step: int | None = None) -> Any:
  """Params only, from another run's checkpoints (fine-tuning from a pretrained model).

  Args:
    directory: that run's checkpoint directory (`<workdir>/checkpoints`).
    abstract_params: ShapeDtypeStructs with shardings for our params; every one must exist
      in the checkpoint with the same shape.
    step: which step; the newest when None.
  """
  step = latest_step(directory) if step is None else step
  if step is None:
    raise FileNotFoundError(f'No checkpoint found in {os.fspath(directory)!r} to initialise '
                            'from.')
  path = as_path(directory) / str(step) / 'state'
  target = {'params': abstract_params}
  restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  return restored['params']


class WorkdirLock:
  """One writer per workdir: the directory `<workdir>/train.lock` holds `owner.json`, the
  host and pid holding it and a heartbeat time that a background thread refreshes.

  Taking the lock is creating that directory only if absent (`mkdir`, atomic on a local or
  network filesystem; on object stores as atomic as the store's epath backend makes it). A lock is stale, and taken over with a warning, when its process is dead on
  this host (e.g. after a kill -9) or its heartbeat is older than `stale_after` seconds on
  another host. Multi-host runs hold it from process 0 only (pass `enabled=False` elsewhere).
  """

  def __init__(self, workdir: PathLike, *, enabled: bool = True, heartbeat: float = 60.0,
               stale_after: float = 600.0):
    self.directory = epath.Path(workdir) / 'train.lock'
    self.path = self.directory / 'owner.json'
    self.enabled = enabled
    self._heartbeat, self._stale_after = heartbeat, stale_after
    self._stop = threading.Event()
    self._thread = None
    self._me = {'host': socket.gethostname(), 'pid': os.getpid()}

  def __enter__(self) -> 'WorkdirLock':
    if not self.enabled:
      return self
    holder = self._read()
    if holder is not None:
      if not self._is_stale(holder):
        raise CheckpointError(
            f'{self.directory.parent} is in use by process {holder.get("pid")} on host '
            f'{holder.get("host")} (lock {self.directory}); wait for it to finish, or delete '
            'that lock directory if the process is gone')
      logging.warning('taking over the stale lock of process %s on host %s (%s)',
                      holder.get('pid'), holder.get('host'), self.directory)
      self.directory.rmtree(missing_ok=True)
    try:
      self.directory.mkdir()
    except FileExistsError:  # another process won the race since we read
      raise CheckpointError(
          f'{self.directory.parent} is in use by another process that just took the lock '
          f'{self.directory}; wait for it to finish') from None
    self.path.write_text(json.dumps({**self._me, 'heartbeat': time.time()}))
    self._thread = threading.Thread(target=self._beat, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc_info) -> None:
    if not self.enabled or self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    holder = self._read() or {}
    if all(holder.get(key) == value for key, value in self._me.items()):  # still ours
      self.directory.rmtree(missing_ok=True)

  def _read(self) -> dict[str, Any] | None:
    """The holder's owner.json; None when unlocked, {} when the lock has no readable owner
    (killed between mkdir and the write): stale."""
    if not self.directory.exists():
      return None
    try:
      return json.loads(self.path.read_text())
    except (FileNotFoundError, ValueError):
      return {}

  def _is_stale(self, holder: dict[str, Any]) -> bool:
    if holder.get('host') == self._me['host'] and isinstance(holder.get('pid'), int):
      try:
        os.kill(holder['pid'], 0)
      except ProcessLookupError:
        return True
      except PermissionError:  # alive, owned by another user
        return False
      return False
    return time.time() - float(holder.get('heartbeat', 0.0)) > self._stale_after

  def _beat(self) -> None:
    tmp = self.directory / 'owner.json.tmp'
    while not self._stop.wait(self._heartbeat):
      tmp.write_text(json.dumps({**self._me, 'heartbeat': time.time()}))
      tmp.replace(self.path)
