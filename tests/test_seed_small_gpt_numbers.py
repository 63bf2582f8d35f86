"""The seed small-GPT chapter's numbers: 13,698,976 parameters, LoRA trains 16,384, a 14-token soft prompt 1,792.

The chapter describes "a GPT-like model with d_model 128, 2 heads of width 128, 2 layers, vocabulary
52,000, context 50, no bias in the projections". Built from those shapes (on the meta device: counting
needs no numbers), the readings compare as follows:

- The GPT-2 shape (pre-norm blocks with two LayerNorms each, a final LayerNorm, 50 learned positions,
  an untied output layer with a bias, no bias in the attention or MLP projections) has 13,699,360:
  384 (three 128-vectors) more than the chapter prints.
- The chapter's 13,698,976 comes out exactly for the Keras "miniature GPT" block layout (post-norm:
  two LayerNorms per block, no final norm, heads of width d_model as Keras's ``key_dim``), with the
  output layer untied with a bias, no bias in attention or MLP, and 49 learned positions: the model
  reads the first 49 tokens of a 50-token window and predicts the next 49. We found no reading with
  50 position rows that gives the number without an unusual choice (one norm per block, or biases on
  one MLP layer only), so that is the reading stated here; the report says so.

The trainable counts do not depend on the reading: rank 16 on a 128x128 layer is 16 * (128 + 128)
= 4,096, four such layers (two MLP layers in each of two blocks) 16,384; a soft prompt of 14
vectors of width 128 is 1,792.
"""

import torch
from torch import nn

from gptlora.lora import apply_lora, lora_layers
from gptlora.model import count_parameters
from gptlora.prompt_tuning import SoftPrompt

D_MODEL, HEADS, HEAD_WIDTH, LAYERS, VOCAB, CONTEXT = 128, 2, 128, 2, 52_000, 50


class SeedBlock(nn.Module):
    """One block: attention with 2 heads of width 128 (q, k, v: 128 -> 256, out: 256 -> 128), an MLP
    of two 128x128 layers, two LayerNorms; no bias in any projection."""

    def __init__(self):
        super().__init__()
        inner = HEADS * HEAD_WIDTH
        self.query, self.key, self.value = (nn.Linear(D_MODEL, inner, bias=False) for _ in range(3))
        self.out = nn.Linear(inner, D_MODEL, bias=False)
        self.mlp = nn.Sequential(nn.Linear(D_MODEL, D_MODEL, bias=False), nn.ReLU(),
                                 nn.Linear(D_MODEL, D_MODEL, bias=False))
        self.norm1, self.norm2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)


class SeedGPT(nn.Module):
    """Token and position embeddings, the blocks, an optional final norm, an untied output layer with a bias."""

    def __init__(self, positions: int, final_norm: bool):
        super().__init__()
        self.tok_emb, self.pos_emb = nn.Embedding(VOCAB, D_MODEL), nn.Embedding(positions, D_MODEL)
        self.blocks = nn.ModuleList(SeedBlock() for _ in range(LAYERS))
        self.final_norm = nn.LayerNorm(D_MODEL) if final_norm else nn.Identity()
        self.head = nn.Linear(D_MODEL, VOCAB)


def seed_model(positions=CONTEXT - 1, final_norm=False) -> SeedGPT:
    with torch.device("meta"):
        return SeedGPT(positions, final_norm)


def test_the_chapter_total_and_the_gpt2_shaped_reading():
    assert count_parameters(seed_model()) == 13_698_976  # the Keras-style reading in the module docstring
    assert count_parameters(seed_model(positions=CONTEXT, final_norm=True)) == 13_698_976 + 384  # GPT-2's shape


def test_lora_rank_16_on_the_mlp_layers_trains_16384():
    model = seed_model()
    apply_lora(model, rank=16, alpha=30, target_modules=["mlp.0", "mlp.2"], verbose=False)
    assert sorted(lora_layers(model)) == [f"blocks.{i}.mlp.{j}" for i in range(2) for j in (0, 2)]
    assert count_parameters(model, trainable_only=True) == 16_384
    assert model.blocks[0].mlp[0].lora["default"].scaling == 30 / 16  # alpha / rank, as peft


def test_a_14_token_soft_prompt_trains_1792():
    model = seed_model()
    model.requires_grad_(False)
    with torch.device("meta"):
        prompt = SoftPrompt(model.tok_emb.weight[:14])  # started from 14 token embeddings, as TEXT init does
    assert count_parameters(prompt, trainable_only=True) == 1_792
