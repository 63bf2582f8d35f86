"""Pretraining (book, chapter 5) on small models: data windows, loss, the shared loop, saving, the command.

The book's own numbers for its 124M model are in test_pretraining_book.py (slow).
"""

import json
import re

import pytest
import torch
import torch.nn.functional as F

from gptlora.cli import app as cli
from gptlora.generation import next_token, text_to_token_ids, token_ids_to_text
from gptlora.model import GPTConfig, GPTModel
from gptlora.pretraining import (calc_loss_loader, evaluate_model, load_model_and_optimizer, plot_losses,
                                 save_model_and_optimizer, train_language_model, train_model_simple)
from gptlora.text_data import (VERDICT_SHA256, SlidingWindowDataset, create_dataloader, read_text_file, split_text,
                               the_verdict)

from conftest import SHARED
from test_prefix_cache import one_thread  # noqa: F401 (a fixture)

VERDICT = SHARED / "data" / "the-verdict" / "the-verdict.txt"
TINY = GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1,
                 qkv_bias=False)


@pytest.fixture(scope="module")
def verdict() -> str:
    if not VERDICT.is_file():
        pytest.skip(f"'The Verdict' is not at {VERDICT}; see ../shared/README.md")
    return read_text_file(VERDICT)




# --- the data ---------------------------------------------------------------------------

def test_windows_are_shifted_by_one_token_and_slide_by_the_stride(tokenizer):
    text = "In the heart of the city stood the old library, a relic from a bygone era.<|endoftext|>"
    ids = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    dataset = SlidingWindowDataset(text, tokenizer, max_length=4, stride=3)
    assert len(dataset) == len(range(0, len(ids) - 4, 3))
    for index in range(len(dataset)):
        inputs, targets = dataset[index]
        assert inputs.tolist() == ids[3 * index:3 * index + 4]
        assert targets.tolist() == ids[3 * index + 1:3 * index + 5]
    assert dataset.target_ids[-1, -1] == 50256 or 50256 not in ids[-5:]  # the special token is one id


def test_the_verdict_has_the_books_sizes(verdict, tokenizer):
    assert (len(verdict), len(tokenizer.encode(verdict))) == (20_479, 5_145)
    train_text, val_text = split_text(verdict, 0.90)
    torch.manual_seed(123)
    train = create_dataloader(train_text, batch_size=2, max_length=256, stride=256, drop_last=True, shuffle=True)
    val = create_dataloader(val_text, batch_size=2, max_length=256, stride=256, drop_last=False, shuffle=False)
    assert (len(train), len(val)) == (9, 1)
    assert sum(x.numel() for x, _ in train) == 4_608 and sum(x.numel() for x, _ in val) == 512
    inputs, targets = next(iter(val))
    assert inputs.shape == targets.shape == (2, 256)


def test_a_text_too_short_for_one_window_says_how_many_tokens_it_needs(tokenizer):
    with pytest.raises(ValueError, match=r"the text has 4 tokens, too few for one training window: a window of "
                                         r"4 tokens needs 5"):
        SlidingWindowDataset("Every effort moves you", tokenizer, max_length=4, stride=4)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"), (b" \n\t", r"is empty \(only white space\)"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "looks like a binary file"), (b"caf\xe9 au lait", "is not UTF-8 text"),
])
def test_unreadable_text_files_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "text.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_text_file(path)


def test_the_verdict_is_downloaded_once_and_verified(tmp_path, verdict):
    from test_download import LoopbackServer

    with LoopbackServer({"/the-verdict.txt": VERDICT.read_bytes(), "/bad/the-verdict.txt": b"x" * 20_479}) as server:
        path = the_verdict(tmp_path, base_url=server.url)
        assert path.read_text(encoding="utf-8") == verdict and path == tmp_path / "the-verdict" / "the-verdict.txt"
        assert the_verdict(tmp_path, base_url=server.url) == path  # present and valid: no second request
        assert len(server.requests) == 1
        from gptlora.infra.download import DownloadError

        with pytest.raises(DownloadError, match="SHA-256"):
            the_verdict(tmp_path / "other", base_url=server.url + "/bad")
    assert not (tmp_path / "other" / "the-verdict" / "the-verdict.txt").exists()
    assert VERDICT_SHA256 == "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"


# --- loss and sampling --------------------------------------------------------------------

VOCAB = "closer every effort forward inches moves pizza toward you".split()
TOY_LOGITS = torch.tensor([4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79])


def test_section_5_3_toy_vocabulary_through_our_sampling():
    logits = TOY_LOGITS.unsqueeze(0)  # [1, V]
    assert VOCAB[next_token(logits).item()] == "forward"
    torch.manual_seed(123)
    assert VOCAB[next_token(logits, temperature=1.0).item()] == "forward"
    torch.manual_seed(123)
    draws = torch.cat([next_token(logits, temperature=1.0) for _ in range(1_000)]).flatten()
    counts = torch.bincount(draws, minlength=len(VOCAB)).tolist()
    assert counts == [73, 0, 0, 582, 2, 0, 0, 343, 0]
    torch.manual_seed(0)
    top3 = {next_token(logits, temperature=1.0, top_k=3).item() for _ in range(200)}
    assert top3 == {3, 7, 0}  # only the three largest logits are ever drawn
    values, positions = torch.topk(TOY_LOGITS, 3)
    assert values.tolist() == pytest.approx([6.75, 6.28, 4.51]) and positions.tolist() == [3, 7, 0]


# --- the loop -------------------------------------------------------------------------------

def book_train_model_simple(model, train_loader, val_loader, optimizer, num_epochs, eval_freq, eval_iter,
                            start_context, tokenizer):
    """The book's loop, written out plainly (its generate_text_simple included): the reference."""
    def loss_loader(loader, n):
        n = min(n, len(loader))
        total = 0.0
        for i, (x, y) in enumerate(loader):
            if i >= n:
                break
            total += F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
        return total / n

    log, train_losses, val_losses, seen, tokens_seen, step = [], [], [], [], 0, -1
    for epoch in range(num_epochs):
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            optimizer.step()
            tokens_seen += x.numel()
            step += 1
            if step % eval_freq == 0:
                model.eval()
                with torch.no_grad():
                    train_losses.append(loss_loader(train_loader, eval_iter))
                    val_losses.append(loss_loader(val_loader, eval_iter))
                model.train()
                seen.append(tokens_seen)
                log.append(f"Ep {epoch + 1} (Step {step:06d}): Train loss {train_losses[-1]:.3f}, "
                           f"Val loss {val_losses[-1]:.3f}")
        model.eval()
        idx = text_to_token_ids(start_context, tokenizer)
        with torch.no_grad():
            for _ in range(50):
                logits = model(idx[:, -model.cfg.context_length:])[:, -1, :]
                idx = torch.cat([idx, logits.argmax(dim=-1, keepdim=True)], dim=1)
        log.append(token_ids_to_text(idx, tokenizer).replace("\n", " "))
        model.train()
    return train_losses, val_losses, seen, log


def tiny_run(tokenizer, text, trainer, epochs=3):
    """Seeds, loaders, model and optimizer as the book's chapter 5, at TINY size; returns them and the result."""
    torch.manual_seed(123)
    train_text, val_text = split_text(text)
    train = create_dataloader(train_text, batch_size=2, max_length=32, stride=32, tokenizer=tokenizer)
    val = create_dataloader(val_text, batch_size=2, max_length=32, stride=32, shuffle=False, drop_last=False,
                            tokenizer=tokenizer)
    torch.manual_seed(123)
    model = GPTModel(TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.1)
    return model, optimizer, (train, val), trainer(model, train, val, optimizer, epochs)


def test_train_model_simple_is_the_books_loop_number_for_number(tokenizer, verdict, capsys, one_thread):
    text = verdict[:2000]
    *_, book = tiny_run(tokenizer, text, lambda m, t, v, o, e: book_train_model_simple(
        m, t, v, o, e, 4, 2, "Every effort moves you", tokenizer), epochs=2)
    *_, ours = tiny_run(tokenizer, text, lambda m, t, v, o, e: train_model_simple(
        m, t, v, o, "cpu", e, 4, 2, "Every effort moves you", tokenizer), epochs=2)
    train_losses, val_losses, tokens_seen = ours
    assert (train_losses, val_losses, tokens_seen) == tuple(book[:3])  # exactly: same draws, same arithmetic
    assert capsys.readouterr().out.splitlines() == book[3]  # the book's log, its samples included
    assert len(train_losses) > 2 and tokens_seen[:2] == [64, 4 * 64 + 64]  # after 1 batch of 2 x 32, then 5


def test_foreach_adamw_is_bit_for_bit_the_default_loop():
    results = []
    for foreach in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(300, 301) * 0.02), torch.nn.Parameter(torch.randn(77))]
        optimizer = torch.optim.AdamW(params, lr=4e-4, weight_decay=0.1, foreach=foreach)
        generator = torch.Generator().manual_seed(1)
        for step in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator) * 10.0 ** -step
            optimizer.step()
        results.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_saved_model_and_optimizer_continue_as_if_never_stopped(tokenizer, verdict, tmp_path, one_thread):
    """The book's exercise 5.4: train, save, load into fresh objects, train on; same as training straight."""
    text = verdict[:3000]

    def quiet(model, train, val, optimizer, epochs, history=None):
        return train_language_model(model, train, val, optimizer, "cpu", epochs, 4, 1, "Every", tokenizer,
                                    sample_tokens=3, verbose=False, history=history)

    straight_model, *_ = tiny_run(tokenizer, text, quiet, epochs=2)
    model, optimizer, (train, val), history = tiny_run(tokenizer, text, quiet, epochs=1)
    path = save_model_and_optimizer(model, optimizer, tmp_path / "model_and_optimizer.safetensors")
    generators = torch.get_rng_state()
    fresh = GPTModel(TINY)  # other random weights, replaced by the saved ones
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=4e-3, weight_decay=0.1)
    load_model_and_optimizer(fresh, fresh_optimizer, path)
    torch.set_rng_state(generators)  # building `fresh` drew random numbers the first run never drew
    quiet(fresh, train, val, fresh_optimizer, 2, history=history)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), straight_model.state_dict().values()))
    with pytest.raises(ValueError, match="does not fit this model"):
        load_model_and_optimizer(GPTModel(GPTConfig(**{**TINY.to_dict(), "n_layers": 1})), None, path)


def test_loss_over_loaders_restores_the_mode_and_the_plot_is_a_png(tokenizer, verdict, tmp_path):
    model = GPTModel(TINY).train()
    loader = create_dataloader(verdict[:2000], batch_size=2, max_length=32, stride=32, shuffle=False,
                               tokenizer=tokenizer)
    assert calc_loss_loader(loader, model, "cpu", num_batches=2) == calc_loss_loader(loader, model, "cpu", 2)
    assert model.training
    train_loss, val_loss = evaluate_model(model, loader, loader, "cpu", eval_iter=1)
    assert train_loss == val_loss > 0
    path = plot_losses(torch.linspace(0, 2, 3), [0, 64, 128], [9.0, 7.0, 5.0], [9.5, 8.0, 7.5], tmp_path / "l.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the command ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A directory with a Hugging Face config.json of TINY's shape (context 64), for --model DIR --random-init."""
    from gptlora.formats.hf_layout import config_to_hf

    directory = tmp_path_factory.mktemp("tiny-shape")
    (directory / "config.json").write_text(json.dumps(config_to_hf(GPTConfig(**{**TINY.to_dict(),
                                                                               "context_length": 64}))))
    return directory


@pytest.fixture(scope="module")
def short_text(tmp_path_factory, verdict):
    path = tmp_path_factory.mktemp("text") / "verdict-start.txt"
    path.write_text(verdict[:4000], encoding="utf-8")
    return path


def pretrain_args(text, model_dir, out, *extra):
    return ["pretrain", "--text", str(text), "--model", str(model_dir), "--random-init", "--context-length", "32",
            "--epochs", "2", "--eval-freq", "3", "--eval-iter", "2", "--sample-tokens", "8", "--lr", "4e-3",
            "--out", str(out), "--device", "cpu", *extra]


def test_generate_on_a_run_samples_as_the_book_does_after_training(run_cli, short_text, tiny_model_dir, tmp_path,
                                                                   tokenizer, one_thread):
    """`gptlora generate --model RUN --top-k --temperature --seed` draws what the book's call draws on the
    trained model: ``torch.manual_seed(seed); generate(model, ...)`` (test_pretraining_book's seeded sample).
    The command once seeded before building the model, whose initial weights used up the seeded draws."""
    from gptlora.generation import generate
    from gptlora.recipes.pretrain_run import load_language_model

    run = tmp_path / "run"
    assert run_cli(pretrain_args(short_text, tiny_model_dir, run, "--epochs", "1"))[0] == 0
    options = ["--prompt", "Every effort moves you", "--max-new-tokens", "15", "--top-k", "25", "--temperature", "1.4"]
    samples = {}
    for seed in (123, 7):
        status, printed = run_cli(["generate", "--model", str(run), *options, "--seed", str(seed),
                                   "--device", "cpu"])
        assert status == 0
        model, _ = load_language_model(run)
        torch.manual_seed(seed)
        ids = generate(model, text_to_token_ids("Every effort moves you", tokenizer), max_new_tokens=15,
                       context_size=model.cfg.context_length, top_k=25, temperature=1.4)
        samples[seed] = token_ids_to_text(ids, tokenizer)
        assert printed == samples[seed] + "\n"  # print adds the line end
    assert samples[123] != samples[7]  # the draws do depend on the seed: the comparison above can fail


def test_pretrain_command_writes_a_run_that_generate_reads(run_cli, short_text, tiny_model_dir, tmp_path, tokenizer,
                                                           one_thread):
    status, out = run_cli(pretrain_args(short_text, tiny_model_dir, tmp_path / "run"))
    assert status == 0, out
    assert out.splitlines()[0].startswith("Ep 1 (Step 000000): Train loss ")
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} == {"checkpoint.safetensors", "language_model.json", "model.safetensors",
                                               "metrics.json", "loss.png"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["history"]["epochs_done"] == 2 and metrics["val_loss"] == metrics["history"]["val_losses"][-1]
    assert metrics["history"]["samples"][-1] in out

    # The command is the book's recipe: the same numbers as train_model_simple's loop seeded as in the book.
    from gptlora.recipes.pretrain_run import book_config, load_language_model

    torch.manual_seed(123)
    train_text, val_text = split_text(short_text.read_text(encoding="utf-8"))
    train = create_dataloader(train_text, batch_size=2, max_length=32, stride=32, tokenizer=tokenizer)
    val = create_dataloader(val_text, batch_size=2, max_length=32, stride=32, shuffle=False, drop_last=False,
                            tokenizer=tokenizer)
    torch.manual_seed(123)
    book_model = GPTModel(book_config(tiny_model_dir, 32))
    optimizer = torch.optim.AdamW(book_model.parameters(), lr=4e-3, weight_decay=0.1)
    book = train_language_model(book_model, train, val, optimizer, "cpu", 2, 3, 2, "Every effort moves you",
                                tokenizer, sample_tokens=8, verbose=False)
    assert (book.train_losses, book.val_losses, book.samples) == (
        metrics["history"]["train_losses"], metrics["history"]["val_losses"], metrics["history"]["samples"])

    model, info = load_language_model(run)
    assert info["method"] == "full" and model.cfg.context_length == 32 and not model.cfg.qkv_bias
    status, generated = run_cli(["generate", "--model", str(run), "--max-new-tokens", "8"])
    assert status == 0
    assert generated.strip() == metrics["history"]["samples"][-1].strip()  # greedy: the last epoch's sample

    # Resumed from the epoch-1 checkpoint of a 1-epoch run, a second epoch ends where the 2-epoch run did.
    status, _ = run_cli(pretrain_args(short_text, tiny_model_dir, tmp_path / "half", "--epochs", "1"))
    # As with finetune, --resume alone restores the run's options (text, model, context, lr, ...).
    status, _ = run_cli(["pretrain", "--resume", str(tmp_path / "half"), "--epochs", "2"])
    assert status == 0
    resumed = json.loads((tmp_path / "half" / "metrics.json").read_text())
    assert resumed["history"]["val_losses"] == metrics["history"]["val_losses"]


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    """A randomly initialised GPT-2 (32 wide, context 64) in the Hugging Face layout, head tied."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base_dir = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=50257)).save_pretrained(
        base_dir)
    return base_dir


def test_lora_run_on_a_pretrained_gpt2_exports_to_peft(run_cli, short_text, tiny_gpt2_dir, tmp_path):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    base_dir = tiny_gpt2_dir

    run = tmp_path / "lora-run"
    status, out = run_cli(["pretrain", "--text", str(short_text), "--model", str(base_dir), "--method", "lora",
                           "--rank", "4", "--alpha", "8", "--context-length", "32", "--epochs", "1", "--eval-freq",
                           "5", "--eval-iter", "1", "--lr", "1e-2", "--sample-tokens", "5", "--out", str(run),
                           "--device", "cpu"])
    assert status == 0, out
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and not (run / "model.safetensors").exists()
    from gptlora.recipes.pretrain_run import load_language_model

    ours, info = load_language_model(run)
    assert info["method_options"]["rank"] == 4
    status, generated = run_cli(["generate", "--model", str(run), "--max-new-tokens", "3", "--int8"])
    assert status == 0 and generated.startswith("Every effort moves you")  # adapters merged, then quantized
    status, out = run_cli(["export-peft", "--run", str(run), "--out", str(tmp_path / "peft")])
    assert status == 0, out
    hf = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base_dir), tmp_path / "peft").eval()
    ids = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs, mine = hf(ids).logits, ours(ids)
    base_logits = GPT2LMHeadModel.from_pretrained(base_dir).eval()(ids).logits.detach()
    assert (mine - base_logits).abs().max() > 1e-3  # the adapter changed something
    torch.testing.assert_close(theirs, mine, atol=1e-4, rtol=0)


def test_full_run_on_a_tied_gpt2_base_loads_back_and_generates(run_cli, short_text, tiny_gpt2_dir, tmp_path,
                                                               one_thread):
    """GPT-2's head is its token embedding; the saved run stores that tensor once and must load tied."""
    from gptlora.recipes.pretrain_run import load_language_model

    base_dir = tiny_gpt2_dir
    run = tmp_path / "full-run"
    status, out = run_cli(["pretrain", "--text", str(short_text), "--model", str(base_dir), "--context-length", "32",
                           "--epochs", "1", "--eval-freq", "5", "--eval-iter", "1", "--lr", "1e-3",
                           "--sample-tokens", "5", "--out", str(run), "--device", "cpu"])
    assert status == 0, out
    model, info = load_language_model(run)
    assert info["weights_tied"] and model.weights_tied
    sample = json.loads((run / "metrics.json").read_text())["history"]["samples"][-1]
    status, generated = run_cli(["generate", "--model", str(run), "--max-new-tokens", "5"])
    assert status == 0 and generated.strip() == sample.strip()


def test_finetune_overwrite_removes_a_pretraining_runs_marker(tmp_path):
    from gptlora.recipes.finetune import open_run_dir
    from gptlora.recipes.pretrain_run import RUN_INFO, WEIGHTS, is_pretraining_run

    run = tmp_path / "run"
    run.mkdir()
    for name in (RUN_INFO, WEIGHTS, "metrics.json"):
        (run / name).write_text("old")
    assert is_pretraining_run(run)
    open_run_dir(run, resume=False, overwrite=True)  # finetune's default list of run files
    assert list(run.iterdir()) == [] and not is_pretraining_run(run)


def parse_status(args) -> int:
    """The exit status of argparse refusing ``args`` (2), or 0 when they parse."""
    try:
        cli.build_parser().parse_args(args)
    except SystemExit as stop:
        return stop.code
    return 0


@pytest.mark.parametrize("extra, message, status", [
    (["--context-length", "65"], "--context-length 65 is not possible .* whose context length is 64", 1),
    (["--batch-size", "100"], "fewer than one batch of 100", 1),
    # Ranges known without the text or the model are checked while parsing (status 2, argparse's).
    (["--context-length", "0"], "argument --context-length: expected a whole number of at least 1, found 0", 2),
    (["--epochs", "0"], "argument --epochs: expected a whole number of at least 1, found 0", 2),
    (["--lr", "-1"], "argument --lr: expected a finite number above 0, found '-1'", 2),
    (["--lr", "inf"], "argument --lr: expected a finite number above 0, found 'inf'", 2),
    (["--seed", "-1"], "argument --seed: expected a whole number from 0 to 4294967295, found -1", 2),
    (["--train-ratio", "1"], "argument --train-ratio: expected a finite number above 0 and below 1, found '1'", 2),
    (["--weight-decay", "nan"], "argument --weight-decay: expected a finite number of at least 0, found 'nan'", 2),
    (["--sample-tokens", "0"], "argument --sample-tokens: expected a whole number of at least 1, found 0", 2),
    (["--device", "cuda:7"], "argument --device: 'cuda:7' is not available", 2),
    (["--device", "gpu"], "argument --device: expected auto, cpu, cuda, cuda:N or another torch device", 2),
])
def test_bad_options_are_one_line_before_anything_is_written(run_cli, short_text, tiny_model_dir, tmp_path,
                                                             capsys, extra, message, status):
    args = pretrain_args(short_text, tiny_model_dir, tmp_path / "run") + extra  # argparse takes the last
    if status == 2:
        assert parse_status(args) == 2
    else:
        assert run_cli(args)[0] == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and re.search(message, error), error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"), (b"\x00\x01binary", "binary"), (b"\xff\xfe\x00", "binary"), (b"caf\xe9", "not UTF-8"),
    (b"Every effort moves you", "the training part of the text .* has [0-9] tokens, too few .* needs 33"),
])
def test_bad_texts_are_one_line_before_anything_is_written(run_cli, tiny_model_dir, tmp_path, capsys, content,
                                                           message):
    text = tmp_path / "text.txt"
    text.write_bytes(content)
    status, _ = run_cli(pretrain_args(text, tiny_model_dir, tmp_path / "run"))
    error = capsys.readouterr().err.strip()
    assert status == 1 and len(error.splitlines()) == 1 and re.search(message, error), error
    assert not (tmp_path / "run").exists()


def test_a_directory_holding_another_run_is_refused(run_cli, short_text, tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "classifier.json").write_text("{}")
    status, _ = run_cli(pretrain_args(short_text, tiny_model_dir, run))
    error = capsys.readouterr().err.strip()
    assert status == 1 and "already holds files (classifier.json)" in error and len(error.splitlines()) == 1
    assert [p.name for p in run.iterdir()] == ["classifier.json"]
