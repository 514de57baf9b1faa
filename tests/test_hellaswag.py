"""Tests for hellaswag.py: data, rendering, scoring (against a naive second implementation),
batching and torch.compile (the script's errors are in test_errors.py). CPU, offline."""
import itertools
import json
import os
from collections import Counter
from functools import lru_cache

import pytest
import torch
from conftest import REPO, free_port
from conftest import tiny_model as conftest_tiny_model

import fineweb
import hellaswag
import train_gpt2


def tiny_model(seed=0, vocab_size=50257):
    """A small random GPT, sharp enough that the four endings get clearly different losses."""
    return conftest_tiny_model(seed, sharpen=0.5, vocab_size=vocab_size, block_size=256).eval()


def fold(rendered, vocab_size):
    """Real examples (their lengths, masks, shared contexts) with token ids folded into a
    small vocabulary: on this CPU the (rows, T, 50257) logits cost far more than the rest
    of the model, and the scoring does not care what the ids mean."""
    return [(tokens % vocab_size, mask, label) for tokens, mask, label in rendered]


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: on a small (often shared) CPU, synchronizing two intra-op
    threads costs more than it saves, up to 10x on the loops of small forward passes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@lru_cache(maxsize=None)
def val_rendered(n):
    """The first n val examples, rendered (from the copy in assets/)."""
    enc = fineweb.gpt2_encoding()
    return [hellaswag.render_example(e, enc)
            for e in itertools.islice(hellaswag.iterate_examples("val"), n)]


def all_preds(model, rendered, **kw):
    preds = list(hellaswag.predict(model, rendered, "cpu", **kw))
    return torch.cat([p for p, _ in preds]), torch.cat([p for _, p in preds])


# -----------------------------------------------------------------------------
# import, data

def test_data_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.delenv("HELLASWAG_DIR", raising=False)
    assert hellaswag.data_dir() == os.path.join(str(REPO), "hellaswag") == hellaswag.DATA_DIR
    monkeypatch.setenv("HELLASWAG_DIR", str(tmp_path))
    assert hellaswag.data_dir() == str(tmp_path)


def test_the_val_set_ships_with_the_repository(http_server, monkeypatch):
    monkeypatch.setattr(hellaswag, "URL", http_server.url + "/hellaswag_{split}.jsonl")
    assert hellaswag.download("val").endswith("assets/hellaswag/hellaswag_val.jsonl.gz")
    examples = list(hellaswag.iterate_examples("val"))
    assert len(examples) == 10042
    assert Counter(e["label"] for e in examples) == {0: 2515, 1: 2485, 2: 2584, 3: 2458}
    assert http_server.seen == []  # no request at all


GOOD = {"ctx": "A man is sitting on a roof. he", "label": 3,
        "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                    "is holding a rubik's cube.", "starts pulling up roofing on a roof."]}


@pytest.mark.parametrize("bad", [
    '{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 0',  # truncated JSON
    json.dumps({"endings": GOOD["endings"], "label": 0}),  # no ctx
    json.dumps({**GOOD, "endings": GOOD["endings"][:3]}),  # 3 endings
    json.dumps({**GOOD, "endings": [1, 2, 3, 4]}),  # endings not strings
    json.dumps({**GOOD, "label": 4}),  # label out of range
    json.dumps({**GOOD, "label": "1"}),  # label a string
    "[1, 2, 3]",  # not an object
])
def test_malformed_line_names_file_and_line(tmp_path, bad):
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + bad + "\n")
    examples = hellaswag.iterate_examples("val", data_dir=tmp_path)
    assert next(examples)["label"] == 3
    next(examples)
    with pytest.raises(hellaswag.HellaSwagError, match=r"line 3\b") as err:
        next(examples)
    assert str(path) in str(err.value)


def test_download_uses_local_file_without_network(tmp_path, http_server, monkeypatch):
    monkeypatch.setattr(hellaswag, "URL", http_server.url + "/hellaswag_{split}.jsonl")
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    assert hellaswag.download("val", data_dir=tmp_path) == str(path)
    monkeypatch.setenv("HELLASWAG_DIR", str(tmp_path))
    assert hellaswag.download("val") == str(path)
    assert [e["label"] for e in hellaswag.iterate_examples("val")] == [3]
    assert http_server.seen == []


def test_download_from_a_real_server(tmp_path, http_server, monkeypatch):
    """The test split (it does not ship) downloaded over HTTP from a server on 127.0.0.1:
    the bytes served, in the data folder, and no second request once it is there."""
    body = (json.dumps(GOOD) + "\n").encode() * 3
    http_server.serve("/hellaswag_test.jsonl", body)
    monkeypatch.setattr(hellaswag, "URL", http_server.url + "/hellaswag_{split}.jsonl")
    folder = tmp_path / "data"
    path = hellaswag.download("test", data_dir=folder)
    assert path == str(folder / "hellaswag_test.jsonl") and open(path, "rb").read() == body
    assert sorted(os.listdir(folder)) == ["hellaswag_test.jsonl"]  # no temporary file left
    assert [e["label"] for e in hellaswag.iterate_examples("test", data_dir=folder)] == [3, 3, 3]
    assert hellaswag.download("test", data_dir=folder) == path and http_server.seen == ["/hellaswag_test.jsonl"]


@pytest.mark.parametrize("fault", ["refused", "404", "cut short"])
def test_a_failed_download_says_where_to_put_the_file_and_leaves_nothing(tmp_path, http_server,
                                                                        monkeypatch, fault):
    """Real faults: nothing listening, a 404, a connection that drops after half the bytes."""
    url = http_server.url
    if fault == "refused":
        url = f"http://127.0.0.1:{free_port()}"
    elif fault == "cut short":
        body = (json.dumps(GOOD) + "\n").encode() * 50
        http_server.serve("/hellaswag_test.jsonl", body[:len(body) // 2], length=len(body))
    monkeypatch.setattr(hellaswag, "URL", url + "/hellaswag_{split}.jsonl")
    folder = tmp_path / "data"
    monkeypatch.setenv("HELLASWAG_DIR", str(folder))
    with pytest.raises(hellaswag.HellaSwagError) as err:
        hellaswag.download("test")  # val ships with the repository; test does not
    msg = str(err.value)
    assert msg.startswith(f"cannot download {url}/hellaswag_test.jsonl (")
    assert "hellaswag_test.jsonl" in msg and str(folder) in msg and "HELLASWAG_DIR" in msg
    assert "\n" not in msg  # one line
    assert not folder.exists() or os.listdir(folder) == []  # nothing half-written


# -----------------------------------------------------------------------------
# rendering

def test_render_known_example():
    enc = fineweb.gpt2_encoding()
    tokens, mask, label = hellaswag.render_example(GOOD, enc)
    ctx = enc.encode(GOOD["ctx"])
    endings = [enc.encode(" " + e) for e in GOOD["endings"]]
    N = len(ctx) + max(len(e) for e in endings)
    assert label == 3
    assert tokens.shape == mask.shape == (4, N) and tokens.dtype == mask.dtype == torch.long
    for i, end in enumerate(endings):
        n = len(ctx) + len(end)
        assert tokens[i, :n].tolist() == ctx + end  # context, then " " + ending
        assert tokens[i, n:].tolist() == [0] * (N - n)  # right padding with zeros
        assert mask[i].tolist() == [0] * len(ctx) + [1] * len(end) + [0] * (N - n)
    # the text round-trips: the space belongs to the ending
    assert enc.decode(tokens[0, :len(ctx) + len(endings[0])].tolist()) == \
        GOOD["ctx"] + " " + GOOD["endings"][0]


def test_render_val_examples():
    enc = fineweb.gpt2_encoding()
    examples = list(hellaswag.iterate_examples("val"))[:50]
    for example, (tokens, mask, label) in zip(examples, val_rendered(50)):
        ctx = enc.encode(example["ctx"])
        assert label == example["label"]
        assert tokens[:, :len(ctx)].tolist() == [ctx] * 4 and mask[:, :len(ctx)].sum() == 0
        for i, ending in enumerate(example["endings"]):
            end = enc.encode(" " + ending)
            assert mask[i].sum() == len(end)
            assert tokens[i][mask[i].bool()].tolist() == end


@pytest.mark.slow
def test_all_val_examples_pad_to_192():
    """The one shape of every HellaSwag batch in training: the longest of the 10,042 val
    examples is 166 tokens, rounded up to a multiple of 32."""
    rendered = val_rendered(10042)
    assert len(rendered) == 10042
    assert max(tokens.size(1) for tokens, _, _ in rendered) == 166
    assert hellaswag.pad_length(rendered) == 192


# -----------------------------------------------------------------------------
# scoring: against a deliberately naive implementation

def naive_predict(model, tokens, mask):
    """One row at a time, each at its own length (no padding), float64, Python sums."""
    sums, means = [], []
    for row in range(4):
        ending = [t for t, m in enumerate(mask[row].tolist()) if m == 1]
        ids = tokens[row, :ending[-1] + 1]
        with torch.no_grad():
            logits, _ = model(ids[None])  # (1, T, V)
        # the logits at t-1 predict token t
        logp = torch.log_softmax(logits[0, [t - 1 for t in ending]].double(), dim=-1)
        total = 0.0
        for i, t in enumerate(ending):
            total += -logp[i, ids[t]].item()
        sums.append(total)
        means.append(total / len(ending))
    return sums.index(min(sums)), means.index(min(means)), sums, means


@pytest.mark.parametrize("vocab_size,n", [(1024, 300), (50257, 24)])
def test_score_matches_naive_implementation(vocab_size, n):
    model = tiny_model(vocab_size=vocab_size)
    rendered = fold(val_rendered(n), vocab_size)
    pred, pred_norm = all_preds(model, rendered, batch_size=16)
    expected, expected_norm, margins = [], [], []
    for tokens, mask, _ in rendered:
        p, pn, sums, means = naive_predict(model, tokens, mask)
        expected.append(p)
        expected_norm.append(pn)
        margins += [sorted(sums)[1] - sorted(sums)[0], sorted(means)[1] - sorted(means)[0]]
    assert min(margins) > 1e-4, "a near tie: predictions would depend on rounding"
    assert pred.tolist() == expected
    assert pred_norm.tolist() == expected_norm
    if n >= 100:
        assert len(set(pred_norm.tolist())) == 4  # the model is not stuck on one answer


def test_score_on_hand_made_logits():
    # two examples (8 rows), V = 3, L = 4; the context is token 0 of each row, and each
    # ending token t gets probability exp(-loss): row losses chosen so that acc and acc_norm
    # disagree. Example 0, rows: [3.0], [1.0, 1.4], [1.25, 1.25], [2.3]
    # -> sums 3.0, 2.4, 2.5, 2.3 (acc: row 3); means 3.0, 1.2, 1.25, 2.3 (acc_norm: row 1).
    # Example 1 is example 0 with its rows reversed: acc row 0, acc_norm row 2.
    row_losses = [[3.0], [1.0, 1.4], [1.25, 1.25], [2.3]]
    row_losses = row_losses + row_losses[::-1]
    torch.manual_seed(0)
    V, L = 3, 4
    tokens = torch.randint(0, V, (8, L))
    mask = torch.zeros(8, L, dtype=torch.long)
    logits = torch.randn(8, L, V) * 5  # anything at positions that are not scored
    for r, losses in enumerate(row_losses):
        for j, loss in enumerate(losses):
            t = 1 + j  # ending token t, predicted by the logits at t - 1
            mask[r, t] = 1
            p = torch.full((V,), (1 - torch.exp(torch.tensor(-loss)).item()) / (V - 1))
            p[tokens[r, t]] = torch.exp(torch.tensor(-loss))
            logits[r, t - 1] = p.log() + 7.0  # a constant shift does not change softmax
    pred, pred_norm = hellaswag.score(logits, tokens, mask)
    assert pred.tolist() == [3, 0] and pred_norm.tolist() == [1, 2]
    # bf16 logits are upcast: same answers
    pred, pred_norm = hellaswag.score(logits.bfloat16(), tokens, mask)
    assert pred.tolist() == [3, 0] and pred_norm.tolist() == [1, 2]


# -----------------------------------------------------------------------------
# batching and torch.compile

def test_batched_equals_unbatched():
    model = tiny_model(seed=1, vocab_size=1024)
    rendered = fold(val_rendered(200), 1024)
    one = all_preds(model, rendered, batch_size=1)
    # several examples per pass, a partial last batch (200 = 28 * 7 + 4), extra padding
    for kw in (dict(batch_size=16), dict(batch_size=7), dict(batch_size=8, seq_len=256)):
        batched = all_preds(model, rendered, **kw)
        assert batched[0].tolist() == one[0].tolist() and batched[1].tolist() == one[1].tolist(), kw
    labels = torch.tensor([label for _, _, label in rendered])
    expected = ((one[0] == labels).sum().item(), (one[1] == labels).sum().item(), 200)
    assert hellaswag.evaluate(model, rendered, "cpu", batch_size=16) == expected


def test_padding_passes_and_stopping(capsys):
    """Extra passes of padding change no count (every rank of a run makes as many passes);
    should_stop, asked after every pass, ends the evaluation there with None; the progress
    bar counts examples."""
    model = tiny_model(seed=1, vocab_size=1024)
    rendered = fold(val_rendered(20), 1024)
    passes = []
    plain = hellaswag.evaluate(model, rendered, "cpu", batch_size=8)
    padded = hellaswag.evaluate(model, rendered, "cpu", batch_size=8, num_batches=5,
                                should_stop=lambda: passes.append(1) or False)
    assert padded == plain and len(passes) == 5  # 3 real passes and 2 of padding only
    assert hellaswag.evaluate(model, [], "cpu", batch_size=8, seq_len=64, num_batches=2) == (0, 0, 0)
    passes.clear()
    stopped = hellaswag.evaluate(model, rendered, "cpu", batch_size=8, progress=True,
                                 should_stop=lambda: passes.append(1) or len(passes) == 2)
    assert stopped is None and len(passes) == 2
    err = capsys.readouterr().err
    assert "hellaswag" in err and "8/20" in err and "16/20" in err and "20/20" not in err


def test_sequence_longer_than_block_size_is_an_error():
    model = tiny_model()
    with pytest.raises(hellaswag.HellaSwagError, match="block_size"):
        list(hellaswag.predict(model, val_rendered(20), "cpu", seq_len=288))


@pytest.mark.slow
def test_compiled_model_compiles_once():
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    model = tiny_model(seed=2)
    rendered = val_rendered(20)
    expected = hellaswag.evaluate(model, rendered, "cpu", batch_size=8)
    counter = CompileCounterWithBackend("inductor")  # counts the frames dynamo compiles
    compiled = torch.compile(model, backend=counter, dynamic=False)
    # 20 examples in batches of 8: two full batches and a partial one, all the same shape
    assert hellaswag.evaluate(compiled, rendered, "cpu", batch_size=8) == expected
    # a second evaluation (the training loop's next one) reuses the compiled graph
    seq_len = hellaswag.pad_length(rendered)
    assert hellaswag.evaluate(compiled, rendered[:8], "cpu", batch_size=8, seq_len=seq_len) == \
        hellaswag.evaluate(model, rendered[:8], "cpu", batch_size=8, seq_len=seq_len)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"
    torch._dynamo.reset()


# -----------------------------------------------------------------------------
# the standalone script

def test_main_needs_exactly_one_model(capsys):
    for argv in (["-m", "gpt2", "--checkpoint", "x.pt"], []):
        assert hellaswag.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_main_prints_acc(monkeypatch, capsys):
    # -m gpt2 without Hugging Face: from_pretrained returns our tiny random model
    model = tiny_model(seed=3)
    monkeypatch.setattr(train_gpt2.GPT, "from_pretrained", classmethod(lambda cls, name: model))
    assert hellaswag.main(["-m", "gpt2", "-d", "cpu", "--limit", "10", "--batch_size", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    c, cn, n = hellaswag.evaluate(model, val_rendered(10), "cpu", batch_size=1)
    assert n == 10 and 0 < cn < 10
    assert out[-2:] == [f"acc: {c}/10 = {c / 10:.4f}", f"acc_norm: {cn}/10 = {cn / 10:.4f}"]
