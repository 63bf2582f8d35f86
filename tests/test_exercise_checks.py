"""The checking helpers of the exercise notebooks: what a student reads when an answer is wrong."""

import pytest
import torch

from gptlora.exercise_checks import ExerciseCheckFailed, answered, call, expect, random_gpt_config


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
