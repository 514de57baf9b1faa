"""export_hf.py: the exported folder loads in transformers with our logits and tokenizer, and
round-trips through our from_pretrained (its errors are in test_errors.py)."""
import pytest
import torch
from conftest import tiny_checkpoint

import export_hf
import fineweb
import train_gpt2

PROMPT = "Hello, I'm a language model,"

@pytest.mark.parametrize("vocab_size", [50304, 50257])
def test_export_loads_in_transformers_with_our_logits(tmp_path, vocab_size, capsys):
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
    assert tok.encode(PROMPT) == fineweb.gpt2_encoding().encode(PROMPT)
    # and our own loader takes the folder back: the real-vocabulary weights round-trip
    back = train_gpt2.GPT.from_pretrained(str(out)).state_dict()
    for k, v in model.state_dict().items():
        if k in ("transformer.wte.weight", "lm_head.weight"):
            v = v[:50257]  # the padding rows are gone
        assert torch.equal(back[k], v), k


def test_export_with_a_damaged_tokenizer_file_fails_in_one_line(tmp_path, monkeypatch, capsys):
    import shutil

    import fineweb
    ckpt, _ = tiny_checkpoint(tmp_path / "model.pt")
    assets = tmp_path / "assets"
    shutil.copytree(fineweb.ASSETS / "gpt2", assets / "gpt2")
    (assets / "gpt2" / "vocab.bpe").write_bytes(b"#version: 0.2\nnot GPT-2's merges\n")
    monkeypatch.setattr(fineweb, "ASSETS", assets)
    assert export_hf.main(["--checkpoint", ckpt, "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vocab.bpe is damaged" in err and "git checkout -- assets" in err, err
