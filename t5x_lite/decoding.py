"""Autoregressive decoding: greedy, temperature sampling (top-k, top-p) and T5X-style beam search.

Decoding knows no model. It drives a `tokens_to_logits(ids [B, 1], cache) -> (logits [B, V],
cache)` function one token per step inside a single `lax.while_loop`, so a whole search compiles
under `jax.jit` with the (frozen, hashable) `DecodeConfig` static. The caller builds that
function and its KV cache (`evaluation.make_tokens_to_logits`); every cache leaf has the batch
on axis 0, which is all that beam search and multiple samples need to expand (`expand_batch`)
and reorder it.

Step t feeds each row's token at position t and reads the logits for position t + 1:

  * without a `prompt` (encoder-decoder, or unconditional generation) position 0 holds
    `start_id` and every step generates;
  * with a `prompt` [b, P] right-padded with 0 (decoder-only), the prompt is forced while
    t + 1 is inside the row (as T5X's decode does with `inputs`), so rows of different prompt
    lengths decode in one batch and each returns the tokens after its own prompt. The first
    prompt token is the first input (no start token is added), and the cache must span
    P + max_decode_length positions.

A row stops at EOS (kept in the output, 0s after it) or after `max_decode_length` tokens; the
loop stops once every row has. Batch-sized state carries the logical axis `batch`, so under a
partitioner's rules it is sharded over the data axes like training batches.

Scores. Greedy and sampling return the sum of the model's log-probabilities of the generated
tokens, EOS included, from the unmodified logits (before temperature, top-k, top-p or n-gram
bans), i.e. what teacher-forced scoring of the output gives. Beam search returns T5X's
length-normalised score, sum log-prob / brevity_penalty(L) with
brevity_penalty(L) = ((5 + L) / 6) ** alpha and L the number of generated tokens (EOS included).

Beam search follows T5X's `beam_search`: each step keeps the 2k best continuations of the k
live beams (so k stay live even if k of them end), the best k that did not end stay live,
those that ended (EOS) join the k best finished hypotheses, and a row stops early once its k
finished ones all beat the best any live beam could still reach (its log-prob over
brevity_penalty(max_decode_length), an exact bound for alpha >= 0). Compared with Hugging
Face's `generate(num_beams=k)`:

  * HF's `length_penalty` lp scores sum log-prob / L ** lp. There is no general mapping to
    alpha: only alpha = 0 and lp = 0 agree (both the raw sum log-prob).
  * Of the 2k continuations, T5X lets every one that ends at EOS into the finished set; HF only
    those ranked in the top k.
  * At `max_decode_length`, HF scores the unfinished beams like finished ones; T5X returns
    them only when a row has no finished hypothesis. We return the finished hypotheses first,
    best first, then fill the remaining `num_return_sequences` slots with the live beams
    (scored with L = max_decode_length), which for the top beam is T5X's rule.
  * With lp = 0, HF's default early stopping is the same bound as ours with alpha = 0.

So alpha = 0 gives HF's result with `length_penalty=0` whenever no EOS is among a step's 2k
best continuations (tested with an EOS id the model cannot emit); the EOS and brevity-penalty
rules are tested against brute-force enumeration over a tiny vocabulary.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from t5x_lite import layers

Array = jax.Array
Cache = Any
# (current token ids [B, 1] int32, cache) -> (next-token logits [B, V] float32, updated cache).
TokensToLogits = Callable[[Array, Cache], tuple[Array, Cache]]

METHODS = ('greedy', 'sample', 'beam')
# Finite "minus infinity" for beam log-probs: sums of it stay finite (no inf - inf = nan), and
# a beam or candidate scoring below NEG_INF / 2 is impossible (a dead beam or a banned token).
NEG_INF = -1.0e7
# Sampling below this temperature takes the argmax: logits / ~0 would overflow.
MIN_TEMPERATURE = 1e-4


# ----------------------------------------------------------------------------------------------
# Configuration and inputs.


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """What to search for; frozen and hashable, so it can be a static argument of `jax.jit`."""

  method: str = 'greedy'  # one of METHODS
  max_decode_length: int = 64  # tokens generated per row, EOS included
  temperature: float = 1.0  # sample: logits / temperature (below 1e-4: the argmax)
  top_k: int = 0  # sample: only the k most likely tokens (0: all)
  top_p: float = 1.0  # sample: only the smallest set holding probability >= top_p (1: all)
  num_beams: int = 4  # beam
  alpha: float = 0.6  # beam: brevity penalty ((5 + length) / 6) ** alpha
  num_return_sequences: int = 1  # sample: independent samples; beam: the best beams
  no_repeat_ngram_size: int = 0  # ban tokens completing an n-gram already in the row (0: off)
  eos_id: int = 1  # an id outside the vocabulary never ends a row early

  def __post_init__(self):
    _check(self.method in METHODS, 'method', self.method, f'one of {METHODS}')
    for name in ('max_decode_length', 'num_beams', 'num_return_sequences'):
      _check(_is_int(getattr(self, name)) and getattr(self, name) > 0, name,
             getattr(self, name), 'a positive integer')
    for name in ('top_k', 'no_repeat_ngram_size', 'eos_id'):
      _check(_is_int(getattr(self, name)) and getattr(self, name) >= 0, name,
             getattr(self, name), 'a non-negative integer')
    _check(_is_real(self.temperature) and self.temperature >= 0, 'temperature',
           self.temperature, 'a non-negative number')
    _check(_is_real(self.top_p) and 0 < self.top_p <= 1, 'top_p', self.top_p, 'in (0, 1]')
    # The early-stopping bound assumes longer hypotheses are never penalised more.
    _check(_is_real(self.alpha) and self.alpha >= 0, 'alpha', self.alpha,
           'a non-negative number')
    if self.method == 'greedy':
      _check(self.num_return_sequences == 1, 'num_return_sequences', self.num_return_sequences,
             "1 with method='greedy' (use 'sample' or 'beam' for several)")
    if self.method == 'beam':
      _check(self.num_return_sequences <= self.num_beams, 'num_return_sequences',
             self.num_return_sequences, f'at most num_beams={self.num_beams}')


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return (isinstance(value, (int, float, np.integer, np.floating))
          and not isinstance(value, bool) and math.isfinite(value))


def _check(ok: bool, field: str, value: Any, allowed: str):
  if not ok:
    raise ValueError(f'Invalid decode config: {field}={value!r}; must be {allowed}.')


def check_prompts(prompt: Any, max_length: int | None) -> np.ndarray:
  """Validates decoder-only prompts on the host, before decoding; returns their lengths.

  A row's prompt runs up to its last nonzero token (0 is padding only at the end, so a model
  trained with a 0 start token can be prompted with a leading 0).

  Args:
    prompt: [batch, P] integer tokens, right-padded with 0.
    max_length: the most tokens a prompt may have (e.g. the model's maximum length minus the
      tokens to generate); None for no limit.

  Returns:
    int64 [batch] prompt lengths.

  Raises:
    ValueError: for a prompt that is not a [batch, P] integer array, a row without tokens,
      or a row longer than `max_length`.
  """
  prompt = np.asarray(prompt)
  if prompt.ndim != 2 or not np.issubdtype(prompt.dtype, np.integer) or not prompt.shape[0]:
    raise ValueError(f'A prompt must be a non-empty [batch, length] integer array; got shape '
                     f'{prompt.shape} and dtype {prompt.dtype}.')
  lengths = np.max(np.where(prompt != 0, np.arange(1, prompt.shape[1] + 1), 0), axis=1,
                   initial=0)
  empty = np.flatnonzero(lengths == 0)
  if empty.size:
    raise ValueError(f'Empty prompt in row(s) {empty.tolist()}: a decoder-only prompt needs at '
                     f'least one token.')
  if max_length is not None:
    long = np.flatnonzero(lengths > max_length)
    if long.size:
      raise ValueError(f'Prompt row(s) {long.tolist()} have {lengths[long].tolist()} tokens, '
                       f'more than max_length={max_length}.')
  return lengths


def expand_batch(tree: Any, n: int) -> Any:
  """Repeats each row of every leaf n times along axis 0: [b, ...] -> [b * n, ...].

  Row i's copies land at i * n ... i * n + n - 1, the layout the searches use for the beams
  (or samples) of one example. Scalar leaves are left alone.
  """
  if n == 1:
    return tree
  return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0) if jnp.ndim(x) else x, tree)


def brevity_penalty(alpha: float, length: Array) -> Array:
  """T5X's length normalisation for beam scores: ((5 + length) / 6) ** alpha."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


# ----------------------------------------------------------------------------------------------
# Entry point.


def decode(tokens_to_logits: TokensToLogits, cache: Cache, *, config: DecodeConfig,
           batch_size: int, rng: Array | None = None, prompt: Array | None = None,
           start_id: int = 0) -> tuple[Array, Array]:
  """Generates `config.max_decode_length` tokens per row by `config.method`.

  Args:
    tokens_to_logits: one decoding step, see `TokensToLogits`.
    cache: its state for `batch_size` rows, every leaf with the batch on axis 0 (with a
      prompt, spanning prompt length + max_decode_length positions).
    config: the search; static under `jax.jit`.
    batch_size: the number of rows.
    rng: a jax random key for sampling (default key 0); other methods ignore it.
    prompt: optional int [batch_size, P] prompts right-padded with 0, forced token by token;
      validate them beforehand with `check_prompts` (done here when `prompt` is concrete).
    start_id: the first input token of every row without a prompt (T5's decoder start, 0).

  Returns:
    sequences: int32 [batch_size, num_return_sequences, max_decode_length], the tokens after
      each row's prompt, 0 after EOS, best first.
    scores: float32 [batch_size, num_return_sequences]: the sum log-prob (greedy, sample) or
      the length-penalised beam score (beam), see the module docstring.
  """
  prefix, lengths = _prefix(prompt, batch_size, start_id)
  if config.method == 'beam':
    return _beam_search(tokens_to_logits, cache, config, prefix, lengths)
  n = config.num_return_sequences
  rng = jax.random.key(0) if rng is None else rng
  tokens, scores = _sample_search(tokens_to_logits, expand_batch(cache, n), config,
                                  expand_batch(prefix, n), expand_batch(lengths, n), rng)
  tokens = tokens.reshape(batch_size, n, -1)
  scores = scores.reshape(batch_size, n)
  order = jnp.argsort(-scores, axis=1)  # best sample first
  return _take_beams(tokens, order), jnp.take_along_axis(scores, order, axis=1)


def _prefix(prompt: Array | None, batch_size: int, start_id: int) -> tuple[Array, Array]:
  """Each row's forced tokens, int32 [batch_size, P], and how many there are, [batch_size]."""
  if prompt is None:
    return (jnp.full((batch_size, 1), start_id, jnp.int32),
            jnp.ones((batch_size,), jnp.int32))
  if len(np.shape(prompt)) != 2 or np.shape(prompt)[0] != batch_size:
    raise ValueError(f'prompt must have shape [batch_size={batch_size}, length]; got '
                     f'{np.shape(prompt)}.')
  if not isinstance(prompt, jax.core.Tracer):
    check_prompts(prompt, None)
  prompt = jnp.asarray(prompt, jnp.int32)
  lengths = jnp.max(jnp.where(prompt != 0, jnp.arange(1, prompt.shape[1] + 1), 0), axis=1,
                    initial=0)
  # An empty row (unchecked under jit) decodes as if its prompt were the single token 0.
  return prompt, jnp.maximum(lengths, 1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Shared helpers.


def _shard(x: Array) -> Array:
  """Constrains a batch-first array to be split over the data axes (no-op without rules)."""
  return layers.constrain(x, ('batch',) + (None,) * (x.ndim - 1))


def _top_k(x: Array, k: int) -> tuple[Array, Array]:
  """`lax.top_k` over the last axis, run on each device's rows of a batch-sharded `x`.

  XLA's SPMD partitioner all-gathers the batch of a TopK (a sort would split, but is ~100x
  slower on CPU), so under a mesh and logical rules that shard `batch` this maps it by hand.
  """
  mesh = jax.sharding.get_abstract_mesh()
  batch_axes = nn.logical_to_mesh_axes(('batch',))[0]
  if mesh.empty or batch_axes is None:
    return lax.top_k(x, k)
  spec = PartitionSpec(batch_axes)
  return jax.shard_map(lambda rows: lax.top_k(rows, k), mesh=mesh, in_specs=spec,
                       out_specs=spec)(x)


_BEAM_INVARIANT = ("['cross_key']", "['cross_value']")  # cache leaves equal across beams


def _take_beams(x: Array, index: Array) -> Array:
  """x [b, beams, ...], index int [b, m] -> [b, m, ...]: per example, beams `index[i]`."""
  return jax.vmap(lambda rows, i: rows[i])(x, index)


def _reorder_cache(cache: Cache, parents: Array) -> Cache:
  """Beam j of example i takes the cache of its parent beam `parents[i, j]`; the cache's rows
  are [b * k] with the k beams of an example adjacent. A per-example gather (not a global
  one along axis 0) keeps the batch sharding. The encoder's keys and values are the same
  for every beam of an example: they are not copied."""
  num_beams = parents.shape[1]

  def gather(path, x):
    if not jnp.ndim(x) or jax.tree_util.keystr(path[-1:]) in _BEAM_INVARIANT:
      return x
    grouped = x.reshape((-1, num_beams) + x.shape[1:])
    return _take_beams(grouped, parents).reshape(x.shape)

  return jax.tree_util.tree_map_with_path(gather, cache)


def _generated(tokens: Array, lengths: Array, n: int) -> Array:
  """The n tokens after each row's prompt: tokens [..., W] with lengths [b] -> [..., n]."""
  index = lengths.reshape(lengths.shape + (1,) * (tokens.ndim - 1)) + jnp.arange(n)
  return jnp.take_along_axis(tokens, jnp.broadcast_to(index, tokens.shape[:-1] + (n,)), axis=-1)


def _ngram_bans(tokens: Array, step: Array, size: int, vocab_size: int) -> Array:
  """Tokens that would repeat an n-gram already in the row, bool [rows, vocab_size].

  As HF's NoRepeatNGramLogitsProcessor: with `tokens[:, :step + 1]` the sequence so far, a
  token is banned when the last `size - 1` tokens followed by it occur earlier in the row.
  """
  rows, width = tokens.shape
  if size > width:
    return jnp.zeros((rows, vocab_size), bool)
  num_starts = width - size + 1
  # An n-gram starting at s counts once its last token (s + size - 1) is in the sequence.
  match = jnp.broadcast_to(jnp.arange(num_starts) + size - 1 <= step, (rows, num_starts))
  if size > 1:
    last = lax.dynamic_slice_in_dim(tokens, jnp.maximum(step - size + 2, 0), size - 1, axis=1)
    for j in range(size - 1):
      match = match & (tokens[:, j:j + num_starts] == last[:, j:j + 1])
  completing = tokens[:, size - 1:]  # the token after each earlier (size - 1)-gram
  # A per-row scatter (batched, so the SPMD partitioner keeps rows on their devices).
  count = lambda ids, hits: jnp.zeros((vocab_size,), jnp.int32).at[ids].add(hits)
  return jax.vmap(count)(completing, match.astype(jnp.int32)) > 0


# ----------------------------------------------------------------------------------------------
# Greedy and temperature sampling.


class _SampleState(NamedTuple):
  step: Array  # scalar int32; this step feeds position `step`
  tokens: Array  # int32 [rows, W]: prompt, then the generated tokens (0 once a row is done)
  scores: Array  # float32 [rows]: sum of the generated tokens' log-probs
  done: Array  # bool [rows]: ended at EOS or max_decode_length
  cache: Cache


def _filter_logits(logits: Array, config: DecodeConfig) -> Array:
  """Tempered logits with every token outside the top-k and top-p sets at -inf."""
  logits = logits / config.temperature
  vocab_size = logits.shape[-1]
  if 0 < config.top_k < vocab_size:
    kth_best = _top_k(logits, config.top_k)[0][:, -1:]
    logits = jnp.where(logits >= kth_best, logits, -jnp.inf)
  if config.top_p < 1.0:
    probs = jax.nn.softmax(logits)
    descending = -jnp.sort(-probs, axis=-1)
    # Keep a token while the more likely ones hold less than top_p: the smallest set with
    # probability >= top_p (never empty), as HF's TopPLogitsWarper.
    kept = jnp.sum(jnp.cumsum(descending, axis=-1) - descending < config.top_p, axis=-1)
    cutoff = jnp.take_along_axis(descending, kept[:, None] - 1, axis=-1)
    logits = jnp.where(probs >= cutoff, logits, -jnp.inf)
  return logits


def _sample_search(tokens_to_logits: TokensToLogits, cache: Cache, config: DecodeConfig,
                   prefix: Array, lengths: Array, rng: Array) -> tuple[Array, Array]:
  """Greedy or sampled decoding of every row; returns (tokens [rows, n], scores [rows])."""
  rows, prefix_len = prefix.shape
  n = config.max_decode_length
  num_steps = prefix_len - 1 + n  # the longest prompt still generates n tokens
  greedy = config.method == 'greedy' or config.temperature < MIN_TEMPERATURE
  prefix = jnp.pad(prefix, ((0, 0), (0, n)))

  def body(state: _SampleState) -> _SampleState:
    step = state.step
    ids = lax.dynamic_slice_in_dim(state.tokens, step, 1, axis=1)
    logits, cache = tokens_to_logits(ids, state.cache)
    logits = logits.astype(jnp.float32)
    allowed = logits
    if config.no_repeat_ngram_size:
      bans = _ngram_bans(state.tokens, step, config.no_repeat_ngram_size, logits.shape[-1])
      allowed = jnp.where(bans, -jnp.inf, allowed)
    if greedy:
      choice = jnp.argmax(allowed, axis=-1)
    else:
      choice = jax.random.categorical(jax.random.fold_in(rng, step),
                                      _filter_logits(allowed, config))
    choice = choice.astype(jnp.int32)
    log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), choice[:, None], axis=-1)[:, 0]

    index = step + 1 - lengths  # of the token at position step + 1 among the generated
    generating = (index >= 0) & ~state.done
    forced = lax.dynamic_index_in_dim(prefix, step + 1, axis=1, keepdims=False)
    token = jnp.where(index >= 0, choice, forced)
    token = jnp.where(state.done, 0, token)  # so the output is 0 after EOS
    tokens = lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], step + 1, axis=1)
    ended = generating & ((choice == config.eos_id) | (index >= n - 1))
    return _SampleState(step + 1, _shard(tokens),
                        _shard(state.scores + jnp.where(generating, log_prob, 0.0)),
                        _shard(state.done | ended), cache)

  def cond(state: _SampleState) -> Array:
    return (state.step < num_steps) & ~jnp.all(state.done)

  init = _SampleState(jnp.zeros((), jnp.int32), _shard(prefix),
                      _shard(jnp.zeros((rows,), jnp.float32)), _shard(jnp.zeros((rows,), bool)),
                      cache)
  final = lax.while_loop(cond, body, init)
  return _generated(final.tokens, lengths, n), final.scores


# ----------------------------------------------------------------------------------------------
# Beam search.


class _BeamState(NamedTuple):
  """Per example b and beam k; token arrays hold the prompt, then the generated tokens."""

  step: Array  # scalar int32; this step feeds position `step`
  live_log_probs: Array  # float32 [b, k], best first
  live_tokens: Array  # int32 [b, k, W]
  finished_scores: Array  # float32 [b, k], best first; NEG_INF in empty slots
  finished_tokens: Array  # int32 [b, k, W]
  finished: Array  # bool [b, k]: the slot holds a hypothesis that ended at EOS
  done: Array  # bool [b]: reached max_decode_length, or no live beam can improve
  cache: Cache  # rows b * k


def _beam_search(tokens_to_logits: TokensToLogits, cache: Cache, config: DecodeConfig,
                 prefix: Array, lengths: Array) -> tuple[Array, Array]:
  """T5X-style beam search (see the module docstring); returns the best
  `num_return_sequences` beams [b, r, n] and their scores [b, r]."""
  batch_size, prefix_len = prefix.shape
  k, n = config.num_beams, config.max_decode_length
  num_steps = prefix_len - 1 + n
  prefix = jnp.pad(prefix, ((0, 0), (0, n)))
  width = prefix.shape[1]
  max_penalty = brevity_penalty(config.alpha, n)

  def body(state: _BeamState) -> _BeamState:
    step = state.step
    ids = lax.dynamic_slice_in_dim(state.live_tokens, step, 1, axis=2).reshape(-1, 1)
    logits, cache = tokens_to_logits(ids, state.cache)
    vocab_size = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    if config.no_repeat_ngram_size:
      bans = _ngram_bans(state.live_tokens.reshape(-1, width), step,
                         config.no_repeat_ngram_size, vocab_size)
      log_probs = jnp.where(bans, NEG_INF, log_probs)
    log_probs = log_probs.reshape(batch_size, k, vocab_size)

    index = step + 1 - lengths  # of the token at position step + 1 among the generated
    in_prompt = index < 0
    # Inside the prompt only its next token continues, at no cost: beam 0 stays the one
    # live beam, as in T5X.
    forced = lax.dynamic_index_in_dim(prefix, step + 1, axis=1, keepdims=False)
    forcing = jnp.where(jnp.arange(vocab_size) == forced[:, None, None], 0.0, NEG_INF)
    log_probs = jnp.where(in_prompt[:, None, None], forcing, log_probs)

    # The 2k best continuations of all beams, so that k remain live even if k of them end.
    totals = (state.live_log_probs[:, :, None] + log_probs).reshape(batch_size, -1)
    top_log_probs, top_ids = _top_k(totals, 2 * k)
    parents, new_tokens = top_ids // vocab_size, top_ids % vocab_size
    top_tokens = lax.dynamic_update_slice_in_dim(
        _take_beams(state.live_tokens, parents), new_tokens[..., None], step + 1, axis=2)
    ended = ((new_tokens == config.eos_id) & (top_log_probs > NEG_INF / 2)
             & ~in_prompt[:, None])

    # Live: the k best continuations that did not end.
    live_log_probs, alive = _top_k(jnp.where(ended, NEG_INF, top_log_probs), k)
    live_tokens = _take_beams(top_tokens, alive)
    live_parents = jnp.take_along_axis(parents, alive, axis=1)

    # Finished: the k best of the previous finished hypotheses and the ones ending now.
    new_scores = top_log_probs / brevity_penalty(config.alpha, index + 1)[:, None]
    all_scores = jnp.concatenate(
        [state.finished_scores, jnp.where(ended, new_scores, NEG_INF)], axis=1)
    finished_scores, best = _top_k(all_scores, k)
    finished_tokens = _take_beams(
        jnp.concatenate([state.finished_tokens, top_tokens], axis=1), best)
    finished = jnp.take_along_axis(jnp.concatenate([state.finished, ended], axis=1), best, 1)

    # Examples already done keep their beams (and their rows of the cache).
    active = ~state.done
    keep = lambda new, old: _shard(
        jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old))
    live_parents = jnp.where(active[:, None], live_parents, jnp.arange(k))
    live_log_probs = keep(live_log_probs, state.live_log_probs)
    finished_scores = keep(finished_scores, state.finished_scores)
    finished = keep(finished, state.finished)
    # No live beam can end better than its log-prob over the largest brevity penalty
    # (log-probs only fall, the penalty only grows with the length).
    cannot_improve = jnp.all(finished, axis=1) & (
        finished_scores[:, -1] > live_log_probs[:, 0] / max_penalty)
    done = state.done | (index >= n - 1) | cannot_improve
    return _BeamState(step + 1, live_log_probs, keep(live_tokens, state.live_tokens),
                      finished_scores, keep(finished_tokens, state.finished_tokens), finished,
                      _shard(done), _reorder_cache(cache, live_parents))

  def cond(state: _BeamState) -> Array:
    return (state.step < num_steps) & ~jnp.all(state.done)

  beams = lambda x: _shard(jnp.broadcast_to(x[:, None], (batch_size, k) + x.shape[1:]))
  first_beam_only = jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF)  # the k beams start equal
  init = _BeamState(
      step=jnp.zeros((), jnp.int32),
      live_log_probs=_shard(jnp.tile(first_beam_only, (batch_size, 1))),
      live_tokens=beams(prefix),
      finished_scores=_shard(jnp.full((batch_size, k), NEG_INF, jnp.float32)),
      finished_tokens=_shard(jnp.zeros((batch_size, k, width), jnp.int32)),
      finished=_shard(jnp.zeros((batch_size, k), bool)),
      done=_shard(jnp.zeros((batch_size,), bool)),
      cache=expand_batch(cache, k))
  final = lax.while_loop(cond, body, init)

  # The finished hypotheses first, best first; then, in the slots left, the live beams
  # (unfinished at max_decode_length), scored with the full length.
  num_finished = jnp.sum(final.finished, axis=1, keepdims=True)
  slots = jnp.arange(config.num_return_sequences)[None, :]
  pick = jnp.where(slots < num_finished, slots, k + slots - num_finished)
  pool_tokens = jnp.concatenate([final.finished_tokens, final.live_tokens], axis=1)
  pool_scores = jnp.concatenate(
      [final.finished_scores, final.live_log_probs / max_penalty], axis=1)
  tokens = _generated(_take_beams(pool_tokens, pick), lengths, n)
  return tokens, jnp.take_along_axis(pool_scores, pick, axis=1)
