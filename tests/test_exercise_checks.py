"""The checking helpers of the exercise notebooks: what a student reads when an answer is wrong."""

import pytest
import torch

from gptlora.teaching.exercise_checks import (ExerciseCheckFailed, answered, batch_read_at_one_position, call, expect,
                                     random_gpt_config, reference_attention_weights, sampling_probabilities)


def test_expect_names_the_mistake_whose_value_was_found():
    mistakes = {"the biases are missing": 8, "one layer is missing": 5}
    expect("parameters", 10, 10, mistakes)
    with pytest.raises(ExerciseCheckFailed, match=r"^parameters: expected 10, found 8\. Likely mistake: the biases are missing\.$"):
        expect("parameters", 8, 10, mistakes)
    with pytest.raises(ExerciseCheckFailed, match=r"^parameters: expected 10, found 7\. Count again\.$"):
        expect("parameters", 7, 10, mistakes, hint="Count again.")


def test_expect_compares_tensors_by_shape_then_values():
    expected = torch.ones(2, 3)
    expect("weights", expected + 1e-8, expected)
    with pytest.raises(ExerciseCheckFailed, match=r"expected shape \[2, 3\], found shape \[3, 2\]\. Likely mistake: transposed\."):
        expect("weights", expected.T, expected, {"transposed": expected.T})
    with pytest.raises(ExerciseCheckFailed, match=r"values differ from the expected ones by up to 1"):
        expect("weights", expected * 2, expected)
    with pytest.raises(ExerciseCheckFailed, match=r"expected a tensor of shape \[2, 3\], found 3"):
        expect("weights", 3, expected)


def test_expect_compares_nested_answers_and_never_confuses_bools_with_numbers():
    expect("pair", (1, [2.0, torch.tensor(3.0)]), (1, [2.0, 3.0]))
    with pytest.raises(ExerciseCheckFailed):
        expect("flag", 1, True)


def test_placeholders_and_broken_functions_are_explained():
    with pytest.raises(ExerciseCheckFailed, match=r"`x` is still `...`"):
        answered("x", ...)
    with pytest.raises(ExerciseCheckFailed, match=r"`f` returned None: write its body"):
        call("f", lambda: None)
    with pytest.raises(ExerciseCheckFailed, match=r"`f\(2\)` raised ZeroDivisionError: division by zero"):
        call("f", lambda n: n / 0, 2)
    with pytest.raises(ExerciseCheckFailed, match=r"`f` should be a function, found 3"):
        call("f", 3)
    assert call("f", lambda n: n + 1, 2) == 3


def test_random_configs_differ_by_seed_and_are_valid():
    configs = {repr(random_gpt_config(seed)) for seed in range(10)}
    assert len(configs) == 10
    assert random_gpt_config(3, qkv_bias=True).qkv_bias is True


def test_nan_entries_are_named_rather_than_a_nan_difference():
    expected = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    found = torch.tensor([[float("nan"), float("nan")], [0.5, 0.5]])
    with pytest.raises(ExerciseCheckFailed, match=r"values hold 2 NaN entries more than expected"):
        expect("weights", found, expected)


def test_nested_answers_name_the_first_item_that_differs():
    expected = ((torch.zeros(2), torch.ones(1)), (torch.ones(2), torch.ones(1)))
    found = ((torch.zeros(2), torch.ones(1)), (torch.ones(2), torch.zeros(1)))
    with pytest.raises(ExerciseCheckFailed, match=r"^pairs, item 1, item 1: values differ .* by up to 1 \(expected a torch.float32 "
                                                  r"tensor of shape \[1\] starting \[1, \.\.\.\]"):
        expect("pairs", found, expected)


def test_counts_are_compared_exactly():
    """A relative tolerance would pass gpt2-small without its final LayerNorm (off by 1,536 in 163 million)."""
    expect("parameters", 163_009_536, 163_009_536)
    expect("parameters", torch.tensor(163_009_536), 163_009_536)
    with pytest.raises(ExerciseCheckFailed, match=r"expected 163,009,536, found 163,008,000\. Likely mistake: no final norm\."):
        expect("parameters", 163_008_000, 163_009_536, {"no final norm": 163_009_536 - 1536})
    with pytest.raises(ExerciseCheckFailed):
        expect("parameters", 124_441_344, 124_441_346)
    expect("share", 0.1 + 0.2, 0.3)  # floats keep their tolerance


def test_sampling_probabilities_are_those_next_token_samples_from():
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sampling_probabilities(logits, 0.5), torch.softmax(logits / 0.5, dim=-1))
    top3 = sampling_probabilities(logits, 1.0, top_k=3)
    assert (top3 > 0).sum(dim=-1).tolist() == [3, 3, 3]
    assert torch.equal(top3 > 0, logits >= logits.topk(3).values[:, -1:])
    with pytest.raises(ValueError, match="greedy"):
        sampling_probabilities(logits, 0.0)


def test_reference_attention_weights_are_the_causal_softmax():
    scores = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    weights = reference_attention_weights(scores)
    assert weights.shape == scores.shape and torch.allclose(weights.sum(dim=-1), torch.ones(2, 3, 5))
    assert (weights.triu(diagonal=1) == 0).all() and (weights.diagonal(dim1=-2, dim2=-1) > 0).all()
    past = torch.ones(5, 5, dtype=torch.bool).tril()
    assert torch.allclose(weights, torch.softmax(scores.masked_fill(~past, float("-inf")), dim=-1), atol=1e-6)


@pytest.mark.parametrize("seed, shapes", [(4, [(16, 9, 2)]), (9, [(40, 12, 3), (7, 5, 2)])])
def test_classification_batches_tell_each_wrong_reading_apart(seed, shapes):
    """The batches of 06 q4 (public: seed 4; hidden: seed 9): reading the last, first or next position,
    or one class for every row, each marks a different set of rows as right, so a check row by row
    catches each of them and can name it."""
    generator = torch.Generator().manual_seed(seed)
    for batch, time, classes in shapes:
        logits, labels, lengths = batch_read_at_one_position(generator, batch, time, classes)
        assert (lengths < time).all() and (lengths >= 1).all()
        rows = torch.arange(batch)
        readings = {"right": logits[rows, lengths - 1].argmax(-1), "last": logits[:, -1].argmax(-1),
                    "first": logits[:, 0].argmax(-1), "next": logits[rows, lengths].argmax(-1),
                    **{f"always {c}": torch.full((batch,), c) for c in range(classes)}}
        right_rows = {name: tuple((predicted == labels).tolist()) for name, predicted in readings.items()}
        assert len(set(right_rows.values())) == len(right_rows), right_rows
        assert 0 < sum(right_rows["right"]) < batch
