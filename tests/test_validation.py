"""Tests for t5x_lite.validation: the resume checks against a stored run (its config.json and
checkpoint), the record of allowed changes, and the finished-run check. The bad values
themselves are the catalogue in test_bad_inputs."""

import json

import pytest

from t5x_lite import validation
from test_bad_inputs import tree_hash, write_run
from test_checkpoints import tiny_config


@pytest.fixture
def stored(tmp_path):
  config = tiny_config()
  write_run(str(tmp_path), config, step=5)
  return tmp_path, config


def test_allowed_changes_are_listed_then_recorded(stored):
  workdir, config = stored
  config.train.num_steps = 40
  config.optimizer.learning_rate = 0.5
  config.train.log_every = 1
  plan = validation.check_train(config, str(workdir))
  assert plan.changes == {'optimizer.learning_rate': (1.0, 0.5), 'train.log_every': (10, 1),
                          'train.num_steps': (10, 40)}
  assert plan.latest_step == 5 and not plan.finished
  assert validation.describe(plan.changes) == (
      'optimizer.learning_rate 1.0 -> 0.5, train.log_every 10 -> 1, train.num_steps 10 -> 40')
  validation.save_run_config(config, str(workdir), plan.changes)
  history = [json.loads(line) for line in
             (workdir / 'config_history.jsonl').read_text().splitlines()]
  assert [h['changes'] for h in history] == [{'optimizer.learning_rate': [1.0, 0.5],
                                              'train.log_every': [10, 1],
                                              'train.num_steps': [10, 40]}]
  assert json.loads((workdir / 'config.json').read_text())['train']['num_steps'] == 40
  assert validation.check_train(config, str(workdir)).changes == {}  # now the stored run


def test_hand_edited_config_json_is_a_change_not_silently_overwritten(stored):
  workdir, config = stored
  stored_config = json.loads((workdir / 'config.json').read_text())
  stored_config['train']['keep_checkpoints'] = 7
  (workdir / 'config.json').write_text(json.dumps(stored_config))
  assert validation.check_train(config, str(workdir)).changes == {
      'train.keep_checkpoints': (7, 3)}


@pytest.mark.parametrize('field, value', [('model.num_heads', 2), ('train.batch_size', 16),
                                          ('data.task', 'translate_en_fr'), ('seed', 1)])
def test_frozen_changes_stop_and_write_nothing(stored, field, value):
  workdir, config = stored
  section, name = field.rsplit('.', 1) if '.' in field else ('', field)
  (config[section] if section else config)[name] = value
  before = tree_hash(workdir)
  with pytest.raises(ValueError, match=rf'{field} .* -> .*another --workdir.*init_from='):
    validation.check_train(config, str(workdir))
  assert tree_hash(workdir) == before


def test_a_finished_run_is_reported_finished(stored):
  workdir, config = stored
  config.train.num_steps = 5
  plan = validation.check_train(config, str(workdir))
  assert plan.finished and plan.latest_step == 5
