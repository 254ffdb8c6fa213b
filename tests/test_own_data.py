"""The README's "Train on your own data" commands, run through the CLI on a TSV written here.

The test runs the section's bash block itself (with a smaller model, vocabulary and step
count appended to each command), so the README cannot drift from what works, and checks
the data report's figures against a hand computation, the trained vocabulary's round trip
and the eval BLEU line. Bad input: one `error:` line, exit code 2, nothing written.
"""

import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

from t5x_lite.data import sources, vocabularies

REPO = pathlib.Path(__file__).parent.parent
PREFIX = 'translate English to French: '
# Appended to every command of the section: a tiny model, a few steps, a small vocabulary.
SMALL = ('--config.model.d_model=32 --config.model.num_heads=2 --config.model.head_dim=16 '
         '--config.model.d_ff=64 --config.model.num_encoder_layers=1 '
         '--config.model.num_decoder_layers=1 --config.model.vocab_size=512 '
         '--config.train.num_steps=8 --config.train.batch_size=8 --config.train.log_every=4 '
         '--config.train.checkpoint_every=8 --config.optimizer.warmup_steps=2 '
         '--config.eval.batch_size=8 --config.eval.max_decode_length=8 --vocab.size=400')


def _write_pairs(directory: pathlib.Path) -> dict[str, list[tuple[str, str]]]:
  """pairs_{train,validation}.tsv with a header line: real English→French pairs."""
  pairs = {}
  for split, count in (('train', 150), ('validation', 8)):
    rows = sources.corpus_source('translate_en_fr', split)
    pairs[split] = [(rows[i]['en'], rows[i]['fr']) for i in range(count)]
    text = 'en\tfr\n' + ''.join(f'{en}\t{fr}\n' for en, fr in pairs[split])
    (directory / f'pairs_{split}.tsv').write_text(text, encoding='utf-8')
  return pairs


def _section_script() -> str:
  """The README section's bash block, minus its file-writing snippet, each command with
  SMALL appended, run by this interpreter against this checkout's configs."""
  readme = (REPO / 'README.md').read_text(encoding='utf-8')
  section = readme[readme.index('## Train on your own data'):]
  block = re.search(r'```bash\n(.*?)```', section, re.S).group(1)
  block = re.sub(r"python - <<'EOF'\n.*?\nEOF\n", '', block, count=1, flags=re.S)
  assert block.count('--config=configs/') == 1
  block = block.replace('--config=configs/', f'--config={REPO}/configs/')
  lines = []
  for line in block.splitlines():
    command = re.match(r'python -m t5x_lite\.main (\w+) ', line)
    if command:
      lines.append(f'echo "### {command.group(1)}"')
      line = f'{sys.executable} {line[len("python "):]} {SMALL}'
    lines.append(line)
  return '\n'.join(['set -e', *lines])


def _lengths(vocabulary, pairs):
  return {'inputs': [len(vocabulary.encode(PREFIX + en)) + 1 for en, _ in pairs],
          'targets': [len(vocabulary.encode(fr)) + 1 for _, fr in pairs]}  # + EOS


def _check_report(report: str, vocabulary, pairs, limits) -> None:
  """The report's per-split counts, percentile table and cut counts, by hand."""
  for split, split_pairs in pairs.items():
    text = report[report.index(f'\n{split}: '):]
    assert text.startswith(f'\n{split}: {len(split_pairs)} examples\n')
    for key, values in _lengths(vocabulary, split_pairs).items():
      ordered = sorted(values)
      figures = [ordered[math.ceil(q / 100 * len(values)) - 1] for q in (50, 90, 95, 99)]
      cut = sum(n > limits[key] for n in values)
      row = re.search(rf'\n  {key} +' + ' +'.join([r'(\d+)'] * 6) + r'  (\d+) ', text)
      assert [int(x) for x in row.groups()] == [*figures, max(values), limits[key], cut]


def _cli_env() -> dict[str, str]:
  return {**os.environ, 'PYTHONPATH': str(REPO)}


@pytest.mark.slow
def test_readme_section_runs_end_to_end(tmp_path):
  pairs = _write_pairs(tmp_path)
  result = subprocess.run(['bash', '-c', _section_script()], cwd=tmp_path, env=_cli_env(),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  outputs = dict(re.findall(r'### (\w+)\n(.*?)(?=\n### |\Z)',
                            result.stdout.replace('### data', '### data1', 1), re.S))
  assert set(outputs) == {'data1', 'vocab', 'data', 'train', 'eval'}

  # The report under the default vocabulary and the config's lengths (64 / 64).
  default = vocabularies.default_vocabulary()
  _check_report(outputs['data1'], default, pairs, {'inputs': 64, 'targets': 64})

  # The new vocabulary: T5 layout, 100 sentinels on top, and a lossless round trip.
  assert outputs['vocab'].startswith('wrote pairs.model: 400 pieces + 100 sentinel ids = '
                                     '500 ids, trained on 300 texts of tsv train')
  assert ('use it: --config.data.vocabulary=pairs.model --config.model.vocab_size=512'
          in outputs['vocab'])
  vocabulary = vocabularies.SentencePieceVocabulary(tmp_path / 'pairs.model')
  assert (vocabulary.vocab_size, vocabulary.pad_id, vocabulary.eos_id,
          vocabulary.unk_id) == (500, 0, 1, 2)
  assert vocabulary.encode('<extra_id_0>') == [499]
  for en, fr in pairs['train'] + pairs['validation']:
    for text in (PREFIX + en, fr):
      assert vocabulary.decode(vocabulary.encode(text)) == vocabulary.normalize(text)

  # The report again under the new vocabulary, and train's one-line summary of it.
  _check_report(outputs['data'], vocabulary, pairs, {'inputs': 64, 'targets': 64})
  lengths = _lengths(vocabulary, pairs['train'])
  cut = sum(i > 74 or t > 82 for i, t in zip(lengths['inputs'], lengths['targets']))
  assert (f'data: train (150 examples): feature_lengths inputs=74 targets=82 cut {cut} '
          in outputs['train'])

  assert 'tsv validation (8 examples) at step 8:' in outputs['eval']
  assert re.search(r'\n  bleu +\d+\.\d{4} +\d+\.\d{4}\n', outputs['eval'])
  predictions = (tmp_path / 'runs/pairs/eval_tsv_validation.jsonl').read_text().splitlines()
  assert len(predictions) == 8


def _bad_input_cases(tmp_path):
  (tmp_path / 'ok.tsv').write_text('en\tfr\nhello\tbonjour\nthanks\tmerci\n', encoding='utf-8')
  (tmp_path / 'latin1.tsv').write_bytes(b'en\tfr\nhello\tbonjour\ncaf\xe9\tx\n')
  (tmp_path / 'ragged.tsv').write_text('en\tfr\nhello\tbonjour\tsalut\n', encoding='utf-8')
  data = ['--config.data.inputs_template={en}', '--config.data.targets_template={fr}']
  return [
      (['data', '--config.data.files.train=nothing*.tsv', *data],
       r'nothing\*\.tsv: no such file'),
      (['data', '--config.data.files.train=ok.tsv', '--config.data.inputs_template={de}',
        '--config.data.targets_template={fr}'],
       r'ok\.tsv:1: the header has no column de .*; columns found: en, fr'),
      (['data', '--config.data.files.train=ok.tsv', '--config.data.header=False',
        '--config.data.columns=en,fr', '--config.data.inputs_template={english}',
        '--config.data.targets_template={fr}'], r"templates use \['english'\]"),
      (['data', '--config.data.files.train=latin1.tsv', *data],
       r'latin1\.tsv:3: not valid UTF-8'),
      (['data', '--config.data.files.train=ragged.tsv', *data],
       r'ragged\.tsv:2: 3 tab-separated fields, expected 2 \(en, fr\)'),
      (['vocab', '--config.data.files.train=ok.tsv', *data, '--vocab.size=8000',
        '--vocab.out=my.model'], 'vocab_size 8000 is more than this text supports'),
      (['train', '--workdir=run', '--config.data.files.train=ok.tsv',
        '--config.data.inputs_template={de}', '--config.data.targets_template={fr}'],
       'the header has no column de'),
  ]


@pytest.mark.slow
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path):
  for args, message in _bad_input_cases(tmp_path):
    before = sorted(os.listdir(tmp_path))
    result = subprocess.run(
        [sys.executable, '-m', 't5x_lite.main', args[0],
         f'--config={REPO}/configs/t5_1_1_tiny.py', *args[1:]],
        cwd=tmp_path, env=_cli_env(), capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert result.returncode == 2 and len(errors) == 1, (args, result.stderr[-2000:])
    assert re.search(message, errors[0]), (message, errors[0])
    assert sorted(os.listdir(tmp_path)) == before, args
