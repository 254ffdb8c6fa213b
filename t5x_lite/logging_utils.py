"""Where training metrics go: TensorBoard events, `metrics.jsonl`, and a tqdm progress bar;
and a sweep's TensorBoard HParams summaries."""

import json
from collections.abc import Mapping

import tensorboardX
import tqdm
from etils import epath
from tensorboardX import summary as tb_summary


class MetricLogger:
  """Writes one record per logged step; a no-op on processes other than 0."""

  def __init__(self, workdir: epath.PathLike, *, total_steps: int, initial_step: int = 0,
               enabled: bool = True, prefix: str = 'train'):
    self.enabled = enabled
    self.prefix = prefix
    if not enabled:
      return
    workdir = epath.Path(workdir)
    self._writer = tensorboardX.SummaryWriter(str(workdir / 'tensorboard'))
    self._jsonl = (workdir / 'metrics.jsonl').open('a', encoding='utf-8')
    self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit='step',
                          dynamic_ncols=True, disable=None)
    self._step = initial_step

  def write(self, step: int, metrics: Mapping[str, float], prefix: str | None = None) -> None:
    """Logs `metrics` at `step` under `prefix` (default: this logger's)."""
    if not self.enabled:
      return
    prefix = prefix or self.prefix
    for name, value in metrics.items():
      self._writer.add_scalar(f'{prefix}/{name}', value, step)
    self._writer.flush()
    self._jsonl.write(json.dumps({'step': step, 'split': prefix, **metrics}) + '\n')
    self._jsonl.flush()
    if prefix == self.prefix:
      self._bar.update(step - self._step)
      self._step = step
      postfix = {k: f'{metrics[k]:.4g}' for k in ('loss', 'tokens_per_second') if k in metrics}
      self._bar.set_postfix(postfix, refresh=False)

  def close(self) -> None:
    if self.enabled:
      self._bar.close()
      self._writer.close()
      self._jsonl.close()


def write_hparams(logdir: epath.PathLike, hparams: Mapping[str, Mapping[str, object]],
                  metrics: Mapping[str, Mapping[str, float]]) -> None:
  """TensorBoard HParams summaries for a sweep, in the layout the HParams dashboard reads:
  one experiment (every hyperparameter and metric) at `logdir`, and per session (trial) a
  run `logdir/<session>` with its hyperparameter values and its metrics as scalars.

  Args:
    logdir: written afresh (an old summary of the same sweep is replaced).
    hparams: session -> {hyperparameter: value}; tuples become strings.
    metrics: session -> {metric tag: final value}.
  """
  logdir = epath.Path(logdir)
  if logdir.exists():
    logdir.rmtree()
  values = {session: {k: _hparam_value(v) for k, v in hp.items()}
            for session, hp in hparams.items()}
  all_hparams = {k: v for hp in values.values() for k, v in hp.items()}
  all_metrics = {k: 0.0 for m in metrics.values() for k in m}
  experiment, _, _ = tb_summary.hparams(all_hparams, all_metrics)
  with tensorboardX.SummaryWriter(str(logdir)) as writer:
    writer.file_writer.add_summary(experiment)
  for session, hp in values.items():
    _, start, end = tb_summary.hparams(hp, metrics[session])
    with tensorboardX.SummaryWriter(str(logdir / session)) as writer:
      writer.file_writer.add_summary(start)
      for tag, value in metrics[session].items():
        writer.add_scalar(tag, value, 0)
      writer.file_writer.add_summary(end)


def _hparam_value(value: object) -> object:
  return value if isinstance(value, (bool, int, float, str)) else str(value)
