"""The seed small-GPT chapter's numbers: 13,698,976 parameters, LoRA trains 16,384, a 14-token soft prompt 1,792.

The chapter describes "a GPT-like model with d_model 128, 2 heads of width 128, 2 layers, vocabulary
52,000, context 50", and prints the module it builds (its config has ``bias=False``): LayerNorms without a
bias, bias-free query/key/value and MLP projections, an attention output projection (``projection_out``)
with a bias, 50 learned positions, a final LayerNorm and an untied output layer with a bias. Built as
printed (on the meta device: counting needs no numbers), it has exactly the chapter's total:

    6,656,000 (tokens) + 6,400 (positions) + 2 x 164,224 (blocks) + 128 (final norm) + 6,708,000 (head)
    = 13,698,976,

a block being 3 x 128 x 256 (q, k, v) + 256 x 128 + 128 (out, with bias) + 2 x 128 x 128 (MLP) + 2 x 128
(norm weights) = 164,224. (An earlier reading, with 49 positions and no final norm, gave the same total by
chance; the printed module settles it.)

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
    of two 128x128 layers, two LayerNorms without a bias; only the attention's output projection has one."""

    def __init__(self):
        super().__init__()
        inner = HEADS * HEAD_WIDTH
        self.query, self.key, self.value = (nn.Linear(D_MODEL, inner, bias=False) for _ in range(3))
        self.out = nn.Linear(inner, D_MODEL, bias=True)  # projection_out, printed with bias=True
        self.mlp = nn.Sequential(nn.Linear(D_MODEL, D_MODEL, bias=False), nn.ReLU(),
                                 nn.Linear(D_MODEL, D_MODEL, bias=False))
        self.norm1, self.norm2 = nn.LayerNorm(D_MODEL, bias=False), nn.LayerNorm(D_MODEL, bias=False)


class SeedGPT(nn.Module):
    """Token and 50 position embeddings, the blocks, a final norm without a bias, an untied output layer with one."""

    def __init__(self):
        super().__init__()
        self.tok_emb, self.pos_emb = nn.Embedding(VOCAB, D_MODEL), nn.Embedding(CONTEXT, D_MODEL)
        self.blocks = nn.ModuleList(SeedBlock() for _ in range(LAYERS))
        self.final_norm = nn.LayerNorm(D_MODEL, bias=False)
        self.head = nn.Linear(D_MODEL, VOCAB)


def seed_model() -> SeedGPT:
    with torch.device("meta"):
        return SeedGPT()


def test_the_printed_module_has_the_chapters_total():
    model = seed_model()
    parts = [count_parameters(part) for part in (model.tok_emb, model.pos_emb, model.blocks[0], model.blocks[1],
                                                 model.final_norm, model.head)]
    assert parts == [6_656_000, 6_400, 164_224, 164_224, 128, 6_708_000]
    assert count_parameters(model) == sum(parts) == 13_698_976


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
