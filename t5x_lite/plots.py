"""Plots of runs' `metrics.jsonl` as PNGs: a run's loss curve, a sweep's loss curves, each
metric against each swept hyperparameter, and grouped bars of mean ± std over seeds."""

import json
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
from etils import epath

matplotlib.use('Agg')  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top


def read_metrics(workdir: epath.PathLike, split: str = 'train') -> list[dict[str, float]]:
  """The records of one split from `<workdir>/metrics.jsonl`, in step order (a resumed run's
  re-logged steps keep their latest value)."""
  path = epath.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    raise FileNotFoundError(f'No metrics.jsonl in {str(workdir)!r}: train into it first.')
  by_step = {}
  for line in path.read_text().splitlines():
    record = json.loads(line)
    if record.get('split') == split:
      by_step[record['step']] = record
  return [by_step[step] for step in sorted(by_step)]


def _save(fig: plt.Figure, ax: plt.Axes | None, out_path: epath.PathLike) -> epath.Path:
  if ax is not None:
    ax.grid(alpha=0.3)
  fig.tight_layout()
  out_path = epath.Path(out_path)
  with out_path.open('wb') as f:
    fig.savefig(f, format='png', dpi=100)
  plt.close(fig)
  return out_path


def plot_loss_curve(workdir: epath.PathLike, out_path: epath.PathLike | None = None) -> str:
  """Writes the train (and eval, if logged) loss against step; returns the PNG's path."""
  workdir = epath.Path(workdir)
  fig, ax = plt.subplots(figsize=(6, 4))
  for split in ('train', 'eval'):
    records = [r for r in read_metrics(workdir, split) if 'loss' in r]
    if records:
      ax.plot([r['step'] for r in records], [r['loss'] for r in records], label=split)
  ax.set_xlabel('step')
  ax.set_ylabel('loss (cross-entropy + z-loss)')
  ax.set_title(workdir.name)
  ax.legend()
  return str(_save(fig, ax, out_path or workdir / 'loss_curve.png'))


def plot_loss_curves(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
                     out_path: epath.PathLike, title: str = '') -> epath.Path:
  """Several runs' train loss against step on one figure, labelled by their names."""
  fig, ax = plt.subplots(figsize=(8, 5))
  for label, (steps, losses) in curves.items():
    ax.plot(steps, losses, label=label)
  ax.set_xlabel('step')
  ax.set_ylabel('train loss (cross-entropy + z-loss)')
  ax.set_title(title)
  if curves:
    ax.legend(fontsize='small')
  return _save(fig, ax, out_path)


def plot_metric_against(rows: Sequence[Mapping[str, Any]], param: str, metric: str,
                        group_by: Sequence[str], out_path: epath.PathLike) -> epath.Path:
  """`metric` against the values of `param`, one line per combination of the `group_by`
  values; a numeric param spanning more than 10x gets a log axis, other values are
  categories."""
  rows = [r for r in rows if r.get(metric) is not None and r.get(param) is not None]
  values = list(dict.fromkeys(r[param] for r in rows))
  numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
  position = (lambda v: v) if numeric else {v: i for i, v in enumerate(values)}.get
  fig, ax = plt.subplots(figsize=(6, 4))
  groups = {}
  for row in rows:
    groups.setdefault(tuple(row.get(g) for g in group_by), []).append(row)
  for key, members in groups.items():
    members = sorted(members, key=lambda r: values.index(r[param]))
    label = ', '.join(f'{g.rsplit(".", 1)[-1]}={v}' for g, v in zip(group_by, key))
    ax.plot([position(r[param]) for r in members], [r[metric] for r in members], 'o-',
            label=label or None)
  if numeric and values and min(values) > 0 and max(values) > 10 * min(values):
    ax.set_xscale('log')
  if not numeric:
    ax.set_xticks(range(len(values)), [str(v) for v in values])
  ax.set_xlabel(param)
  ax.set_ylabel(metric)
  if any(group_by) and groups:
    ax.legend(fontsize='small')
  return _save(fig, ax, out_path)


def plot_grouped_bars(panels: Mapping[str, Mapping[str, Mapping[str, tuple[float, float]]]],
                      out_path: epath.PathLike, title: str = '') -> epath.Path:
  """Bars of mean ± std, one panel per key of `panels` ({panel: {group: {bar: (mean,
  std)}}}): a group's bars side by side, each bar label in one colour across panels."""
  bars = list(dict.fromkeys(b for groups in panels.values() for g in groups.values() for b in g))
  fig, axes = plt.subplots(1, len(panels), figsize=(max(4.5 * len(panels), 8), 4),
                           squeeze=False)
  width = 0.8 / max(len(bars), 1)
  for ax, (panel, groups) in zip(axes[0], panels.items()):
    for i, bar in enumerate(bars):
      cells = [(j, groups[g][bar]) for j, g in enumerate(groups) if bar in groups[g]]
      ax.bar([j + (i - (len(bars) - 1) / 2) * width for j, _ in cells],
             [mean for _, (mean, _) in cells], width, yerr=[std for _, (_, std) in cells],
             capsize=2, label=bar, color=f'C{i}')
    ax.set_xticks(range(len(groups)), list(groups), fontsize='small')
    ax.set_title(panel)
    ax.grid(alpha=0.3, axis='y')
  axes[0][0].legend(fontsize='small')
  fig.suptitle(title)
  return _save(fig, None, out_path)
