"""Mixed precision, gradient checkpointing and the other speed options, on the CPU (their CUDA paths:
tests/test_cuda.py). The default must change nothing; bf16 gives the float32 losses to a tolerance; an fp16
step with an inf gradient is skipped, counted and leaves the weights alone; checkpointing gives the same
gradients."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from gptlora.cli import app as cli
from gptlora.cli.run_settings import pretrain_settings
from gptlora.infra.precision import FP32, Precision, precision_record, resolve_precision
from gptlora.infra.speed import set_gradient_checkpointing, speed_options, to_device
from gptlora.lora import apply_lora
from gptlora.model import GPTConfig, GPTModel
from gptlora.recipes.settings import FinetuneSettings, InstructSettings, PretrainSettings
from gptlora.training import train_epochs, trainable_adamw

from test_prefix_cache import one_thread  # noqa: F401 (a fixture)
from test_pretraining import short_text, tiny_model_dir, verdict  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits on a loaded machine

TINY = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=False)


@dataclass
class History:
    global_step: int = -1
    epochs_done: int = 0
    seen: int = 0

    def count(self, n):
        self.seen += n


def batches(count=6, rows=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY.vocab_size, (rows, TINY.context_length + 1), generator=generator)
            for _ in range(count)]


def train(precision=FP32, poison_step=None, epochs=1, model=None):
    """A TINY model trained one step per batch by ``train_epochs``; returns (model, optimizer, losses)."""
    torch.manual_seed(123)
    model = model or GPTModel(TINY)
    optimizer = trainable_adamw(model, 1e-2, 0.1)
    losses = []

    def batch_loss(batch):
        batch = batch.to(model.tok_emb.weight.device)  # tests/test_cuda.py trains on the GPU too
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        losses.append(loss.item())
        if len(losses) - 1 == poison_step:  # an overflow: every gradient of this step is inf or NaN
            loss = loss * float("inf")
        return loss, batch.numel()

    train_epochs(model, batches(), optimizer, epochs, History(), batch_loss=batch_loss, eval_freq=100,
                 evaluate=lambda history: {}, end_epoch=lambda history, epoch: None, progress=False,
                 precision=precision)
    return model, optimizer, losses


def test_auto_is_fp32_on_a_cpu_and_a_cuda_only_precision_is_one_clear_error():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert Precision("auto", "cpu").is_default and precision_record(Precision("auto", "cpu")) == {}
    with pytest.raises(ValueError, match="precision tf32 is a setting of CUDA's tensor cores, found device cpu"):
        Precision("tf32", "cpu")
    with pytest.raises(ValueError, match="precision: expected one of auto, fp32, tf32, bf16, fp16, found 'fp8'"):
        Precision("fp8", "cpu")


def test_bf16_autocast_gives_the_float32_losses_to_a_tolerance_and_keeps_float32_weights():
    _, _, fp32_losses = train()
    model, optimizer, bf16_losses = train(Precision("bf16", "cpu"))
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); six steps of a loss near 4.6 stay
    # within 0.01 of float32's (measured: 0.0008).
    assert bf16_losses != fp32_losses
    assert max(abs(a - b) for a, b in zip(fp32_losses, bf16_losses)) < 0.01
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights
    assert all(v.dtype == torch.float32 for state in optimizer.state.values() for v in state.values()
               if v.is_floating_point() and v.dim())  # AdamW's moments


def test_an_fp16_step_with_an_inf_gradient_is_skipped_counted_and_leaves_the_weights():
    precision = Precision("fp16", "cpu")
    torch.manual_seed(123)
    reference = GPTModel(TINY)
    before = {name: value.clone() for name, value in reference.state_dict().items()}
    model, _, losses = train(precision, poison_step=0, model=reference)
    assert precision.skipped_steps == 1
    assert precision_record(precision) == {"precision_used": "fp16", "skipped_steps": 1}
    # Step 0 was skipped: batch 1 met the initial weights (its loss is a fresh model's). The five other
    # steps trained, so the weights moved.
    torch.manual_seed(123)
    fresh = GPTModel(TINY)
    with Precision("fp16", "cpu").autocast():
        batch = batches()[1]
        assert losses[1] == F.cross_entropy(fresh(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).item()
    assert any(not torch.equal(before[name], value) for name, value in model.state_dict().items())
    # A run poisoned at every step never changes a weight.
    precision = Precision("fp16", "cpu")
    torch.manual_seed(123)
    fresh = GPTModel(TINY)
    start = {name: value.clone() for name, value in fresh.state_dict().items()}

    def poisoned(batch):
        logits = fresh(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()) * float("nan"), batch.numel()

    train_epochs(fresh, batches(3), trainable_adamw(fresh, 1e-2, 0.1), 1, History(), batch_loss=poisoned,
                 eval_freq=100, evaluate=lambda history: {}, end_epoch=lambda history, epoch: None,
                 progress=False, precision=precision)
    assert precision.skipped_steps == 3
    assert all(torch.equal(start[name], value) for name, value in fresh.state_dict().items())


def test_the_default_precision_is_the_plain_loop_bit_for_bit():
    plain_model, _, plain_losses = train()
    auto_model, _, auto_losses = train(Precision("auto", "cpu"))
    assert plain_losses == auto_losses
    assert all(torch.equal(a, b) for a, b in zip(plain_model.parameters(), auto_model.parameters()))


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(lora):
    """With dropout on, so the recomputed forward pass must draw the same masks (preserve_rng_state)."""
    config = GPTConfig(**{**TINY.to_dict(), "drop_rate": 0.1})
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(123)
        model = GPTModel(config)
        if lora:
            apply_lora(model, rank=4, alpha=8, verbose=False)
        set_gradient_checkpointing(model, checkpointing)
        model.train()
        batch = batches(1)[0]
        torch.manual_seed(7)
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    assert gradients[0].keys() == gradients[1].keys()
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_checkpointing_needs_a_gpt_model_inside():
    with pytest.raises(ValueError, match="--gradient-checkpointing: no GPT model inside Linear"):
        set_gradient_checkpointing(torch.nn.Linear(2, 2))
    plain = GPTModel(TINY)
    assert speed_options(plain, PretrainSettings(), "cpu") is plain and not plain.gradient_checkpointing


def record_copies(monkeypatch, pinned=False):
    """Replace ``Tensor.to``, ``pin_memory`` and ``is_pinned`` by recorders (no GPU needed); returns the calls."""
    calls = []
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: pinned)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin_memory") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kwargs: calls.append(("to", args, kwargs)) or self)
    return calls


def test_to_device_on_the_cpu_and_other_devices_is_the_plain_copy():
    batch = torch.arange(12).reshape(3, 4)
    moved = to_device(batch, "cpu")
    assert moved is batch.to("cpu") and torch.equal(moved, torch.arange(12).reshape(3, 4))
    on_meta = to_device(batch, torch.device("meta"))  # a device that is not CUDA, tensors without data
    assert on_meta.device.type == "meta" and on_meta.shape == batch.shape and on_meta.dtype == batch.dtype


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "meta", "mps"])
def test_to_device_calls_exactly_tensor_to_device_off_cuda(monkeypatch, device):
    calls = record_copies(monkeypatch)
    to_device(torch.zeros(2), device)
    assert calls == [("to", (device,), {})]


@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_to_device_pins_and_copies_without_blocking_to_cuda(monkeypatch, device):
    calls = record_copies(monkeypatch)
    to_device(torch.zeros(2), device)
    assert calls == ["pin_memory", ("to", (device,), {"non_blocking": True})]


def test_to_device_does_not_pin_a_pinned_batch_again(monkeypatch):
    calls = record_copies(monkeypatch, pinned=True)  # a DataLoader(pin_memory=True) batch
    to_device(torch.zeros(2), "cuda")
    assert calls == [("to", ("cuda",), {"non_blocking": True})]


@pytest.mark.parametrize("kind", [FinetuneSettings, PretrainSettings, InstructSettings])
def test_precision_is_recorded_and_in_the_fingerprint_only_when_not_the_default(kind):
    default = kind()
    assert default.precision == "auto" and "precision" not in default.fingerprint()
    assert default.to_json()["precision"] == "auto"
    bf16 = kind(precision="bf16", gradient_checkpointing=True, compile=True)
    assert bf16.fingerprint()["precision"] == "bf16"
    assert kind.from_json(bf16.to_json()) == bf16
    # Checkpointing and compiling compute the same numbers: a run may resume with or without them.
    assert kind(gradient_checkpointing=True, compile=True).fingerprint() == default.fingerprint()
    with pytest.raises(ValueError, match="precision: expected one of auto, fp32, tf32, bf16, fp16, found 'half'"):
        kind(precision="half")


def test_checkpointing_and_a_cached_prefix_exclude_each_other():
    with pytest.raises(ValueError, match="--gradient-checkpointing recomputes blocks .* leave out one of the two"):
        FinetuneSettings(cache_prefix=True, gradient_checkpointing=True)


def test_instruction_runs_hand_the_speed_options_to_their_training():
    settings = InstructSettings(precision="fp16", gradient_checkpointing=True).pretrain_settings(64, "prompt")
    assert (settings.precision, settings.gradient_checkpointing, settings.compile) == ("fp16", True, False)


def test_the_training_commands_take_the_speed_options():
    parser = cli.build_parser()
    for command in ("pretrain", "finetune", "instruct"):
        args = parser.parse_args([command, "--precision", "bf16", "--gradient-checkpointing", "--compile"])
        assert (args.precision, args.gradient_checkpointing, args.compile) == ("bf16", True, True)
        assert parser.parse_args([command]).precision == "auto"
    args = parser.parse_args(["pretrain", "--precision", "fp16"])
    assert pretrain_settings(args).precision == "fp16"


def test_a_bf16_checkpointed_pretrain_run_records_its_precision_and_follows_fp32(run_cli, short_text, tiny_model_dir,
                                                                                 tmp_path):
    """The options reach the one loop through the command: ``metrics.json`` records the precision used, the
    losses stay near the float32 run's, and resuming with another precision is refused."""
    import json

    from test_pretraining import pretrain_args

    runs = {}
    for name, extra in (("fp32", []), ("bf16", ["--precision", "bf16", "--gradient-checkpointing"])):
        status, out = run_cli(pretrain_args(short_text, tiny_model_dir, tmp_path / name, "--epochs", "1", *extra))
        assert status == 0, out
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert "precision_used" not in runs["fp32"] and runs["fp32"]["precision"] == "auto"
    assert runs["bf16"]["precision_used"] == "bf16" and runs["bf16"]["skipped_steps"] == 0
    assert runs["bf16"]["gradient_checkpointing"] is True
    fp32, bf16 = (runs[name]["history"]["train_losses"] for name in ("fp32", "bf16"))
    assert len(fp32) == len(bf16) and max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.05
    status, _ = run_cli(["pretrain", "--resume", str(tmp_path / "bf16"), "--precision", "fp16"])
    assert status == 1
