"""What `teach.py grade` asks of each exercise: per question, the student's function, the probe that runs it
(`gptlora/teaching/grading_probes.py`) and how the grader's inputs are drawn.

This file is public, so nothing in it is an input: every number below that could be one is a *salt*.
Each grading run resolves the cases with the teacher's secret key and a fresh nonce
(`exercises/secret_inputs.py`): seeds, sizes, rates and texts are drawn there, in the trusted process,
and the sandbox only sees the result. A table of answers computed from this file misses. The expected
answer of every drawn case is what the master notebook's solution gives through the same probe. The
grader redraws a question whose answers would all be equal, or equal to one of its inputs (an echo or a
constant would then score), and refuses a spec that keeps drawing such cases. Question names and points
come from the master notebook; a question listed here must exist there and every question there must be
listed here (tests/test_grading.py checks both, and runs generic forgers against every question).

Adding an exercise: one entry `"NN_name": {"q1": ask(...), ...}`, at least two cases per question, each
with something drawn (a seed, `integer`, `uniform`, `words`, `ragged`). Input tags (`$randn`,
`$random_config`, ...) are described in grading_probes.build, drawn ones in secret_inputs.
Teacher-only: not part of the student release.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ask:
    function: str
    cases: tuple  # each a dict {"args": [...], "kwargs": {...}} of JSON input descriptions, with salts
    probe: str = "call"
    atol: float = 1e-6
    rtol: float = 1e-5
    fixed_inputs: str = ""  # why the inputs are the question itself and not drawn (a quiz); empty: drawn


def ask(function: str, *cases, probe: str = "call", atol: float = 1e-6, rtol: float = 1e-5,
        fixed_inputs: str = "") -> Ask:
    """A question: ``cases`` are argument lists, or ``(args, kwargs)`` pairs."""
    normalised = tuple({"args": list(c[0]), "kwargs": dict(c[1])} if isinstance(c, tuple) else {"args": list(c)}
                       for c in cases)
    return Ask(function, normalised, probe, atol, rtol, fixed_inputs)


def randn(*shape, seed, scale=1, dtype="float32", **options):
    return {"$randn": list(shape), "seed": seed, "scale": scale, "dtype": dtype, **options}


def config(seed, **overrides):
    return {"$random_config": seed, "overrides": overrides}


def small(**fields):
    return {"$config": {"drop_rate": 0.0, **fields}}


def seed(salt):
    """A seed drawn per run, for a probe or a function that takes one."""
    return {"$seed": salt}


def integer(low, high, salt, step=1):
    """``step * n`` for an integer ``n`` drawn in ``[low, high]``."""
    return {"$int": [low, high], "salt": salt, "step": step}


def uniform(low, high, salt, digits=2):
    return {"$uniform": [low, high], "salt": salt, "digits": digits}


def words(fewest, most, salt):
    """A string of random lowercase words."""
    return {"$words": [fewest, most], "salt": salt}


def ragged(rows, shortest, longest, high, salt):
    """``rows`` lists of integers in ``[0, high)``, each of a drawn length."""
    return {"$ragged": [rows, shortest, longest], "high": high, "salt": salt}


SPEC = {
    "01_gpt_model": {
        "q1": ask("block_parameters", *[[config(seed)] for seed in (101, 102, 103, 104)]),
        "q2": ask("total_parameters", *[[config(seed)] for seed in (111, 112, 113, 114)]),
        "q3": ask("set_dropout_rates", *[[config(salt, n_layers=layers, context_length=12), uniform(0.05, 0.7, 1),
                                          uniform(0.05, 0.7, 2), uniform(0.05, 0.7, 3), seed(salt)]
                                         for salt, layers in [(121, 3), (122, 2)]], probe="dropout_effect"),
        "q4": ask("causal_attention_weights", [randn(2, 6, 6, seed=131)], [randn(3, 1, 4, 4, seed=132)],
                  [randn(1, 9, 9, seed=133, scale=4)]),
    },
    "02_text_generation": {
        "q1": ask("temperature_probabilities", [randn(2, 40, seed=201, scale=2), 0.45], [randn(1, 9, seed=202), 2.5]),
        "q2": ask("sample_counts", ([randn(15, seed=211), uniform(0.5, 1.5, 1)], {"num_samples": 200, "seed": seed(211)}),
                  ([randn(7, seed=212), uniform(1.5, 3.0, 1)], {"num_samples": 150, "seed": seed(12)})),
        "q3": ask("top_k_filter", [randn(3, 25, seed=221), integer(2, 24, 1)], [randn(2, 12, seed=222), integer(3, 11, 1)],
                  [randn(1, 8, seed=223), integer(1, 7, 1)]),  # k below the width: all kept would echo the logits
        "q4": ask("is_deterministic", [0.0, integer(2, 999, 1)], [uniform(0.05, 3, 1, digits=3), integer(2, 60, 2)],
                  [uniform(0.01, 0.2, 1, digits=4), None], [0.0, integer(61, 500, 1)], [uniform(0.5, 2, 1, digits=3), integer(1, 2, 2)],
                  [uniform(0.05, 3, 1, digits=3), integer(1, 3, 2)]),
    },
    "03_pretraining": {
        "q1": ask("window_pairs", *[[{"$randint": [n], "high": 50257, "seed": 300 + n, "as_list": True}, m, s]
                                    for n, m, s in [(60, 6, 2), (33, 8, 8), (20, 19, 3), (41, 3, 1)]]),
        "q2": ask("lm_loss", [randn(3, 4, 9, seed=311), {"$randint": [3, 4], "high": 9, "seed": 312}],
                  [randn(1, 7, 5, seed=313), {"$randint": [1, 7], "high": 5, "seed": 314}]),
        "q3": ask("perplexity_of", [{"$rand": [4, 5], "low": 0.01, "seed": 321, "dtype": "float64"}],
                  [{"$rand": [300], "low": 1e-4, "high": 1e-3, "seed": 322}]),
        "q4": ask("resume_training", *[[small(vocab_size=35, context_length=6, emb_dim=12, n_heads=2, n_layers=2),
                                        seed(salt), uniform(1e-3, 8e-3, 1, digits=4), before, after]
                                       for salt, before, after in [(331, 2, 2), (332, 1, 2)]],
                  probe="resumed_training"),  # not bitwise: thread counts may differ
    },
    "04_pretrained_gpt2": {
        "q1": ask("split_c_attn", [randn(20, 60, seed=401), randn(60, seed=402)], [randn(6, 18, seed=403), randn(18, seed=404)],
                  probe="call", atol=0, rtol=0),
        "q2": ask("conv1d_to_linear", [randn(6, 4, seed=411), randn(4, seed=412), randn(3, 6, seed=413)],
                  [randn(3, 8, seed=414), randn(8, seed=415), randn(2, 5, 3, seed=416)], probe="linear_outputs"),
        "q3": ask("head_is_tied", *[[small(vocab_size=30, context_length=8, emb_dim=8, n_heads=2, n_layers=1, qkv_bias=True),
                                     seed(salt)] for salt in (431, 432)], probe="head_tied_answers"),
        "q4": ask("checkpoint_numbers", *[[config(seed, qkv_bias=True)] for seed in (441, 442, 443)]),
    },
    "05_spam_dataset": {
        "q1": ask("split_sizes", [integer(10, 999, 1)], [integer(1000, 9999, 1)], [integer(10000, 99999, 1)],
                  [integer(100000, 999999, 1)]),
        "q2": ask("padding_share", [{"$randint": [30], "low": 1, "high": 90, "seed": 521, "as_list": True}, 24],
                  [{"$randint": [7], "low": 1, "high": 20, "seed": 522, "as_list": True}, 64]),
        "q3": ask("dynamic_padding_tokens", [{"$randint": [13], "low": 1, "high": 50, "seed": 531, "as_list": True}, 4],
                  [{"$randint": [9], "low": 1, "high": 70, "seed": 532, "as_list": True}, 9]),
        "q4": ask("last_real_positions", [{"$padded": [6, 10], "pad_id": 50256, "seed": 541}, 50256],
                  [{"$padded": [3, 5], "pad_id": 7, "seed": 542}, 7]),
    },
    "06_classification_finetuning": {
        "q1": ask("trainable_parameters", *[[config(seed), method] for seed in (601, 602)
                                            for method in ("full", "last-block")]),
        "q2": ask("classification_loss", [randn(5, 7, 3, seed=611), {"$randint": [5], "high": 3, "seed": 612}],
                  [randn(2, 1, 4, seed=613), {"$randint": [2], "high": 4, "seed": 614}]),
        "q3": ask("receptive_field", [integer(4, 8, 1), integer(2, 4, 2), seed(621)],
                  [integer(5, 9, 1), integer(1, 5, 2), seed(622)], probe="receptive_fields"),
        "q4": ask("accuracy", [20, 9, 3, seed(631)], [6, 4, 2, seed(632)], probe="accuracy_by_row"),
    },
    "07_lora_finetuning": {
        "q1": ask("lora_update", [randn(3, 6, seed=701), randn(6, 2, seed=702), randn(2, 5, seed=703), 8],
                  [randn(2, 2, 4, seed=704), randn(4, 3, seed=705), randn(3, 4, seed=706), 1.5]),
        "q2": ask("lora_parameter_count", *[[config(seed), rank, classes] for seed, rank, classes
                                            in [(711, 3, 2), (712, 6, 4), (713, 1, 2)]]),
        "q3": ask("query_value_share", [config(721), 2], [config(722), 5]),
        "q4": ask("merge_lora_weight", [randn(4, 7, seed=731), randn(7, 3, seed=732), randn(3, 4, seed=733), 0.75],
                  [randn(9, 9, seed=734), randn(9, 2, seed=735), randn(2, 9, seed=736), 4.0], atol=1e-5),
    },
    "08_lora_anatomy": {
        "q1": ask("update_rank", [11, 8, 5, integer(1, 5, 1), seed(801)], [7, 10, 4, integer(1, 4, 1), seed(802)],
                  probe="update_ranks"),
        "q2": ask("approximation_error", [randn(11, 6, seed=811, dtype="float64"), integer(1, 5, 1)],
                  [randn(8, 8, seed=812, dtype="float64"), integer(1, 7, 1)], atol=1e-9),
        "q3": ask("amplification", *[[{"$low_rank": [m, n, r], "seed": seed, "dtype": "float64"},
                                      randn(m, n, seed=seed + 1, dtype="float64"), r]
                                     for m, n, r, seed in [(10, 14, 2, 821), (6, 6, 1, 823)]]),
        "q4": ask("break_even_rank", [integer(100, 4000, 1), integer(100, 4000, 2)], [integer(2, 200, 1), integer(2, 200, 2)],
                  [integer(10, 999, 1), integer(1, 3, 2)], [integer(1, 100, 1), integer(1, 100, 2)]),
    },
    "09_peft_methods": {
        "q1": ask("virtual_token_parameters", *[[config(seed, context_length=32), n, method, hidden]
                                                for seed, n, method, hidden in [(901, 4, "prompt-tuning", None),
                                                                                (902, 2, "prefix-tuning", None),
                                                                                (903, 3, "prefix-tuning", 5)]]),
        "q2": ask("prompt_tuned_input", [config(911, context_length=20), 2, [2, 5], seed(911)],
                  [config(912, context_length=20), 5, [1, 3], seed(912)], probe="prompt_tuned_inputs"),
        "q3": ask("tutorial_lora_parameters", [integer(1, 16, 1), integer(8, 512, 2)], [integer(1, 16, 1), integer(8, 512, 2)],
                  [integer(1, 4096, 1)]),
        "q4": ask("route_rows", [6, 4, randn(3, 6, seed=931), ["b", "__base__", "a"], seed(931)],
                  [6, 4, randn(4, 2, 6, seed=932), ["a", "z", "b", "b"], seed(932)], probe="routed_rows"),
    },
    "10_qlora": {
        "q1": ask("nf4_block", [randn(32, seed=1001, scale=0.05)], [{"$rand": [48], "low": -0.2, "high": 0.7, "seed": 1002}],
                  probe="call_as_tensors"),
        "q2": ask("pack_codes", *[[{"$randint": [n], "high": 16, "seed": 1010 + n, "dtype": "uint8"}] for n in (3, 10, 17)],
                  probe="call_as_tensor", atol=0, rtol=0),
        "q3": ask("int8_per_row", [randn(5, 9, seed=1021, scale=3)], [randn(3, 4, seed=1022, zero_rows=[1])],
                  probe="tensors_and_dtypes"),
        "q4": ask("base_bytes", *[([small(vocab_size=integer(40, 400, salt), context_length=integer(4, 32, salt),
                                          emb_dim=integer(1, 8, salt, step=32), n_heads=h, n_layers=integer(1, 4, salt),
                                          qkv_bias=b), method], {"double_quant": dq})
                                  for salt, h, b in [(1041, 2, True), (1042, 4, False)]
                                  for method, dq in [(None, False), ("int8", False), ("nf4", False), ("nf4", True)]]),
    },
    "11_instruction_finetuning": {
        "q1": ask("prompt", *[[{"instruction": words(3, 9, salt), "input": text, "output": words(1, 4, salt + 1)}]
                              for salt, text in [(1101, ""), (1103, words(2, 6, 1)), (1105, words(1, 3, 2))]]),
        "q2": ask("pad_and_shift", [ragged(2, 1, 4, 50000, 1)], [ragged(3, 1, 6, 50000, 2)], [ragged(1, 2, 5, 50000, 3)],
                  probe="call_as_tensors", atol=0, rtol=0),
        "q3": ask("response_loss", [randn(2, 6, 40, seed=1131), {"$tensor": [[1, 2, 3, 4, 39, -100], [5, 6, 7, -100, -100, -100]],
                                                                 "dtype": "int64"}, [3, 2]],
                  [randn(3, 4, 40, seed=1132, scale=3), {"$tensor": [[8, 9, 10, 11], [12, -100, -100, -100], [13, 14, -100, -100]],
                                                          "dtype": "int64"}, [2, 1, 1]], atol=1e-5),
        "q4": ask("training_state_bytes", *[[small(vocab_size=61, context_length=6, emb_dim=integer(2, 5, salt, step=8), n_heads=2,
                                                   n_layers=integer(1, 2, salt), qkv_bias=bias), rank, seed(salt)]
                                            for bias, rank, salt in [(True, 0, 1141), (True, integer(1, 6, 1), 1142),
                                                                     (False, integer(1, 6, 1), 1143)]],
                  probe="training_state_bytes", atol=0, rtol=0),
        "q5": ask("random_base_shows", *[[claim] for claim in (
            "the training loss falls as the model learns the prompt format",
            "the answers to the test split follow the instructions",
            "LoRA needs less memory for gradients and optimizer state than full fine-tuning",
            "a judge model scores the answers around 50 out of 100, as in the book")],
                  fixed_inputs="a quiz: the claims are the question, and knowing their answers is answering it"),
    },
    "12_preference_tuning": {
        "q1": ask("answer_mask", *[[{"$randint": [rows], "low": 1, "high": width + 1, "seed": salt, "as_list": True},
                                    {"$randint": [rows], "low": 0, "high": width, "seed": salt + 1, "as_list": True}, width]
                                   for rows, width, salt in [(3, 11, 1201), (1, 6, 1203), (4, 12, 1205)]],
                  probe="call_as_tensor", atol=0, rtol=0),
        "q2": ask("answer_logprobs", *[[randn(rows, width, vocab, seed=seed, scale=2),
                                        {"$randint": [rows, width], "high": vocab, "seed": seed + 1},
                                        {"$tensor": mask, "dtype": "bool"}]
                                       for rows, width, vocab, seed, mask in [
                                           (2, 7, 23, 1211, [[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]]),
                                           (3, 5, 11, 1213, [[0, 1, 1, 0, 0], [0, 0, 0, 1, 0], [1, 1, 1, 1, 1]])]],
                  probe="call_as_tensor", atol=1e-5),
        "q3": ask("dpo_loss_value", *[[randn(rows, seed=seed, scale=3), randn(rows, seed=seed + 1, scale=3),
                                       randn(rows, seed=seed + 2, scale=3), randn(rows, seed=seed + 3, scale=3), beta]
                                      for rows, seed, beta in [(4, 1311, 0.1), (7, 1321, 0.3), (1, 1331, 2.0)]],
                  probe="call_as_tensor", atol=1e-6),
        "q4": ask("reward_margin", *[[randn(rows, seed=seed, scale=2), randn(rows, seed=seed + 1, scale=2),
                                      randn(rows, seed=seed + 2, scale=2), randn(rows, seed=seed + 3, scale=2)]
                                     for rows, seed in [(5, 1411), (2, 1421)]],
                  probe="call_as_tensor", atol=1e-6),
        "q5": ask("reference_logits", *[[small(vocab_size=61, context_length=9, emb_dim=emb, n_heads=2, n_layers=layers),
                                           rank, 9, seed(salt)]
                                          for emb, layers, rank, salt in [(16, 1, 2, 1511), (24, 2, 3, 1512)]],
                  probe="reference_answers", atol=1e-5),
    },
}
