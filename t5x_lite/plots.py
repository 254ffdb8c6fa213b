"""Plots of a run's `metrics.jsonl`: the loss curve as a PNG."""

import json
import os

import matplotlib

matplotlib.use('Agg')  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top


def read_metrics(workdir: str, split: str = 'train') -> list[dict[str, float]]:
  """The records of one split from `<workdir>/metrics.jsonl`, in step order (a resumed run's
  re-logged steps keep their latest value)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise FileNotFoundError(f'No metrics.jsonl in {workdir!r}: train into it first.')
  by_step = {}
  with open(path, encoding='utf-8') as f:
    for line in f:
      record = json.loads(line)
      if record.get('split') == split:
        by_step[record['step']] = record
  return [by_step[step] for step in sorted(by_step)]


def plot_loss_curve(workdir: str, out_path: str | None = None) -> str:
  """Writes the train (and eval, if logged) loss against step; returns the PNG's path."""
  out_path = out_path or os.path.join(workdir, 'loss_curve.png')
  fig, ax = plt.subplots(figsize=(6, 4))
  for split in ('train', 'eval'):
    records = [r for r in read_metrics(workdir, split) if 'loss' in r]
    if records:
      ax.plot([r['step'] for r in records], [r['loss'] for r in records], label=split)
  ax.set_xlabel('step')
  ax.set_ylabel('loss (cross-entropy + z-loss)')
  ax.set_title(os.path.basename(os.path.normpath(workdir)))
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return out_path
