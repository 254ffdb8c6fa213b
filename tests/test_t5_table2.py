"""Tests of experiments/t5_table2.py: every trial of both scales resolves, the architectures
are matched as the paper says, the findings follow the numbers, and the two-stage flow (pre-
train, then fine-tune from its checkpoint) runs end to end and writes the table files."""

import importlib.util
import os

import pytest

from t5x_lite import sweeps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(REPO, 'experiments', 't5_table2.py')
_spec = importlib.util.spec_from_file_location('t5_table2', SWEEP)
table2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table2)


def test_every_trial_resolves_and_fine_tunes_from_its_own_pretraining(tmp_path):
  trials = sweeps.make_trials(SWEEP, str(tmp_path))
  by_name = {t.name: t for t in trials}
  settings = table2.SCALES['cpu']
  pretrain = [t for t in trials if t.config.train.num_steps == settings['pretrain_steps']]
  finetune = [t for t in trials if t.config.train.num_steps == settings['finetune_steps']]
  assert (len(pretrain), len(finetune), len(trials)) == (24, 108, 132)
  assert sum(bool(t.after) for t in finetune) == 72  # 36 start from scratch
  for trial in finetune:
    assert trial.config.data.task in table2.TASKS
    for name in trial.after:  # same model, converter and seed as the run it builds on
      source = by_name[name].config
      assert trial.config.train.init_from == f'{tmp_path}/{name}/checkpoints'
      assert trial.config.model == source.model and trial.config.seed == source.seed
      assert trial.config.data.converter == source.data.converter


def test_the_tpu_scale_dry_runs(tmp_path):
  lines = []
  assert sweeps.run_sweep(f'{SWEEP}:tpu', str(tmp_path / 'runs'), dry_run=True,
                          log=lines.append) == 0
  # Fine-tuning evaluates inside train and pre-training has nothing to score: no eval stage.
  assert len(lines) == 132 and all(' train ' in line for line in lines)
  assert all(f'--config={SWEEP}:tpu' in line for line in lines)
  config = sweeps.make_trials(f'{SWEEP}:tpu')[0].config
  assert (config.model.d_model, config.model.num_decoder_layers) == (768, 12)
  assert not (tmp_path / 'runs').exists()


def test_architectures_are_matched_as_in_the_paper():
  # Without the embedding and output layer (as the paper counts): params 2P / P / P / P,
  # FLOPs per example M / M/2 / M / M.
  costs = {arch: table2._model_cost('cpu', arch) for arch in table2.ARCHITECTURES}
  body = {arch: cost[1] for arch, cost in costs.items()}
  flops = {arch: cost[3] for arch, cost in costs.items()}
  assert costs['lm'] == costs['prefix_lm']
  # Decoder layers carry cross-attention: a bit more than 2P and P.
  assert 2.0 < body['enc_dec'] / body['lm'] < 2.5
  assert 1.0 < body['enc_dec_half'] / body['lm'] < 1.25
  assert flops['enc_dec_half'] / flops['enc_dec'] == pytest.approx(0.5)
  assert flops['lm'] / flops['enc_dec'] == pytest.approx(1.0, abs=0.15)
  assert all(cost[2] > cost[3] for cost in costs.values())  # the output layer costs too


def test_findings_follow_the_numbers():
  # Hand-made cells (mean, std, n): enc-dec + denoising clearly best on every task, the LM
  # objective within noise of denoising for the decoder-only models.
  cells = {}
  for task in table2.TASKS:
    cells.update({
        ('enc_dec', 'denoising', task): (30.0, 0.5, 3), ('enc_dec', 'lm', task): (20.0, 0.5, 3),
        ('enc_dec', 'none', task): (10.0, 0.5, 3),
        ('enc_dec_half', 'denoising', task): (25.0, 0.5, 3),
        ('enc_dec_half', 'lm', task): (18.0, 0.5, 3),
        ('enc_dec_half', 'none', task): (9.0, 0.5, 3),
        ('lm', 'denoising', task): (15.0, 2.0, 3), ('lm', 'lm', task): (15.5, 2.0, 3),
        ('lm', 'none', task): (15.0, 2.0, 3),
        ('prefix_lm', 'denoising', task): (16.0, 2.0, 3),
        ('prefix_lm', 'lm', task): (16.5, 2.0, 3), ('prefix_lm', 'none', task): (16.0, 2.0, 3)})
  lines = table2.findings(cells)
  assert len(lines) == 5
  assert lines[0].count(': best, beyond noise of the next') == 3
  worse = {**cells, ('enc_dec', 'denoising', 'translate_en_de'): (24.0, 0.5, 3)}
  assert 'EnDe BLEU: below, beyond noise, the best (enc_dec_half/denoising)' in (
      table2.findings(worse)[0])
  assert 'holds (better beyond seed noise in 6 of 12 comparisons, within noise in 6' in lines[1]
  assert ('not shown beyond seed noise (better beyond seed noise in 0 of 9 comparisons, '
          'within noise in 9') in lines[2]
  assert 'holds (better beyond seed noise in 9 of 9' in lines[3]
  assert 'in 12 of 24 comparisons, within noise in 12, worse in 0' in lines[4]
  assert table2._stats([1.0, 2.0, 6.0]) == (3.0, pytest.approx(2.6457513), 3)
  assert not table2._beyond_noise((30.0, 0.0, 1), (10.0, 0.0, 1))  # one seed: noise unknown


@pytest.mark.slow
def test_two_stage_flow_writes_the_table(tmp_path, monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '')  # one CPU device per trial, as the sweep gives it
  workdir = tmp_path / 'runs'
  lines = []
  # Two slots: the fine-tuning trial is looked at while its pre-training runs, and waits.
  assert sweeps.run_sweep(f'{SWEEP}:smoke', str(workdir), parallel=2,
                          log=lines.append) == 0, lines
  pretrain, finetune = sweeps.make_trials(f'{SWEEP}:smoke', str(workdir))
  assert finetune.after == (pretrain.name,)
  assert not (workdir / pretrain.name / 'eval.log').exists()  # nothing to score
  for trial in (pretrain, finetune):
    assert sweeps.read_status(workdir / trial.name)['status'] == sweeps.FINISHED
  table = (workdir / 'table2' / 'results.md').read_text()
  row = next(line for line in table.splitlines() if line.startswith('| Enc-dec, L/2+L/2'))
  cells = [cell.strip() for cell in row.strip('|').split('|')]
  assert cells[1] == 'Denoising' and ' ± ' in cells[4]
  accuracy = float(cells[4].split(' ± ')[0])
  assert 0 <= accuracy <= 100
  assert (workdir / 'table2' / 'results.csv').read_text().count('\n') == 2
  assert (workdir / 'table2' / 'table2.png').read_bytes().startswith(b'\x89PNG')
