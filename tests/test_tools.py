"""Tests for the small tools: plot_log.py, sample.py, export_hf.py. CPU, offline, tiny models
saved in the trainer's checkpoint format."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import export_hf
import plot_log
import sample
import train_gpt2
from conftest import REPO

HEADER = '{"n_layer": 12, "max_steps": 19073}\n'  # the trainer's first line: its config
PROMPT = "Hello, I'm a language model,"


def tiny_checkpoint(path, vocab_size=50257, seed=0, block_size=64):
    """A tiny random GPT saved exactly as the trainer saves one; returns (path, model)."""
    torch.manual_seed(seed)
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=block_size, vocab_size=vocab_size,
                                                n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # sharper than GPT-2's init: samples depend clearly on the logits
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    train_gpt2.save_checkpoint(str(path), {"model": model.state_dict(), "step": 10,
                                           "config": dataclasses.asdict(model.config),
                                           "val_loss": 5.0})
    return str(path), model.eval()


def run_script(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def assert_one_line_error(stderr, *words):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_import_is_cheap():
    code = ("import sys, plot_log, sample, export_hf; print(sorted(m for m in "
            "('matplotlib', 'transformers', 'tiktoken') if m in sys.modules))")
    out = run_script("-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -----------------------------------------------------------------------------
# plot_log.py

def write_log(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


LOG = (HEADER + "0 val 10.9876\n0 hella 0.2500\n0 train 10.950000\n1 train 9.500000\n"
       "garbage line\n2 train 7.250000\n3 train 4.125000\n3 val 4.5000\n3 hella 0.2600\n"
       "4 train 3.900000\n5 train 4.000000\n5 val 4.2500\n5 hella 0.2550\n"
       "6 train 1.5")  # the trainer is writing "6 train 1.5xxxxx": not a value yet


def test_parse_log_skips_header_garbage_and_partial_line(tmp_path):
    data = plot_log.parse_log(write_log(tmp_path / "run" / "log.txt", LOG))
    assert data["train"] == ([0, 1, 2, 3, 4, 5], [10.95, 9.5, 7.25, 4.125, 3.9, 4.0])
    assert data["val"] == ([0, 3, 5], [10.9876, 4.5, 4.25])
    assert data["hella"] == ([0, 3, 5], [0.25, 0.26, 0.255])


def test_ema_is_bias_corrected():
    assert plot_log.ema([5.0, 5.0, 5.0], 0.99) == pytest.approx([5.0, 5.0, 5.0])
    assert plot_log.ema([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.25 + 0.75 * 2) / 0.75])


def test_plot_one_log(tmp_path, capsys):
    log = write_log(tmp_path / "run" / "log.txt", LOG)
    assert plot_log.main([log]) == 0
    png = tmp_path / "run" / "log.png"  # next to the log by default
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert ("run: min train loss 3.9000 (step 4), min val loss 4.2500 (step 5), "
            "max HellaSwag 0.2600 (step 3)") in out


def test_plot_two_logs(tmp_path, capsys):
    a = write_log(tmp_path / "run_a" / "log.txt", LOG)
    b = write_log(tmp_path / "run_b" / "log.txt", HEADER + "0 train 11.0\n1 train 8.0\n1 val 8.5\n")
    png = tmp_path / "plots" / "compare.png"
    assert plot_log.main([a, b, "--out", str(png)]) == 0
    assert png.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "run_a: min train loss 3.9000 (step 4)" in out
    assert ("run_b: min train loss 8.0000 (step 1), min val loss 8.5000 (step 1), "
            "max HellaSwag -") in out


def test_plot_errors(tmp_path, capsys):
    assert plot_log.main([str(tmp_path / "nope" / "log.txt")]) == 1
    assert_one_line_error(capsys.readouterr().err, "does not exist")
    empty = write_log(tmp_path / "empty" / "log.txt", HEADER + "0 train 10.9")  # partial only
    assert plot_log.main([empty]) == 1
    assert_one_line_error(capsys.readouterr().err, "no data lines")
    assert not (tmp_path / "empty" / "log.png").exists()
    r = run_script("plot_log.py", empty)  # as a script: one line, no traceback
    assert r.returncode == 1
    assert_one_line_error(r.stderr, "no data lines")


# -----------------------------------------------------------------------------
# sample.py (and train_gpt2.generate, which it calls)

@pytest.mark.parametrize("flash", [True, False])
def test_generate_same_tokens_with_and_without_kv_cache(flash):
    torch.manual_seed(0)
    # a small vocabulary keeps it fast; sample.py below covers the real one
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=64, vocab_size=512, n_layer=2,
                                                n_head=2, n_embd=32, flash_attention=flash))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    model.eval()
    idx = torch.tensor([[154, 11, 314, 110, 257, 330, 274, 11]]).repeat(4, 1)
    outs = []
    for kv in (False, True, True):
        g = torch.Generator().manual_seed(42)
        outs.append(train_gpt2.generate(model, idx, 40, generator=g, use_kv_cache=kv))
    assert outs[0].shape == (4, 40) and torch.equal(outs[0][:, :8], idx)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    assert len({tuple(row) for row in outs[0][:, 8:].tolist()}) > 1  # 4 different samples


def test_sample_is_trainings_sampling(tmp_path, tiktoken_cache):
    _, model = tiny_checkpoint(tmp_path / "model.pt")
    enc = train_gpt2.gpt2_tokenizer()
    # the training loop: 4 x the prompt, to 32 tokens, top-k 50, generator seeded 42 + rank 0
    idx = torch.tensor(enc.encode(PROMPT)).repeat(4, 1)
    g = torch.Generator().manual_seed(42)
    expected = train_gpt2.generate(model, idx, 32, top_k=50, generator=g)
    assert torch.equal(sample.sample(model, enc, PROMPT), expected)  # with the KV cache
    assert not torch.equal(sample.sample(model, enc, PROMPT, seed=43), expected)
    # an empty prompt starts from <|endoftext|>
    assert sample.sample(model, enc, "", max_new_tokens=5)[:, 0].tolist() == [enc.eot_token] * 4


def test_sample_main_deterministic(tmp_path, tiktoken_cache, capsys):
    ckpt, _ = tiny_checkpoint(tmp_path / "model.pt")
    args = ["--checkpoint", ckpt, "--device", "cpu", "--num_samples", "3", "--max_new_tokens", "12"]
    outs = []
    for extra in ([], [], ["--no_kv_cache"]):
        assert sample.main(args + extra) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] == outs[2]
    lines = outs[0].splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"sample {i}: {PROMPT}") for i, line in enumerate(lines))


def test_sample_errors(tmp_path, tiktoken_cache, capsys):
    ckpt, _ = tiny_checkpoint(tmp_path / "model.pt")  # block_size 64; the prompt is 8 tokens
    assert sample.main(["--checkpoint", ckpt, "--device", "cpu", "--max_new_tokens", "57"]) == 1
    assert_one_line_error(capsys.readouterr().err, "65 tokens", "block_size 64")
    assert sample.main(["--checkpoint", ckpt, "--device", "cpu", "--max_new_tokens", "56",
                        "--num_samples", "1"]) == 0  # exactly the context: fine
    capsys.readouterr()
    not_ours = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, not_ours)
    r = run_script("sample.py", "--checkpoint", str(not_ours), "--device", "cpu")
    assert r.returncode == 1
    assert_one_line_error(r.stderr, "not a checkpoint of train_gpt2.py")


def test_sample_never_emits_padding_tokens(tmp_path, tiktoken_cache):
    _, model = tiny_checkpoint(tmp_path / "model.pt", vocab_size=50304)
    with torch.no_grad():  # rig the model: the 47 padding tokens get by far the highest logits
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[50257:] = 10.0
    enc = train_gpt2.gpt2_tokenizer()
    idx = torch.tensor(enc.encode(PROMPT)).repeat(4, 1)
    unlimited = train_gpt2.generate(model, idx, 16, generator=torch.Generator().manual_seed(42))
    assert (unlimited[:, 8:] >= 50257).all()  # the rig works
    out = sample.sample(model, enc, PROMPT, max_new_tokens=8)
    assert (out < 50257).all()
    enc.decode(out[0].tolist())


# -----------------------------------------------------------------------------
# export_hf.py

@pytest.mark.parametrize("vocab_size", [50304, 50257])
def test_export_loads_in_transformers_with_our_logits(tmp_path, tiktoken_cache, vocab_size, capsys):
    from transformers import AutoTokenizer, GPT2LMHeadModel
    ckpt, model = tiny_checkpoint(tmp_path / "model.pt", vocab_size=vocab_size)
    out = tmp_path / "hf"
    assert export_hf.main(["--checkpoint", ckpt, "--out", str(out)]) == 0
    assert "wrote the GPT-2 tokenizer" in capsys.readouterr().out
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    c = hf.config
    assert (c.vocab_size, c.n_positions, c.n_embd, c.n_layer, c.n_head) == (50257, 64, 32, 2, 2)
    assert c.activation_function == "gelu_new"
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(idx)[0][..., :50257]
        theirs = hf(idx).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    # the tokenizer folder: transformers encodes as tiktoken does
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.encode(PROMPT) == train_gpt2.gpt2_tokenizer().encode(PROMPT)
    # and our own loader takes the folder back: the real-vocabulary weights round-trip
    back = train_gpt2.GPT.from_pretrained(str(out)).state_dict()
    for k, v in model.state_dict().items():
        if k in ("transformer.wte.weight", "lm_head.weight"):
            v = v[:50257]  # the padding rows are gone
        assert torch.equal(back[k], v), k


def test_export_without_tokenizer_files(tmp_path, monkeypatch, capsys):
    ckpt, _ = tiny_checkpoint(tmp_path / "model.pt")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    def offline():
        raise train_gpt2.UserError("offline")
    monkeypatch.setattr(train_gpt2, "gpt2_tokenizer", offline)  # no download attempt
    assert export_hf.main(["--checkpoint", ckpt, "--out", str(tmp_path / "hf")]) == 0
    assert "tokenizer files not written" in capsys.readouterr().out
    assert (tmp_path / "hf" / "config.json").exists()
    assert not (tmp_path / "hf" / "vocab.json").exists()


def test_export_errors(tmp_path, capsys):
    not_ours = tmp_path / "notes.pt"
    not_ours.write_text("not a checkpoint")
    r = run_script("export_hf.py", "--checkpoint", str(not_ours), "--out", str(tmp_path / "hf"))
    assert r.returncode == 1
    assert_one_line_error(r.stderr, "not a readable checkpoint")
    assert not (tmp_path / "hf").exists()
    assert export_hf.main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", "x"]) == 1
    assert_one_line_error(capsys.readouterr().err, "does not exist")
    ckpt, _ = tiny_checkpoint(tmp_path / "model.pt")
    assert export_hf.main(["--checkpoint", ckpt, "--out", str(not_ours)]) == 1
    assert_one_line_error(capsys.readouterr().err, "not a folder")
