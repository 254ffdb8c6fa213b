"""Tests of t5x_lite.data.preprocessors: T5's span corruption on hand-worked cases and its
published length arithmetic, the LM objectives, prompt templates and few-shot prompts.

Real text comes from the bundled corpora, tokenized with the shipped ende_8k model.
"""

import collections
import gzip
import json

import numpy as np
import pytest

from t5x_lite.data import preprocessors as prep
from t5x_lite.data import vocabularies
from t5x_lite.data.vocabularies import ByteVocabulary, Feature

# 259 byte/special ids + 741 extra ids = 1000 ids, the mock vocabulary of T5's own tests:
# sentinel_id(0) = 999, sentinel_id(1) = 998, ...
VOCAB_1000 = ByteVocabulary(extra_ids=741)
FEATURES_1000 = {'inputs': Feature(VOCAB_1000), 'targets': Feature(VOCAB_1000)}


def _rows(corpus, split='validation'):
  path = vocabularies.CORPORA_DIR / corpus / f'{split}.jsonl.gz'
  with gzip.open(path, 'rt', encoding='utf-8') as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def features():
  vocab = vocabularies.default_vocabulary()
  return {'inputs': Feature(vocab), 'targets': Feature(vocab)}


@pytest.fixture(scope='module')
def pretrain_tokens(features):
  """568 real tokens: consecutive pretrain_text paragraphs, concatenated as T5 does."""
  vocab = features['targets'].vocabulary
  ids = np.concatenate([vocab.encode(row['text']) for row in _rows('pretrain_text')[:60]])
  assert len(ids) >= 568
  return ids[:568].astype(np.int32)


def _noise_spans(mask):
  starts = mask & ~np.concatenate([[False], mask[:-1]])
  return int(starts.sum())


def _reconstruct(inputs, targets, vocab):
  """Puts each sentinel's noise tokens (from the targets) back into the inputs."""
  sentinels = set(range(vocab.vocab_size - vocab.extra_ids, vocab.vocab_size))
  fill, current = {}, None
  for token in targets.tolist():
    if token in sentinels:
      current = fill.setdefault(token, [])
    else:
      current.append(token)
  out = []
  for token in inputs.tolist():
    out += fill[token] if token in sentinels else [token]
  return np.array(out)


# ----------------------------------------------------------------------------------------
# random_spans_helper
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('args, expected', [
    # T5's defaults (the published 568 -> 512 / 114): 568 tokens have round(85.2) = 85 noise
    # tokens in round(85 / 3) = 28 spans: inputs 568 - 85 + 28 + EOS = 512, targets
    # 85 + 28 + EOS = 114; 569 tokens would give 513 inputs.
    ((512, 0.15, 3.0), (568, 114)),
    # 1137 tokens: 171 noise, 57 spans -> inputs 1024, targets 229; 1138 -> inputs 1025.
    ((1024, 0.15, 3.0), (1137, 229)),
    # 141 tokens: 21 noise, 7 spans -> inputs 128, targets 29; 142 -> 129.
    ((128, 0.15, 3.0), (141, 29)),
    # 767 tokens: 384 noise in 128 spans -> inputs 512 but targets 513, so T5's density-0.5
    # adjustment takes one token off: (766, 512).
    ((512, 0.5, 3.0), (766, 512)),
])
def test_random_spans_helper(args, expected):
  assert prep.random_spans_helper(*args) == expected


def test_random_spans_helper_defaults():
  assert prep.random_spans_helper() == (568, 114)


# ----------------------------------------------------------------------------------------
# random_spans_noise_mask
# ----------------------------------------------------------------------------------------

def test_noise_mask_counts_follow_t5_arithmetic():
  rng = np.random.default_rng(0)
  for length in range(2, 300):
    mask = prep.random_spans_noise_mask(length, 0.15, 3.0, rng)
    # T5 multiplies in float32 (tf.round on a float32 tensor, half to even).
    num_noise = min(max(round(float(np.float32(length) * np.float32(0.15))), 1), length - 1)
    assert mask.shape == (length,) and mask.dtype == bool
    assert mask.sum() == num_noise
    assert _noise_spans(mask) == max(round(num_noise / 3.0), 1)
    assert not mask[0] and mask[-1]  # starts with non-noise, ends with noise


def test_noise_mask_rounds_in_float32_like_t5():
  # 190 * 0.15 is 28.5 in float64 (-> 28, as random_spans_helper counts) but 28.500002 in
  # float32, so T5's mask has 29 noise tokens.
  mask = prep.random_spans_noise_mask(190, 0.15, 3.0, np.random.default_rng(0))
  assert mask.sum() == 29


def test_noise_mask_t5_example():
  # T5's test case: length 32, density 0.25, mean span 2 -> 8 noise tokens in 4 spans.
  mask = prep.random_spans_noise_mask(32, 0.25, 2.0, np.random.default_rng(3))
  assert (mask.sum(), _noise_spans(mask)) == (8, 4)


def test_noise_mask_all_masks_equally_likely():
  # length 10, density 0.3, mean 1.5: 3 noise tokens in 2 spans (2 ways to split) and 7
  # non-noise tokens in 2 spans (6 ways): 12 masks, each with probability 1/12.
  rng = np.random.default_rng(0)
  counts = collections.Counter(
      prep.random_spans_noise_mask(10, 0.3, 1.5, rng).tobytes() for _ in range(3600))
  assert len(counts) == 12
  assert 220 < min(counts.values()) and max(counts.values()) < 380


def test_noise_mask_is_deterministic_per_seed():
  def mask(seed):
    return prep.random_spans_noise_mask(568, 0.15, 3.0, np.random.default_rng(seed))
  np.testing.assert_array_equal(mask(7), mask(7))
  assert not np.array_equal(mask(7), mask(8))


def test_noise_mask_short_lengths_as_t5():
  rng = np.random.default_rng(0)
  assert prep.random_spans_noise_mask(1, 0.15, 3.0, rng).tolist() == [False]
  assert prep.random_spans_noise_mask(2, 0.15, 3.0, rng).tolist() == [False, True]
  with pytest.raises(ValueError, match='noise_density'):
    prep.random_spans_noise_mask(10, 0.0, 3.0, rng)


# ----------------------------------------------------------------------------------------
# sentinels and span_corruption
# ----------------------------------------------------------------------------------------

def test_unique_sentinels_t5_test_case():
  tokens = np.array([10, 11, 12, 13, 14, 15])
  mask = np.array([True, True, False, False, True, False])
  assert prep.noise_span_to_unique_sentinel(tokens, mask, VOCAB_1000).tolist() == [
      999, 12, 13, 998, 15]
  assert prep.nonnoise_span_to_unique_sentinel(tokens, mask, VOCAB_1000).tolist() == [
      10, 11, 999, 14, 998]


class _FixedMask:
  """Stands in for random_spans_noise_mask to hand-work span_corruption."""

  def __init__(self, mask):
    self.mask = np.array(mask, bool)

  def __call__(self, length, noise_density, mean_noise_span_length, rng):
    del noise_density, mean_noise_span_length, rng
    assert length == len(self.mask)
    return self.mask


def test_span_corruption_fixed_mask(monkeypatch):
  # "We hold [these truths] to be [self] evident" with T5's mask shape (ends in noise
  # for the random masks; here a trailing non-noise token shows the closing sentinel).
  monkeypatch.setattr(prep, 'random_spans_noise_mask',
                      _FixedMask([0, 0, 1, 1, 0, 0, 1, 0]))
  example = {'targets': np.arange(10, 18, dtype=np.int32), 'id': 'x'}
  out = prep.span_corruption(example, output_features=FEATURES_1000,
                             rng=np.random.default_rng(0))
  assert out['inputs'].tolist() == [10, 11, 999, 14, 15, 998, 17]
  assert out['targets'].tolist() == [999, 12, 13, 998, 16, 997]
  assert out['inputs'].dtype == np.int32 and set(out) == {'inputs', 'targets'}
  out = prep.append_eos(out, output_features=FEATURES_1000)  # EOS comes after, as in T5
  assert out['inputs'][-1] == 1 and out['targets'].tolist() == [999, 12, 13, 998, 16, 997, 1]


def test_span_corruption_real_text_lengths_and_reconstruction(features, pretrain_tokens):
  vocab = features['targets'].vocabulary
  tokens_length, targets_length = prep.random_spans_helper(512, 0.15, 3.0)
  for seed in range(5):
    out = prep.span_corruption({'targets': pretrain_tokens}, output_features=features,
                               rng=np.random.default_rng(seed))
    np.testing.assert_array_equal(_reconstruct(out['inputs'], out['targets'], vocab),
                                  pretrain_tokens)
    # Sentinels appear in order <extra_id_0>, <extra_id_1>, ... in both features.
    sentinels = [t for t in out['inputs'] if t >= vocab.base_vocab_size]
    assert sentinels == [vocab.sentinel_id(i) for i in range(28)]
    assert out['targets'][0] == vocab.sentinel_id(0)
    out = prep.append_eos(out, output_features=features)
    assert (len(pretrain_tokens), len(out['inputs']), len(out['targets'])) == (
        tokens_length, 512, targets_length)
  text = vocab.decode(out['inputs'])
  assert '<extra_id_0>' in text and '<extra_id_27>' in text


def test_span_corruption_pipeline_from_text(features):
  text = _rows('pretrain_text')[0]['text']
  example = prep.tokenize({'text': text, 'targets': text}, output_features=features)
  example = prep.select_random_chunk(example, rng=np.random.default_rng(0), max_length=568)
  out = prep.span_corruption(example, output_features=features, rng=np.random.default_rng(1))
  vocab = features['targets'].vocabulary
  restored = _reconstruct(out['inputs'], out['targets'], vocab)
  assert vocab.decode(restored) == vocab.normalize(text)


def test_span_corruption_short_and_bad_input(features):
  rng = np.random.default_rng(0)
  for tokens in ([], [42]):  # nothing to swap: dropped, like T5's empty-sequence filter
    example = {'targets': np.array(tokens, np.int32)}
    assert prep.span_corruption(example, output_features=FEATURES_1000, rng=rng) is None
  out = prep.span_corruption({'targets': np.array([42, 43])}, output_features=FEATURES_1000,
                             rng=rng)
  assert (out['inputs'].tolist(), out['targets'].tolist()) == ([42, 999], [999, 43])
  mixed = {'inputs': Feature(ByteVocabulary()), 'targets': features['targets']}
  with pytest.raises(ValueError, match='same vocabulary'):
    prep.span_corruption({'targets': np.arange(5, 20)}, output_features=mixed, rng=rng)
  with pytest.raises(KeyError, match="'targets' not in example with fields \\['text'\\]"):
    prep.span_corruption({'text': 'x'}, output_features=features, rng=rng)
  few_sentinels = {'targets': Feature(ByteVocabulary(extra_ids=2))}
  with pytest.raises(ValueError, match='28 noise spans need as many sentinels'):
    prep.span_corruption({'targets': np.full(568, 50)}, output_features=few_sentinels,
                         rng=rng)


def test_select_random_chunk():
  tokens = np.arange(10, 35)  # 25 tokens, chunks of 10: [0, 10), [10, 20), [20, 25)
  seen = set()
  for seed in range(40):
    out = prep.select_random_chunk({'targets': tokens, 'id': 'a'}, max_length=10,
                                   rng=np.random.default_rng(seed))
    seen.add(tuple(out['targets'].tolist()))
    assert out['id'] == 'a'
  assert seen == {tuple(range(10, 20)), tuple(range(20, 30)), tuple(range(30, 35))}
  empty = {'targets': np.array([], np.int32)}
  assert prep.select_random_chunk(empty, max_length=10, rng=np.random.default_rng(0)) is None


# ----------------------------------------------------------------------------------------
# LM objectives
# ----------------------------------------------------------------------------------------

def test_prefix_lm_splits_uniformly():
  tokens = np.arange(10, 16, dtype=np.int32)
  splits = collections.Counter()
  for seed in range(500):
    out = prep.prefix_lm({'targets': tokens}, rng=np.random.default_rng(seed))
    np.testing.assert_array_equal(np.concatenate([out['inputs'], out['targets']]), tokens)
    splits[len(out['inputs'])] += 1
  assert sorted(splits) == [1, 2, 3, 4, 5] and min(splits.values()) > 60
  assert prep.prefix_lm({'targets': tokens[:1]}, rng=np.random.default_rng(0)) is None


def test_full_lm():
  tokens = np.arange(5, 9)
  out = prep.full_lm({'targets': tokens, 'text': 'raw'})
  assert set(out) == {'targets'} and out['targets'] is tokens


# ----------------------------------------------------------------------------------------
# templates, tokenize, append_eos
# ----------------------------------------------------------------------------------------

def test_prompt_templates_on_real_rows():
  de = _rows('translate_en_de')[0]
  out = prep.translate('en', 'de')(de)
  assert out == {'inputs': f"translate English to German: {de['en']}", 'targets': de['de']}
  assert prep.translate('en', 'zh')({'en': 'a', 'zh': 'b'})['inputs'] == (
      'translate English to Chinese: a')
  debian = _rows('summarize_debian')[0]
  assert prep.summarize()(debian) == {'inputs': f"summarize: {debian['description']}",
                                      'targets': debian['synopsis']}
  review = _rows('sentiment_rt')[0]
  assert prep.classify('sentiment')(review) == {'inputs': f"sentiment: {review['text']}",
                                                'targets': review['label']}
  package = _rows('classify_debian_section')[0]
  section = prep.classify('section', text_key='description', label_key='section')
  assert section(package) == {'inputs': f"section: {package['description']}",
                              'targets': package['section']}


def test_template_errors():
  with pytest.raises(KeyError, match="field 'de' not in example with fields \\['en', 'id'\\]"):
    prep.translate('en', 'de')({'id': '1', 'en': 'Hello'})
  with pytest.raises(ValueError, match="unknown language 'xx'"):
    prep.translate('en', 'xx')


def test_apply_template_and_rekey():
  example = {'question': 'Why?', 'answer': 'Because.', 'n': 3}
  out = prep.apply_template(example, inputs_template='q: {question} ({n})',
                            targets_template='{answer}')
  assert out == {'inputs': 'q: Why? (3)', 'targets': 'Because.'}
  assert prep.rekey(example, key_map={'inputs': 'question', 'targets': 'answer'}) == {
      'inputs': 'Why?', 'targets': 'Because.'}
  with pytest.raises(KeyError, match="rekey: field 'text' not in example"):
    prep.rekey(example, key_map={'targets': 'text'})


def test_tokenize_and_append_eos(features):
  vocab = features['targets'].vocabulary
  out_features = {'inputs': Feature(vocab, add_eos=False), 'targets': Feature(vocab)}
  example = {'inputs': 'Das Haus', 'targets': 'The house', 'id': '7'}
  out = prep.tokenize(example, output_features=out_features, copy_pretokenized=True)
  assert out['inputs'].dtype == np.int32 and out['inputs'].ndim == 1
  assert out['inputs'].tolist() == vocab.encode('Das Haus')
  assert (out['id'], out['targets_pretokenized']) == ('7', 'The house')
  assert 'id' in prep.tokenize(example, output_features=out_features)
  assert 'targets_pretokenized' not in prep.tokenize(example, output_features=out_features)
  out = prep.append_eos(out, output_features=out_features)
  assert out['inputs'].tolist() == vocab.encode('Das Haus')  # add_eos=False
  assert out['targets'].tolist() == vocab.encode('The house') + [1]
  assert out['targets'].dtype == np.int32
  only_targets = prep.tokenize({'targets': 'x'}, output_features=out_features)
  assert set(only_targets) == {'targets'}  # "inputs" is made later (span corruption)


# ----------------------------------------------------------------------------------------
# few-shot prompts
# ----------------------------------------------------------------------------------------

def test_few_shot_prompt_hand_worked():
  shots = [{'inputs': 'a', 'targets': 'A'}, {'inputs': 'b', 'targets': 'B'}]
  prompt = prep.few_shot_prompt('c', shots, k=2, seed=0)
  order = np.random.default_rng(0).permutation(2)
  first, second = (shots[i] for i in order)
  assert prompt == (f"{first['inputs']}\n{first['targets']}\n\n"
                    f"{second['inputs']}\n{second['targets']}\n\nc\n")
  assert prep.few_shot_prompt('c', shots, k=0) == 'c\n'


def test_few_shot_prompt_is_deterministic_and_excludes_the_query():
  translate = prep.translate('en', 'de')
  shots = [translate(row) for row in _rows('translate_en_de', 'train')[:200]]
  query = shots[5]['inputs']
  prompt = prep.few_shot_prompt(query, shots, k=3, seed=1)
  assert prompt == prep.few_shot_prompt(query, shots, k=3, seed=1)
  assert prompt != prep.few_shot_prompt(query, shots, k=3, seed=2)
  assert prompt.count('translate English to German:') == 4 and prompt.endswith(query + '\n')
  assert shots[5]['targets'] not in prompt
  out = prep.few_shot({'inputs': query, 'targets': 'x'}, shots=shots, k=3, seed=1)
  assert out == {'inputs': prompt, 'targets': 'x'}
  with pytest.raises(ValueError, match='needs k=2 shots other than the query, only 1'):
    prep.few_shot_prompt('a', [{'inputs': 'a', 'targets': 'A'},
                               {'inputs': 'b', 'targets': 'B'}], k=2)
