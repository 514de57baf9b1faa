"""sample.py: the KV cache against the model's own forward, the same tokens with and without
it, determinism, the padded vocabulary, the context boundary. (Its errors are in
test_errors.py; that its output equals the training loop's samples on the same checkpoint is
tested in test_train.py.)"""
import torch
from conftest import random_tokens, tiny_checkpoint, tiny_model

import fineweb
import sample

PROMPT = "Hello, I'm a language model,"


def test_kv_cache_decoding_matches_full_forward():
    model = tiny_model(seed=2, sharpen=0.3).eval()  # block_size 32, vocab 64
    idx = random_tokens((2, 32), 64, seed=5)  # fills the whole block_size
    prompt = 7
    with torch.no_grad():
        full, _ = model(idx)
        caches = [dict() for _ in model.transformer.h]
        logits = sample.forward_cached(model, idx[:, :prompt], caches)
        torch.testing.assert_close(logits, full[:, :prompt], rtol=0, atol=1e-5)
        for t in range(prompt, idx.size(1)):  # then one token at a time
            logits = sample.forward_cached(model, idx[:, t:t + 1], caches)
            assert logits.shape == (2, 1, 64)
            torch.testing.assert_close(logits[:, -1], full[:, t], rtol=0, atol=1e-5)
    assert caches[0]["k"].shape == (2, 2, 32, 16)  # (B, n_head, T, head_size)
    assert full.std().item() > 0.5  # logits far from uniform: a wrong cache would show


def test_generate_same_tokens_with_and_without_kv_cache():
    model = tiny_model(seed=0, sharpen=0.3, block_size=64, vocab_size=512).eval()
    idx = torch.tensor([[154, 11, 314, 110, 257, 330, 274, 11]]).repeat(4, 1)
    outs = [sample.generate(model, idx, 40, generator=torch.Generator().manual_seed(42),
                            use_kv_cache=kv) for kv in (False, True, True)]
    assert outs[0].shape == (4, 40) and torch.equal(outs[0][:, :8], idx)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    assert len({tuple(row) for row in outs[0][:, 8:].tolist()}) > 1  # 4 different samples


def test_sample_seed_and_empty_prompt(tmp_path):
    _, model = tiny_checkpoint(tmp_path / "model.pt")
    enc = fineweb.gpt2_encoding()
    assert not torch.equal(sample.sample(model, enc, PROMPT), sample.sample(model, enc, PROMPT, seed=43))
    # an empty prompt starts from <|endoftext|>
    assert sample.sample(model, enc, "", max_new_tokens=5)[:, 0].tolist() == [enc.eot_token] * 4


def test_sample_main_deterministic(tmp_path, capsys):
    ckpt, _ = tiny_checkpoint(tmp_path / "model.pt")
    args = ["--checkpoint", ckpt, "--device", "cpu", "--num_samples", "3", "--max_new_tokens", "12"]
    outs = []
    for extra in ([], [], ["--no_kv_cache"]):
        assert sample.main(args + extra) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] == outs[2]
    assert outs[0].count("sample ") == 3
    assert all(f"sample {i}: {PROMPT}" in outs[0] for i in range(3))


def test_sample_never_emits_padding_tokens(tmp_path):
    _, model = tiny_checkpoint(tmp_path / "model.pt", vocab_size=50304)
    with torch.no_grad():  # rig the model: the 47 padding tokens get by far the highest logits
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[50257:] = 10.0
    enc = fineweb.gpt2_encoding()
    idx = torch.tensor(enc.encode(PROMPT)).repeat(4, 1)
    unlimited = sample.generate(model, idx, 16, generator=torch.Generator().manual_seed(42))
    assert (unlimited[:, 8:] >= 50257).all()  # the rig works
    out = sample.sample(model, enc, PROMPT, max_new_tokens=8)
    assert (out < 50257).all()
    enc.decode(out[0].tolist())


def test_prompt_and_new_tokens_may_fill_the_context_exactly(tmp_path, capsys):
    """The boundary: one token more is the one-line error (the other errors: tests/test_errors.py)."""
    ckpt, _ = tiny_checkpoint(tmp_path / "model.pt")  # block_size 64; the prompt is 8 tokens
    assert sample.main(["--checkpoint", ckpt, "--device", "cpu", "--max_new_tokens", "57"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "65 tokens" in err and "block_size 64" in err
    assert sample.main(["--checkpoint", ckpt, "--device", "cpu", "--max_new_tokens", "56",
                        "--num_samples", "1"]) == 0  # exactly the context: fine


def test_prompt_and_temperature_from_the_command_line(tmp_path, capsys):
    """--prompt is continued; a temperature near 0 samples the likeliest token every time:
    greedy decoding, here computed with the model's plain forward pass, the same in every sample."""
    ckpt, model = tiny_checkpoint(tmp_path / "model.pt")
    enc = fineweb.gpt2_encoding()
    idx = torch.tensor([enc.encode("ROMEO:")])
    with torch.no_grad():
        for _ in range(6):
            logits, _ = model(idx)
            idx = torch.cat([idx, logits[:, -1, :50257].argmax(-1, keepdim=True)], dim=1)
    greedy = enc.decode(idx[0].tolist())
    args = ["--checkpoint", ckpt, "--device", "cpu", "--prompt", "ROMEO:", "--num_samples", "2",
            "--max_new_tokens", "6"]
    assert sample.main(args + ["--temperature", "1e-6"]) == 0
    assert capsys.readouterr().out == f"sample 0: {greedy}\nsample 1: {greedy}\n"
    assert sample.main(args + ["--temperature", "5"]) == 0  # flat: not the greedy text
    hot = capsys.readouterr().out.splitlines()
    assert all(line.startswith("sample ") and ": ROMEO:" in line for line in hot)
    assert f"sample 0: {greedy}" not in hot
