"""The CUDA paths: placement on the GPU, bfloat16, and torchrun with NCCL.

CI has no GPU, so every test here skips there with that reason. On a machine with one:

    python -m pytest -q tests/test_cuda.py

Each test runs the same thing on the CPU and on the GPU (or against transformers on the GPU) and
compares: a tensor left on the wrong device fails with a device-mismatch error, a dtype that does not
follow the weights fails the bfloat16 checks. GPU matrix products add in another order than the CPU's,
so float32 results are compared to 1e-4 (TF32 stays off: PyTorch's default for matrix products).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptlora.formats.hf_layout import config_to_hf
from gptlora.generation import generate
from gptlora.model import GPTConfig, GPTModel
from gptlora.pretrained import save_hf
from gptlora.qlora import quantize_base
from test_model import copy_from_transformers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: these tests check the GPU paths (placement, bfloat16, NCCL)")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_gpt2_small():
    """A random-weight transformers GPT2LMHeadModel of gpt2-small's shape (float32, CPU, eval)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(bos_token_id=0, eos_token_id=0)).eval()


def test_logits_and_cached_generation_on_cuda_match_transformers(hf_gpt2_small):
    hf = hf_gpt2_small.to("cuda")
    ours = copy_from_transformers(hf_gpt2_small).to("cuda")
    ids = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0)).to("cuda")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)
    prompt = ids[:1, :5]
    expected = hf.generate(prompt, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(prompt),
                           pad_token_id=0, eos_token_id=None)
    assert generate(ours, prompt, max_new_tokens=20, use_cache=True).tolist() == expected.tolist()
    assert generate(ours, prompt, max_new_tokens=20, use_cache=False).tolist() == expected.tolist()
    hf_gpt2_small.to("cpu")


def test_bfloat16_logits_are_no_further_from_float32_than_transformers(hf_gpt2_small):
    """Both models cast to bfloat16 on the GPU: our logits' error against the float32 logits must be of
    the reference's size (bfloat16 keeps 8 significant bits, so neither is exact). The KV cache takes
    the weights' dtype."""
    ids = torch.randint(0, 50257, (2, 128), generator=torch.Generator().manual_seed(0)).to("cuda")
    hf = hf_gpt2_small.to("cuda")
    with torch.no_grad():
        exact = hf(ids).logits
        hf_error = (hf.to(torch.bfloat16)(ids).logits.float() - exact).abs().mean().item()
        ours = copy_from_transformers(hf_gpt2_small.float()).to("cuda", torch.bfloat16)
        our_error = (ours(ids).float() - exact).abs().mean().item()
    hf_gpt2_small.to("cpu", torch.float32)
    print(f"mean |bf16 - fp32| of the logits: ours {our_error:.4f}, transformers {hf_error:.4f}")
    assert our_error <= 1.25 * hf_error
    assert ours.new_cache(1, 8).keys[0].dtype == torch.bfloat16
    out = generate(ours, ids[:1, :4], max_new_tokens=8)
    assert out.shape == (1, 12) and out.device.type == "cuda"


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantized_base_on_cuda_equals_cpu(method):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=1000, context_length=32, emb_dim=128, n_heads=4, n_layers=2, drop_rate=0.0)
    model = quantize_base(GPTModel(cfg).eval(), method)
    ids = torch.randint(0, 1000, (2, 32))
    with torch.no_grad():
        on_cpu = model(ids)
        on_gpu = model.to("cuda")(ids.to("cuda"))
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide GPT-2 config (random weights are drawn by --random-init)."""
    config = GPTConfig(vocab_size=50257, context_length=128, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0,
                       qkv_bias=True)
    path = tmp_path_factory.mktemp("tiny")
    (path / "config.json").write_text(json.dumps(config_to_hf(config)))
    return path


def gptlora_command(*arguments) -> subprocess.CompletedProcess:
    """``python -m gptlora.cli ARGUMENTS`` in a fresh process; fails the test with its output if it fails."""
    done = subprocess.run([sys.executable, "-m", "gptlora.cli", *map(str, arguments)], capture_output=True,
                          text=True, cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def metrics_of(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["history"]


FINETUNE_METHODS = {
    "full": ["--method", "full"],
    "lora": ["--method", "lora", "--rank", "4", "--alpha", "8"],
    "qlora-nf4": ["--method", "lora", "--rank", "4", "--alpha", "8", "--quantize-base", "nf4"],
    "prompt-tuning": ["--method", "prompt-tuning", "--num-virtual-tokens", "4"],
}


@pytest.mark.parametrize("method", FINETUNE_METHODS, ids=str)
def test_finetune_and_classify_on_cuda_follow_the_cpu_run(method, tiny_dir, small_spam_data_dir, tmp_path):
    runs = {}
    for device in ("cpu", "cuda"):
        runs[device] = tmp_path / device
        gptlora_command("finetune", "--model", tiny_dir, "--random-init", *FINETUNE_METHODS[method], "--epochs", "1",
                        "--lr", "1e-3", "--eval-freq", "5", "--data-dir", small_spam_data_dir, "--device", device,
                        "--out", runs[device])
    cpu, gpu = metrics_of(runs["cpu"]), metrics_of(runs["cuda"])
    for key in ("train_losses", "val_losses"):
        torch.testing.assert_close(torch.tensor(gpu[key]), torch.tensor(cpu[key]), atol=1e-3, rtol=0)
    text = "You are a winner you have been specially selected to receive $1000 cash or a $2000 award."
    labels = {device: gptlora_command("classify", "--run", runs[device], "--device", device, text).stdout
              for device in runs}
    assert labels["cuda"] == labels["cpu"]


def test_pretrain_and_generate_on_cuda_follow_the_cpu_run(tmp_path):
    """Continued pretraining of a saved tiny GPT-2 without dropout (``--random-init`` would take the book's
    dropout of 0.1, whose masks the GPU draws from another generator than the CPU)."""
    text = REPO_ROOT.parent / "shared" / "data" / "the-verdict" / "the-verdict.txt"
    if not text.is_file():
        pytest.skip(f"The Verdict is not at {text}; see ../shared/README.md")
    torch.manual_seed(0)
    base = save_hf(GPTModel(GPTConfig(vocab_size=50257, context_length=128, emb_dim=64, n_heads=4, n_layers=2,
                                      drop_rate=0.0, qkv_bias=True)), tmp_path / "base")
    runs = {}
    for device in ("cpu", "cuda"):
        runs[device] = tmp_path / device
        gptlora_command("pretrain", "--text", text, "--model", base, "--context-length", "64",
                        "--epochs", "1", "--eval-freq", "20", "--sample-tokens", "10", "--device", device,
                        "--out", runs[device])
    cpu, gpu = metrics_of(runs["cpu"]), metrics_of(runs["cuda"])
    torch.testing.assert_close(torch.tensor(gpu["train_losses"]), torch.tensor(cpu["train_losses"]), atol=1e-3, rtol=0)
    generated = {device: gptlora_command("generate", "--model", runs[device], "--prompt", "Every effort moves you",
                                         "--max-new-tokens", "10", "--device", device).stdout for device in runs}
    assert generated["cuda"] == generated["cpu"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_torchrun_on_one_gpu_over_nccl_trains_as_on_the_cpu_over_gloo(tiny_dir, small_spam_data_dir, tmp_path):
    """``torchrun --nproc-per-node=1``: ``--device cuda`` (NCCL) gives the run ``--device cpu`` (gloo) gives.
    Both use the DistributedSampler, whose order differs from a plain run's shuffling, so the reference is
    a torchrun run too."""
    runs = {}
    for device in ("cpu", "cuda"):
        runs[device] = tmp_path / device
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=1",
                               "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "gptlora.cli",
                               "finetune", "--model", str(tiny_dir), "--random-init", "--method", "lora", "--rank", "4",
                               "--epochs", "1", "--eval-freq", "5", "--data-dir", str(small_spam_data_dir),
                               "--device", device, "--out", str(runs[device])],
                              capture_output=True, text=True, cwd=REPO_ROOT,
                              env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
        assert done.returncode == 0, done.stdout + done.stderr
    torch.testing.assert_close(torch.tensor(metrics_of(runs["cuda"])["train_losses"]),
                               torch.tensor(metrics_of(runs["cpu"])["train_losses"]), atol=1e-3, rtol=0)


def test_nccl_process_group_reduces_on_the_gpu(tmp_path):
    """The backend gptlora picks for a CUDA device is NCCL, and an all-reduce through it works."""
    script = tmp_path / "reduce.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from gptlora.infra.distributed import start_processes, stop_processes\n"
        "processes = start_processes(torch.device('cuda'))\n"
        "value = torch.ones(3, device=processes.device)\n"
        "dist.all_reduce(value)\n"
        "print(dist.get_backend(), processes.device, value.tolist())\n"
        "stop_processes()\n")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=1",
                           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(script)],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nccl cuda:0 [1.0, 1.0, 1.0]" in done.stdout


# --- issue 24: precision, fused AdamW, checkpointing, compiled generation, bench -----------------

def test_bf16_and_fp16_training_on_cuda_follow_float32_and_keep_float32_weights():
    """The training loop's autocast on the GPU: losses near float32's, master weights and AdamW (fused on
    CUDA) in float32; an fp16 step with an inf gradient is skipped and counted."""
    from test_precision import train

    from gptlora.infra.precision import Precision

    torch.manual_seed(123)
    _, _, fp32_losses = train(Precision("fp32", "cuda"), model=GPTModel(TINY_CUDA).cuda())
    for name in ("bf16", "fp16", "tf32"):
        precision = Precision(name, "cuda")
        torch.manual_seed(123)
        model, optimizer, losses = train(precision, model=GPTModel(TINY_CUDA).cuda())
        assert max(abs(a - b) for a, b in zip(losses, fp32_losses)) < 0.05, name
        assert all(p.dtype == torch.float32 and p.is_cuda for p in model.parameters())
        assert optimizer.defaults["fused"] is True
    precision = Precision("fp16", "cuda")
    torch.manual_seed(123)
    train(precision, poison_step=0, model=GPTModel(TINY_CUDA).cuda())
    assert precision.skipped_steps == 1
    assert Precision("auto", "cuda").name == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")


TINY_CUDA = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)


def test_gradient_checkpointing_on_cuda_gives_the_same_gradients():
    from gptlora.infra.speed import set_gradient_checkpointing

    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = set_gradient_checkpointing(GPTModel(TINY_CUDA).cuda(), checkpointing)
        ids = torch.randint(0, 97, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        model(ids).float().pow(2).mean().backward()
        gradients.append([p.grad for p in model.parameters()])
    for a, b in zip(*gradients):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_generate_compile_on_cuda_gives_the_eager_tokens_with_cuda_graphs():
    from gptlora.static_generation import CompiledGenerator

    torch.manual_seed(123)
    model = GPTModel(GPTConfig(vocab_size=1000, context_length=64, emb_dim=64, n_heads=4, n_layers=2,
                               drop_rate=0.0, qkv_bias=True)).cuda().eval()
    prompt = torch.tensor([[5, 17, 42]], device="cuda")
    generator = CompiledGenerator(model, 40)
    eager = generate(model, prompt, 30)
    assert torch.equal(generator.generate(prompt, 30), eager)
    assert torch.equal(generator.generate(prompt, 30), eager)  # replayed graphs, same tokens


def test_bench_on_cuda_reports_mfu_and_peak_memory():
    from gptlora.benchmark import run_bench

    config = GPTConfig(vocab_size=1000, context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0)
    rows = run_bench(config, "cuda", batch_size=2, steps=2, generate_tokens=4, progress=False)
    assert rows[0].option == "fp32" and {"tf32", "fp16", "fp32+checkpointing"} <= {row.option for row in rows}
    for row in rows:
        assert row.train_tokens_per_s > 0 and row.peak_memory_mb > 0 and row.mfu_of_measured > 0


def test_a_pinned_non_blocking_copy_arrives_equal_on_the_gpu():
    from gptlora.infra.speed import to_device
    from gptlora.pretraining import calc_loss_batch

    batch = torch.randint(0, 97, (8, 17), generator=torch.Generator().manual_seed(0))
    moved = to_device(batch, "cuda")
    assert moved.device.type == "cuda" and not batch.is_pinned()  # the pinned copy is a new host tensor
    assert torch.equal(moved.cpu(), batch)
    pinned = batch.pin_memory()  # as a DataLoader(pin_memory=True) hands it over
    assert torch.equal(to_device(pinned, torch.device("cuda")).cpu(), batch)
    assert to_device(moved, "cuda") is moved
    torch.manual_seed(0)
    model = GPTModel(TINY_CUDA).cuda().eval()
    with torch.no_grad():  # the loss reads the non-blocking copy on the same stream: as if it had waited
        expected = calc_loss_batch(batch[:, :-1].cuda(), batch[:, 1:].cuda(), model, "cuda")
        assert torch.equal(calc_loss_batch(batch[:, :-1], batch[:, 1:], model, "cuda"), expected)
