"""Target log-likelihoods, packing, per-task loss and rank classification on models with known preferences."""

import math

import numpy as np
import pytest
from eval_fakes import BOS, EOS, BigramModel, CharTokenizer, bigram_log_likelihood

from flan_jax.eval import scoring

TOK = CharTokenizer()


def _ids(text):
    return TOK.encode(text)


def test_score_targets_matches_hand_computed_log_likelihoods_whatever_the_packing():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(TOK.vocab_size, TOK.vocab_size)) * 3
    model = BigramModel(table)
    texts = [("what is 2+2?", "4"), ("name a colour", "blue"), ("x", "a much longer answer than the rest")]
    sequences = [(scoring.encode_prompt(TOK, p), scoring.encode_target(TOK, t)) for p, t in texts] * 3
    expected = [bigram_log_likelihood(table, p, t) for p, t in sequences]
    # Many sequences per row and few rows per batch, or one long row per sequence: same numbers.
    for max_len, batch_rows in [(64, 1), (64, 16), (200, 2)]:
        scores = scoring.score_targets(model, sequences, max_len=max_len, batch_rows=batch_rows)
        assert [s.log_likelihood for s in scores] == pytest.approx(expected, rel=1e-5)
        assert [s.num_tokens for s in scores] == [len(t) for _, t in sequences]
        assert not any(s.truncated for s in scores)


def test_score_targets_cuts_the_middle_of_the_prompt_first():
    table = np.random.default_rng(1).normal(size=(TOK.vocab_size, TOK.vocab_size))
    prompt = [BOS, *_ids("abcdefghij")]
    target = [*_ids("xyz"), EOS]
    (score,) = scoring.score_targets(BigramModel(table), [(prompt, target)], max_len=8)
    assert score.truncated and score.num_tokens == 4
    # 8 inputs: BOS + first 2 and last 2 prompt characters + 3 target tokens (the last is only predicted).
    kept = [BOS, *_ids("abij")]
    assert scoring.cut_prompt(prompt, 5) == kept
    assert score.log_likelihood == pytest.approx(bigram_log_likelihood(table, kept, target), rel=1e-5)


def _preference_table():
    """After 'x' the model is sure of 'y'; after 'y' it repeats 'y' and rarely stops; after 'z' it stops."""
    table = np.zeros((TOK.vocab_size, TOK.vocab_size))
    x, y, z = _ids("xyz")
    table[x, y] = 10.0
    table[y, y] = 10.0
    table[z, EOS] = 10.0
    return table


def test_rank_classification_picks_the_option_the_model_prefers():
    model = BigramModel(_preference_table())
    examples = [
        {"inputs": "x", "options": ["a", "y", "b"], "task": "t"},  # y is certain after x
        {"inputs": "q", "options": ["az", "a"], "task": "t"},  # after 'q' all uniform; 'z' then stops
    ]
    results = scoring.rank_classify(model, TOK, examples, max_len=32)
    assert [r.choice for r in results] == [1, 1]
    table = _preference_table()
    for example, result in zip(examples, results):
        expected = [
            bigram_log_likelihood(table, scoring.encode_prompt(TOK, example["inputs"]), scoring.encode_target(TOK, o))
            for o in example["options"]
        ]
        assert list(result.scores) == pytest.approx(expected, rel=1e-5)


def test_length_normalization_changes_the_choice_as_designed():
    # "z": uniform first token (~ -log 48), then a near-certain EOS: sum ~ -3.9, mean ~ -1.9.
    # "yyyyy": five near-certain tokens, then an unlikely EOS after 'y' (~ -10): sum ~ -10, mean ~ -1.7.
    model = BigramModel(_preference_table())
    example = [{"inputs": "x", "options": ["z", "yyyyy"], "task": "t"}]
    (by_sum,) = scoring.rank_classify(model, TOK, example, max_len=32)
    (by_mean,) = scoring.rank_classify(model, TOK, example, max_len=32, length_normalized=True)
    assert by_sum.choice == 0 and by_mean.choice == 1
    assert by_mean.scores[1] == pytest.approx(by_sum.scores[1] / 6, rel=1e-6)


def test_rank_classification_needs_options():
    with pytest.raises(ValueError, match="example 0 of task 'my_task'.*options"):
        scoring.rank_classify(BigramModel(_preference_table()), TOK, [{"inputs": "x", "options": [], "task": "my_task"}], max_len=8)


def test_target_loss_is_the_token_weighted_mean():
    table = np.random.default_rng(2).normal(size=(TOK.vocab_size, TOK.vocab_size))
    examples = [{"inputs": "ab", "targets": "c"}, {"inputs": "d", "targets": "efgh"}]
    result = scoring.target_loss(BigramModel(table), TOK, examples, max_len=32)
    total = sum(
        bigram_log_likelihood(table, scoring.encode_prompt(TOK, e["inputs"]), scoring.encode_target(TOK, e["targets"]))
        for e in examples
    )
    tokens = 2 + 5  # targets plus EOS
    assert result["loss"] == pytest.approx(-total / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(-total / tokens), rel=1e-5)


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_packed_scoring_of_the_real_transformer_equals_one_sequence_at_a_time(prefix_lm):
    """Packing many sequences per row must not let them see each other (segment_ids, positions)."""
    from flax import nnx

    from flan_jax import model as fm

    cfg = fm.ModelConfig.for_family(
        "llama", vocab_size=TOK.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48,
        max_positions=128,
    )
    model = fm.Transformer(cfg, rngs=nnx.Rngs(0))
    # Model-input lengths 14, 18, 17, 5 in rows of 32: two rows holding two sequences each.
    texts = [("what is 2+2?", "4"), ("name a colour", "blue"), ("x", "a longer answer"), ("abc", "d")]
    sequences = [(scoring.encode_prompt(TOK, p), scoring.encode_target(TOK, t)) for p, t in texts]
    packed = scoring.score_targets(model, sequences, max_len=64, batch_rows=4, prefix_lm=prefix_lm)
    alone = [scoring.score_targets(model, [s], max_len=64, prefix_lm=prefix_lm)[0] for s in sequences]
    assert [s.log_likelihood for s in packed] == pytest.approx([s.log_likelihood for s in alone], rel=1e-4, abs=1e-4)


def test_packing_places_every_sequence_without_overlap_and_fills_rows():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 33, size=500).tolist()
    rows, offsets = scoring._pack(lengths, 32)
    taken = set()
    for n, r, o in zip(lengths, rows, offsets):
        assert 0 <= o and o + n <= 32
        cells = {(r, t) for t in range(o, o + n)}
        assert not cells & taken
        taken |= cells
    # Best-fit-decreasing wastes little: within 2% of the lower bound on the number of rows.
    assert max(rows) + 1 <= 1.02 * sum(lengths) / 32 + 1
