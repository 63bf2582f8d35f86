"""What `teach.py grade` asks of each exercise: per question, the student's function, the probe that runs it
(`gptlora/teaching/grading_probes.py`) and the grader's own inputs (other seeds and shapes than the
notebook's public and hidden checks).

The expected answer of every input is what the master notebook's solution gives through the same probe,
computed in the trusted process (the existing otter tests check those solutions against gptlora's own
functions). Question names and points come from the master notebook; a question listed here must exist
there and every question there must be listed here (tests/test_grading.py checks both).

Adding an exercise: one entry `"NN_name": {"q1": ask(...), ...}`. Input tags (`$randn`, `$random_config`,
...) are described in grading_probes.build. Teacher-only: not part of the student release.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ask:
    function: str
    cases: tuple  # each a dict {"args": [...], "kwargs": {...}} of JSON input descriptions
    probe: str = "call"
    atol: float = 1e-6
    rtol: float = 1e-5


def ask(function: str, *cases, probe: str = "call", atol: float = 1e-6, rtol: float = 1e-5) -> Ask:
    """A question: ``cases`` are argument lists, or ``(args, kwargs)`` pairs."""
    normalised = tuple({"args": list(c[0]), "kwargs": dict(c[1])} if isinstance(c, tuple) else {"args": list(c)}
                       for c in cases)
    return Ask(function, normalised, probe, atol, rtol)


def randn(*shape, seed, scale=1, dtype="float32"):
    return {"$randn": list(shape), "seed": seed, "scale": scale, "dtype": dtype}


def config(seed, **overrides):
    return {"$random_config": seed, "overrides": overrides}


def small(**fields):
    return {"$config": {"drop_rate": 0.0, **fields}}


SPEC = {
    "01_gpt_model": {
        "q1": ask("block_parameters", *[[config(seed)] for seed in (101, 102, 103, 104)]),
        "q2": ask("total_parameters", *[[config(seed)] for seed in (111, 112, 113, 114)]),
        "q3": ask("set_dropout_rates", [config(121, n_layers=3), 0.15, 0.35, 0.05],
                  [config(122, n_layers=2), 0.0, 0.6, 0.45], probe="dropout_rates"),
        "q4": ask("causal_attention_weights", [randn(2, 6, 6, seed=131)], [randn(3, 1, 4, 4, seed=132)],
                  [randn(1, 9, 9, seed=133, scale=4)]),
    },
    "02_text_generation": {
        "q1": ask("temperature_probabilities", [randn(2, 40, seed=201, scale=2), 0.45], [randn(1, 9, seed=202), 2.5]),
        "q2": ask("sample_counts", ([randn(15, seed=211), 0.8], {"num_samples": 200, "seed": 211}),
                  ([randn(7, seed=212), 2.0], {"num_samples": 150, "seed": 12})),
        "q3": ask("top_k_filter", [randn(3, 25, seed=221), 2], [randn(2, 12, seed=222), 12], [randn(1, 8, seed=223), 1]),
        "q4": ask("is_deterministic", [0.0, 3], [3.0, 1], [0.01, None], [1.2, 4], [0.0, None], [0.9, 1]),
    },
    "03_pretraining": {
        "q1": ask("window_pairs", *[[{"$randint": [n], "high": 50257, "seed": 300 + n, "as_list": True}, m, s]
                                    for n, m, s in [(60, 6, 2), (33, 8, 8), (20, 19, 3), (41, 3, 1)]]),
        "q2": ask("lm_loss", [randn(3, 4, 9, seed=311), {"$randint": [3, 4], "high": 9, "seed": 312}],
                  [randn(1, 7, 5, seed=313), {"$randint": [1, 7], "high": 5, "seed": 314}]),
        "q3": ask("perplexity_of", [{"$rand": [4, 5], "low": 0.01, "seed": 321, "dtype": "float64"}],
                  [{"$rand": [300], "low": 1e-4, "high": 1e-3, "seed": 322}]),
        "q4": ask("resume_training", [small(vocab_size=35, context_length=6, emb_dim=12, n_heads=2, n_layers=2),
                                      331, 4e-3, 2, 2], probe="resumed_training"),  # not bitwise: thread counts may differ
    },
    "04_pretrained_gpt2": {
        "q1": ask("split_c_attn", [randn(20, 60, seed=401), randn(60, seed=402)], [randn(6, 18, seed=403), randn(18, seed=404)],
                  probe="call", atol=0, rtol=0),
        "q2": ask("conv1d_to_linear", [randn(6, 4, seed=411), randn(4, seed=412), randn(3, 6, seed=413)],
                  [randn(3, 8, seed=414), randn(8, seed=415), randn(2, 5, 3, seed=416)], probe="linear_outputs"),
        "q3": ask("head_is_tied", [small(vocab_size=30, context_length=8, emb_dim=8, n_heads=2, n_layers=1, qkv_bias=True)],
                  probe="head_tied_answers"),
        "q4": ask("checkpoint_numbers", *[[config(seed, qkv_bias=True)] for seed in (441, 442, 443)]),
    },
    "05_spam_dataset": {
        "q1": ask("split_sizes", [18], [100], [777], [2001]),
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
        "q3": ask("receptive_field", [6, 3, 621], probe="receptive_fields"),
        "q4": ask("accuracy", [20, 9, 3, 631], [6, 4, 2, 632], probe="accuracy_by_row"),
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
        "q1": ask("update_rank", [11, 8, 5, 2, 801], [7, 10, 4, 3, 802], probe="update_ranks"),
        "q2": ask("approximation_error", [randn(11, 6, seed=811, dtype="float64"), 2],
                  [randn(8, 8, seed=812, dtype="float64"), 8], atol=1e-9),
        "q3": ask("amplification", *[[{"$low_rank": [m, n, r], "seed": seed, "dtype": "float64"},
                                      randn(m, n, seed=seed + 1, dtype="float64"), r]
                                     for m, n, r, seed in [(10, 14, 2, 821), (6, 6, 1, 823)]]),
        "q4": ask("break_even_rank", [512, 2048], [3, 3], [2, 9], [64, 1], [1, 1]),
    },
    "09_peft_methods": {
        "q1": ask("virtual_token_parameters", *[[config(seed, context_length=32), n, method, hidden]
                                                for seed, n, method, hidden in [(901, 4, "prompt-tuning", None),
                                                                                (902, 2, "prefix-tuning", None),
                                                                                (903, 3, "prefix-tuning", 5)]]),
        "q2": ask("prompt_tuned_input", [config(911, context_length=20), 2, [2, 5], 911],
                  [config(912, context_length=20), 5, [1, 3], 912], probe="prompt_tuned_inputs"),
        "q3": ask("tutorial_lora_parameters", [2, 40], [6, 128], [3]),
        "q4": ask("route_rows", [6, 4, randn(3, 6, seed=931), ["b", "__base__", "a"], 931],
                  [6, 4, randn(4, 2, 6, seed=932), ["a", "z", "b", "b"], 932], probe="routed_rows"),
    },
    "10_qlora": {
        "q1": ask("nf4_block", [randn(32, seed=1001, scale=0.05)], [{"$rand": [48], "low": -0.2, "high": 0.7, "seed": 1002}],
                  probe="call_as_tensors"),
        "q2": ask("pack_codes", *[[{"$randint": [n], "high": 16, "seed": 1010 + n, "dtype": "uint8"}] for n in (3, 10, 17)],
                  probe="call_as_tensor", atol=0, rtol=0),
        "q3": ask("int8_per_row", [randn(5, 9, seed=1021, scale=3)], [{"$tensor": [[0.0, 0.0], [1.0, -2.0]]}],
                  probe="tensors_and_dtypes"),
        "q4": ask("base_bytes", *[([small(vocab_size=53, context_length=10, emb_dim=d, n_heads=h, n_layers=n, qkv_bias=b),
                                    method], {"double_quant": dq})
                                  for d, h, n, b in [(128, 2, 2, True), (256, 4, 1, False)]
                                  for method, dq in [(None, False), ("int8", False), ("nf4", False), ("nf4", True)]]),
    },
    "11_instruction_finetuning": {
        "q1": ask("prompt", [{"instruction": "Name the capital of Peru.", "input": "", "output": "Lima."}],
                  [{"instruction": "Add the numbers.", "input": "7 and 5", "output": "12"}],
                  [{"instruction": "Fix the grammar:\nshe go home", "input": "she go home", "output": "She goes home."}]),
        "q2": ask("pad_and_shift", [[[11, 12, 13], [14]]], [[[1], [2, 3], [4, 5, 6, 7, 8]]], [[[9, 9, 9, 9]]],
                  probe="call_as_tensors", atol=0, rtol=0),
        "q3": ask("response_loss", [randn(2, 6, 40, seed=1131), {"$tensor": [[1, 2, 3, 4, 39, -100], [5, 6, 7, -100, -100, -100]],
                                                                 "dtype": "int64"}, [3, 2]],
                  [randn(3, 4, 40, seed=1132, scale=3), {"$tensor": [[8, 9, 10, 11], [12, -100, -100, -100], [13, 14, -100, -100]],
                                                          "dtype": "int64"}, [2, 1, 1]], atol=1e-5),
        "q4": ask("training_state_bytes", *[[small(vocab_size=61, context_length=6, emb_dim=emb, n_heads=2, n_layers=layers,
                                                   qkv_bias=bias), rank, seed]
                                            for emb, layers, bias, rank, seed in [(24, 2, True, 0, 1141), (24, 2, True, 3, 1142),
                                                                                  (40, 1, False, 5, 1143)]],
                  probe="training_state_bytes", atol=0, rtol=0),
        "q5": ask("random_base_shows", *[[claim] for claim in (
            "the training loss falls as the model learns the prompt format",
            "the answers to the test split follow the instructions",
            "LoRA needs less memory for gradients and optimizer state than full fine-tuning",
            "a judge model scores the answers around 50 out of 100, as in the book")]),
    },
    "12_preference_tuning": {
        "q1": ask("answer_mask", [[6, 9, 2], [4, 1, 1], 11], [[5], [5], 6], [[12, 3, 7, 7], [2, 2, 0, 6], 12],
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
                                           rank, 9, seed]
                                          for emb, layers, rank, seed in [(16, 1, 2, 1511), (24, 2, 3, 1512)]],
                  probe="reference_answers", atol=1e-5),
    },
}
