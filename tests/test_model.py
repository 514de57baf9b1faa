"""Tests for train_gpt2.py's model, optimizer, schedule and training step: the numbers of
the 124M run (parameter counts, init, optimizer groups, learning rates) and checks against a
second implementation (Hugging Face GPT-2). CPU, offline; the full 124M model is built once
(a few seconds). The data loader is in test_data.py."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import random_tokens, tiny_model

import train_gpt2
from train_gpt2 import GPT, GPTConfig, get_lr, train_step

LN_50304 = math.log(50304)  # 10.826: the loss of a uniform prediction over the padded vocab
RESIDUAL = ("attn.c_proj", "mlp.c_proj")  # the two projections into the residual stream
TINY = dict(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def gpt124m():
    """GPT-2 124M as training builds it: seed 1337, vocab padded to 50304."""
    torch.manual_seed(1337)
    return GPT(GPTConfig(vocab_size=50304))


def unique_param_count(model):
    """Elements of the distinct parameter tensors (by storage), whatever parameters() does."""
    seen = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[p.data_ptr() if p.device.type != "meta" else id(p)] = p.numel()
    return sum(seen.values())


# -----------------------------------------------------------------------------
# 1. parameter counts

def test_parameter_count_124m(gpt124m):
    # the tied matrix counted once, by storage, whatever parameters() does
    assert unique_param_count(gpt124m) == 124_475_904  # vocab 50304, as trained
    assert sum(p.numel() for p in gpt124m.parameters()) == 124_475_904
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = GPT(GPTConfig())  # the defaults: GPT-2 124M with its 50257 tokens
    assert unique_param_count(model) == 124_439_808


# -----------------------------------------------------------------------------
# 2. init

def test_init_statistics_124m(gpt124m):
    resid_std = 0.00408  # 0.02 / sqrt(2 * 12 layers), the lecture's scaled init
    counts = dict(residual=0, linear=0, bias=0, layernorm=0, embedding=0)
    for name, module in gpt124m.named_modules():
        if isinstance(module, nn.Linear):
            w = module.weight.detach()
            want = resid_std if name.endswith(RESIDUAL) else 0.02
            counts["residual" if name.endswith(RESIDUAL) else "linear"] += 1
            assert w.std().item() == pytest.approx(want, rel=0.02 if want == 0.02 else 0.03), name
            assert abs(w.mean().item()) < 5 * want / math.sqrt(w.numel()), name
            if module.bias is not None:
                counts["bias"] += 1
                assert torch.count_nonzero(module.bias).item() == 0, name
        elif isinstance(module, nn.LayerNorm):
            counts["layernorm"] += 1
            assert torch.all(module.weight == 1).item() and torch.all(module.bias == 0).item(), name
        elif isinstance(module, nn.Embedding):
            counts["embedding"] += 1
            assert module.weight.std().item() == pytest.approx(0.02, rel=0.02), name
    # 12 blocks x (2 residual projections, c_attn + c_fc), lm_head; every block Linear has a bias
    assert counts == dict(residual=24, linear=25, bias=48, layernorm=25, embedding=2)
    assert gpt124m.lm_head.bias is None


def test_weight_tying(gpt124m):
    wte, lm_head = gpt124m.transformer.wte.weight, gpt124m.lm_head.weight
    assert lm_head is wte
    sd = gpt124m.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    assert tuple(wte.shape) == (50304, 768)


def test_tied_matrix_keeps_lm_heads_draw():
    """The init visits wte first and lm_head last: the shared matrix holds lm_head's draw
    (the reference's initial weights with seed 1337 depend on it)."""
    states = {}

    class Recording(GPT):
        def _init_weights(self, module):
            for key in ("wte", "lm_head"):
                if module is (self.lm_head if key == "lm_head" else self.transformer.wte):
                    states[key] = torch.get_rng_state()
            super()._init_weights(module)

    torch.manual_seed(1337)
    model = Recording(GPTConfig(**TINY))
    assert set(states) == {"wte", "lm_head"}
    tied = model.lm_head.weight.detach()

    def replay(key):
        torch.set_rng_state(states[key])
        return torch.empty_like(tied).normal_(0.0, 0.02)

    assert torch.equal(tied, replay("lm_head"))
    assert not torch.equal(tied, replay("wte"))
    # the same seed, the same weights (the plain class too)
    torch.manual_seed(1337)
    plain = GPT(GPTConfig(**TINY))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                  model.state_dict().values()))


# -----------------------------------------------------------------------------
# 3. the initial loss

def test_initial_loss_is_about_ln_vocab(gpt124m):
    """At init every token is about equally likely: loss ~ ln(50304) = 10.83 (plus ~0.15
    from the logits' spread, std 0.02 * sqrt(768)). A bad init shows here at once."""
    x = random_tokens((2, 64), 50304, seed=0)
    y = random_tokens((2, 64), 50304, seed=1)
    with torch.no_grad():
        logits, loss = gpt124m(x, y)
    assert abs(loss.item() - LN_50304) < 0.3, loss.item()
    probs = logits.float().softmax(-1)
    assert probs.max().item() < 50 / 50304  # nothing confidently predicted


# -----------------------------------------------------------------------------
# 4. and 5. Hugging Face compatibility

def tiny_hf_config():
    from transformers import GPT2Config
    return GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100,
                      bos_token_id=0, eos_token_id=0)


def test_state_dict_keys_and_shapes_match_hugging_face():
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(tiny_hf_config())
    hf_sd = {k: v for k, v in hf.state_dict().items()
             if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    ours = GPT(GPTConfig(block_size=64, vocab_size=100, n_layer=2, n_head=2, n_embd=32)).state_dict()
    assert list(ours) == list(hf_sd)  # the same names, in the same (creation) order
    assert len(ours) == 4 + 12 * 2 + 1
    for k, v in hf_sd.items():
        want = v.t().shape if k.endswith(train_gpt2.HF_TRANSPOSED) else v.shape
        assert ours[k].shape == want, k


def test_from_pretrained_local_folder_matches_hugging_face(tmp_path, monkeypatch):
    from transformers import GPT2LMHeadModel
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(tiny_hf_config())
    with torch.no_grad():  # every tensor random, LayerNorms and biases included
        for name, p in hf.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif p.dim() == 1:
                p.normal_(0.0, 0.3)
            else:
                p.normal_(0.0, 0.2)
    hf.save_pretrained(tmp_path)
    hf.eval()
    model = GPT.from_pretrained(str(tmp_path)).eval()
    c = model.config
    assert (c.block_size, c.vocab_size, c.n_layer, c.n_head, c.n_embd) == (64, 100, 2, 2, 32)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied after loading
    assert all(p.dtype == torch.float32 for p in model.parameters())
    idx = random_tokens((3, 40), 100, seed=2)
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert ours.shape == theirs.shape == (3, 40, 100)
    assert theirs.std().item() > 0.5  # non-trivial logits: a mapping error would show
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


# -----------------------------------------------------------------------------
# 6. learning-rate schedule

def test_learning_rate_schedule():
    def lr(step):
        return get_lr(step, 6e-4, 6e-5, 715, 19073)

    assert lr(0) == pytest.approx(6e-4 / 715, rel=1e-12)  # warmup never starts at 0
    assert lr(357) == pytest.approx(6e-4 * 358 / 715, rel=1e-12)
    assert lr(714) == pytest.approx(6e-4, rel=1e-12)  # the end of the warmup: the peak ...
    assert lr(715) == pytest.approx(6e-4, rel=1e-12)  # ... where the cosine starts
    # halfway through the cosine (715 + 18358 / 2 = 9894): halfway between max and min
    assert lr(9894) == pytest.approx(3.3e-4, rel=1e-12)
    assert lr(9893) > 3.3e-4 > lr(9895)
    assert 6e-5 < lr(19072) < 6e-5 + 1e-10
    assert lr(19073) == pytest.approx(6e-5, rel=1e-12)  # the end, and past it: the minimum
    assert lr(20000) == 6e-5
    lrs = [lr(s) for s in range(0, 20000, 37)]
    peak = lrs.index(max(lrs))
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))  # rising during warmup
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))  # then never rising


# -----------------------------------------------------------------------------
# 7. optimizer

def test_configure_optimizers_124m(gpt124m):
    opt = gpt124m.configure_optimizers(weight_decay=0.1, learning_rate=6e-4, device_type="cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert len(opt.param_groups) == 2
    decay, no_decay = opt.param_groups
    assert (len(decay["params"]), sum(p.numel() for p in decay["params"])) == (50, 124_354_560)
    assert (len(no_decay["params"]), sum(p.numel() for p in no_decay["params"])) == (98, 121_344)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    # every parameter exactly once (the tied matrix too)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in gpt124m.parameters()}
    for g in opt.param_groups:
        assert g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 and g["lr"] == 6e-4
        assert g["fused"] is False  # fused AdamW is for CUDA only
    assert all(g["fused"] for g in gpt124m.configure_optimizers(0.1, 6e-4, "cuda").param_groups)


# -----------------------------------------------------------------------------
# 8. and 9. the training step

NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)  # float32: no loss scaling


class FakeLoader:
    def __init__(self, batches, repeat=False):
        self.batches, self.repeat, self.calls = batches, repeat, 0

    def next_batch(self):
        batch = self.batches[0 if self.repeat else self.calls]
        self.calls += 1
        return batch


def test_gradient_accumulation_equals_one_large_batch():
    V, B, T = 64, 2, 16
    model_a = tiny_model(seed=3, vocab_size=V, block_size=T)
    model_b = copy.deepcopy(model_a)
    before = copy.deepcopy(model_a.state_dict())
    micro = [(random_tokens((B, T), V, seed=10 + i), random_tokens((B, T), V, seed=20 + i))
             for i in range(4)]
    big = (torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro]))
    with torch.no_grad():
        big_loss = model_b(*big)[1].item()

    opt_a = model_a.configure_optimizers(0.1, 1e-3, "cpu")
    opt_b = model_b.configure_optimizers(0.1, 1e-3, "cpu")
    loader_a, loader_b = FakeLoader(micro), FakeLoader([big])
    loss_a, norm_a = train_step(model_a, opt_a, NO_SCALER, loader_a, 4, 1e-3, 1.0, "cpu", torch.float32)
    loss_b, norm_b = train_step(model_b, opt_b, NO_SCALER, loader_b, 1, 1e-3, 1.0, "cpu", torch.float32)
    assert (loader_a.calls, loader_b.calls) == (4, 1)
    assert loss_a.item() == pytest.approx(big_loss, abs=1e-6)  # mean over the 4 micro-batches
    assert loss_a.item() == pytest.approx(loss_b.item(), abs=1e-6)
    assert norm_a.item() == pytest.approx(norm_b.item(), rel=1e-5)
    assert all(g["lr"] == 1e-3 for g in opt_a.param_groups)
    moved = 0
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)
        moved += not torch.equal(pa.detach(), before[name])
    assert moved == len(list(model_a.parameters()))  # the step changed every tensor


def test_gradient_clipping_reports_the_norm_before_clipping():
    model = tiny_model(seed=4)
    x, y = random_tokens((2, 32), 64, seed=5), random_tokens((2, 32), 64, seed=6)
    model.zero_grad()
    model(x, y)[1].backward()
    raw_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters())).item()
    clip = raw_norm / 4  # make sure clipping happens
    opt = model.configure_optimizers(0.1, 1e-3, "cpu")
    _, norm = train_step(model, opt, NO_SCALER, FakeLoader([(x, y)]), 1, 1e-3, clip, "cpu", torch.float32)
    assert norm.item() == pytest.approx(raw_norm, rel=1e-5)
    clipped = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters())).item()
    assert clipped == pytest.approx(clip, rel=1e-4)


def test_overfits_one_batch():
    V, B, T = 128, 4, 32
    model = tiny_model(seed=0, vocab_size=V, block_size=T, n_embd=64)
    batch = (random_tokens((B, T), V, seed=7), random_tokens((B, T), V, seed=8))
    opt = model.configure_optimizers(0.0, 3e-3, "cpu")
    loader = FakeLoader([batch], repeat=True)
    losses = [train_step(model, opt, NO_SCALER, loader, 1, 3e-3, 1.0, "cpu", torch.float32)[0].item()
              for _ in range(50)]
    assert abs(losses[0] - math.log(V)) < 0.2, losses[0]  # 4.85 at init
    assert losses[-1] < 0.2, losses[-10:]


# -----------------------------------------------------------------------------
# 10. attention

def test_attention_is_causal():
    model = tiny_model(seed=1, sharpen=0.3).eval()
    idx = random_tokens((2, 20), 64, seed=4)
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 64  # change the future of position 11
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().max().item() > 0.1


# -----------------------------------------------------------------------------
# 11. forward

def test_forward_shapes_and_loss():
    model = tiny_model(seed=0, sharpen=0.1)
    x, y = random_tokens((3, 20), 64, seed=1), random_tokens((3, 20), 64, seed=2)
    logits, loss = model(x)
    assert logits.shape == (3, 20, 64) and loss is None
    logits, loss = model(x, y)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(F.cross_entropy(logits.reshape(-1, 64), y.reshape(-1)).item(),
                                        rel=1e-6)
    per_sequence = [F.cross_entropy(logits[i], y[i]).item() for i in range(3)]
    assert loss.item() == pytest.approx(sum(per_sequence) / 3, rel=1e-6)  # a mean over all B*T
    model(random_tokens((1, 32), 64, seed=3))  # T == block_size is fine
    with pytest.raises(AssertionError):
        model(random_tokens((1, 33), 64, seed=3))
