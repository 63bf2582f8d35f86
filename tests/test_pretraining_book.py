"""The book's chapter-5 pretraining run on "The Verdict", reproduced to the printed digit (slow: minutes).

"Build a Large Language Model (From Scratch)", sections 5.1-5.3: GPT_CONFIG_124M
(GPT-2 small's shape, context 256, dropout 0.1, no qkv bias) from random weights
under ``torch.manual_seed(123)``, 10 epochs of AdamW (lr 0.0004, weight decay 0.1),
evaluated every 5 steps over 5 batches, a 50-token greedy sample after each
epoch. The 28 printed lines are ../shared/data/the-verdict/book-ch05-training-log.txt;
losses are compared as printed (three decimals), texts exactly.

Bitwise results depend on the number of threads the matrix products use; this
run was checked with 1 and 2 threads, and uses 2 (the CI machine's cores). They also
depend on the CPU: PyTorch picks its vectorised kernels (AVX-512, AVX2, NEON) and the
math library its code path when it starts, and float32 results can differ in the last
bit between them. Where the book prints more digits than float32 carries across CPUs,
the tests assert the digits that hold on any CPU exactly and the rest to a stated
tolerance; docs/numbers.md says on which CPU the last digit was seen.
"""

import contextlib
import io

import pytest
import torch

from gptlora.generation import generate, text_to_token_ids, token_ids_to_text
from gptlora.model import GELU, GPTConfig, GPTModel
from gptlora.pretraining import calc_loss_batch, calc_loss_loader, perplexity, train_model_simple
from gptlora.text_data import create_dataloader, read_text_file, split_text

from conftest import SHARED

pytestmark = pytest.mark.slow

VERDICT_DIR = SHARED / "data" / "the-verdict"
GPT_CONFIG_124M = GPTConfig(vocab_size=50257, context_length=256, emb_dim=768, n_heads=12, n_layers=12,
                            drop_rate=0.1, qkv_bias=False)
THREADS = 2  # checked: 1 and 2 threads give the same bits here


@pytest.fixture(scope="module")
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def book_loaders(tokenizer):
    path = VERDICT_DIR / "the-verdict.txt"
    if not path.is_file():
        pytest.skip(f"'The Verdict' is not at {path}; see ../shared/README.md")
    train_text, val_text = split_text(read_text_file(path), train_ratio=0.90)
    torch.manual_seed(123)
    train_loader = create_dataloader(train_text, batch_size=2, max_length=256, stride=256, drop_last=True,
                                     shuffle=True, tokenizer=tokenizer)
    val_loader = create_dataloader(val_text, batch_size=2, max_length=256, stride=256, drop_last=False,
                                   shuffle=False, tokenizer=tokenizer)
    return train_loader, val_loader


def test_untrained_124m_model_gives_the_books_tokens_loss_and_perplexity(tokenizer, threads):
    torch.manual_seed(123)
    model = GPTModel(GPTConfig(context_length=256, drop_rate=0.1, qkv_bias=False)).eval()
    ids = generate(model, text_to_token_ids("Every effort moves you", tokenizer), 10)
    assert token_ids_to_text(ids, tokenizer) == "Every effort moves you rentingetic wasnم refres RexMeCHicular stren"
    inputs = torch.tensor([[16833, 3626, 6100], [40, 1107, 588]])
    targets = torch.tensor([[3626, 6100, 345], [1107, 588, 11311]])
    with torch.no_grad():
        logits = model(inputs)
    assert logits.argmax(dim=-1).tolist() == [[16657, 339, 42826], [49906, 29669, 41751]]
    loss = calc_loss_batch(inputs, targets, model, "cpu")
    assert f"{loss.item():.4f}" == "10.7940"
    # The book prints the perplexity to 8 significant digits: one float32 ulp of the loss (9.5e-7) moves
    # exp(loss) by 0.046, so the last two decimals hold only on a CPU that rounds as the book's did.
    assert perplexity(loss).item() == pytest.approx(48725.8203, abs=0.1)
    assert perplexity(loss.item()) == pytest.approx(48725.8203, abs=0.1)


def book_gelu(self, x):
    """The book's GELU, written out (its chapter 4): our GELU uses PyTorch's fused kernel of the same formula."""
    return 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))))


def test_untrained_loss_over_the_loaders(book_loaders, threads, monkeypatch):
    """The book prints 10.98758347829183 and 10.98110580444336 (section 5.1.3).

    Each is the mean of float32 batch losses, and a batch loss can come out one float32 ulp (9.5e-7 at 11)
    apart on two CPUs: an AVX2-only AMD EPYC gives 10.987583584255642 for the training mean where this
    project's AVX-512 Xeon gives the book's bits (docs/numbers.md). So the digits to the fifth decimal, which
    hold on any CPU, are asserted exactly, and the rest to 2e-7 (about two ulps of a batch loss, over the
    9 training batches). The same holds with the book's written-out GELU in place of PyTorch's fused
    tanh-GELU kernel, which can round a few float32 results differently (with torch 2.13.0 on the Xeon,
    both give the book's bits; under ATEN_CPU_CAPABILITY=avx2 the book's formula gives 10.987583372328016
    for training there. The test prints the losses with the kernels PyTorch chose: pytest -s).
    """
    train_loader, val_loader = book_loaders
    book = (10.98758347829183, 10.98110580444336)
    torch.manual_seed(123)
    model = GPTModel(GPT_CONFIG_124M).eval()
    for gelu in (GELU.forward, book_gelu):
        monkeypatch.setattr(GELU, "forward", gelu)
        torch.manual_seed(123)  # the book seeds again: the training loader's shuffle draws from it
        losses = calc_loss_loader(train_loader, model, "cpu"), calc_loss_loader(val_loader, model, "cpu")
        assert [f"{loss:.5f}" for loss in losses] == ["10.98758", "10.98111"], gelu.__name__
        assert losses == pytest.approx(book, abs=2e-7), gelu.__name__
        print(f"{gelu.__name__}: {losses[0]!r} {losses[1]!r} on {torch.backends.cpu.get_cpu_capability()}")


@pytest.fixture(scope="module")
def book_run(book_loaders, tokenizer, threads):
    """The 10-epoch run exactly as the book's listing 5.3 calls it; returns (model, printed lines)."""
    train_loader, val_loader = book_loaders
    torch.manual_seed(123)
    model = GPTModel(GPT_CONFIG_124M)
    # foreach: the same arithmetic as the default per-tensor loop, bit for bit (test_pretraining), but faster.
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1, foreach=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train_losses, val_losses, tokens_seen = train_model_simple(
            model, train_loader, val_loader, optimizer, "cpu", num_epochs=10, eval_freq=5, eval_iter=5,
            start_context="Every effort moves you", tokenizer=tokenizer)
    assert len(train_losses) == len(val_losses) == len(tokens_seen) == 18
    assert tokens_seen[-1] == 85 * 512 + 512
    return model, printed.getvalue().splitlines()


def test_the_ten_epochs_print_the_books_28_lines(book_run):
    _, printed = book_run
    book = (VERDICT_DIR / "book-ch05-training-log.txt").read_text(encoding="utf-8").splitlines()
    assert len(book) == 28
    differing = [f"line {i + 1}:\n  book: {b!r}\n  ours: {o!r}" for i, (b, o) in enumerate(zip(book, printed))
                 if b != o]
    assert not differing and len(printed) == 28, "\n".join(differing) + f"\n({len(printed)} lines printed)"


def test_the_trained_model_generates_the_books_texts(book_run, tokenizer):
    model, _ = book_run
    model.eval()
    prompt = text_to_token_ids("Every effort moves you", tokenizer)
    greedy = token_ids_to_text(generate(model, prompt, max_new_tokens=25, context_size=256), tokenizer)
    assert greedy == ('Every effort moves you know," was one of the axioms he laid down across the Sevres and '
                      'silver of an exquisitely appointed lun')
    torch.manual_seed(123)
    sampled = generate(model, prompt, max_new_tokens=15, context_size=256, top_k=25, temperature=1.4)
    assert token_ids_to_text(sampled, tokenizer) == \
        "Every effort moves you stand to work on surprise, a one of us had gone with random-"


def test_generate_on_the_saved_model_prints_the_books_sample(book_run, tmp_path, capsys):
    """The README's command, `gptlora generate --model RUN --top-k 25 --temperature 1.4 --seed 123`, on the
    book's trained model saved as a run directory (as `gptlora pretrain` saves it): the book's sample."""
    from gptlora.cli import app as cli
    from gptlora.recipes.pretrain_run import save_language_model

    model, _ = book_run
    run = save_language_model(model, tmp_path / "run", dict(method="full", method_options=None, seed=123))
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(run), "--prompt", "Every effort moves you", "--max-new-tokens", "15",
                     "--top-k", "25", "--temperature", "1.4", "--seed", "123"]) == 0
    book = "Every effort moves you stand to work on surprise, a one of us had gone with random-"
    assert capsys.readouterr().out == book + "\n"
