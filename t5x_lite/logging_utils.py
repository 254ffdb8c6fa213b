"""Where training metrics go: TensorBoard events, `metrics.jsonl`, and a tqdm progress bar."""

import json
import os
from collections.abc import Mapping

import tensorboardX
import tqdm


class MetricLogger:
  """Writes one record per logged step; a no-op on processes other than 0."""

  def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0,
               enabled: bool = True, prefix: str = 'train'):
    self.enabled = enabled
    self.prefix = prefix
    if not enabled:
      return
    self._writer = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
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
