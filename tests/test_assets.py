"""The repository stands alone: the files it ships (assets/) are the ones its README lists, the
tokenizer built from them is tiktoken's "gpt2" id for id, a damaged one stops a script in one
line, and HF_ENDPOINT (a Hugging Face mirror, for what cannot ship) reaches the libraries that
download."""
import gzip
import hashlib
import re
import shutil

import pytest
from conftest import ASSETS, make_shards, one_line_error, run, tiny_args

import fineweb
import hellaswag
import train_gpt2

# a text that exercises the pre-tokenizer: Unicode, runs of spaces, tabs and newlines, digits,
# contractions, punctuation runs, trailing whitespace, and "<|endoftext|>" written as text
VARIED = ("Hello world!  Two  spaces,   three;\ttab\t\tand\n\n\nnewlines.\r\n"
          "Naïve café — “quotes” ‘single’ ✨ 日本語テキスト 한국어 العربية עברית Ελληνικά 🤖🤖🤖\n"
          "it's we'll they've I'm you'd she's DON'T 12345 3.14159 1,000,000 0x1F $100 #tag @user\n"
          "a literal <|endoftext|> is just text <|endoftext|>\n"
          "def f(x):\n    return x**2  # a comment\n\n\n   \n  trailing spaces   ")


def test_every_shipped_file_is_listed_with_its_size_and_sha256():
    readme = (ASSETS / "README.md").read_text()
    rows = {m.group(1): (int(m.group(2).replace(",", "")), m.group(3)) for m in
            re.finditer(r"^\| `([^`]+)` \| ([\d,]+) \| `([0-9a-f]{64})` \|", readme, re.M)}
    assert rows and set(rows) == set(fineweb.ASSET_SHA256)
    for name, (size, sha256) in rows.items():
        data = (ASSETS / name).read_bytes()
        assert len(data) == size, name
        assert hashlib.sha256(data).hexdigest() == sha256 == fineweb.ASSET_SHA256[name], name
        assert (ASSETS / name).parent.joinpath("LICENSE").is_file(), name
    # the HellaSwag val set unpacks to the file of github.com/rowanz/hellaswag, byte for byte
    val = gzip.decompress((ASSETS / "hellaswag" / "hellaswag_val.jsonl.gz").read_bytes())
    assert hashlib.sha256(val).hexdigest() == \
        "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"


def test_the_tokenizer_is_tiktokens_gpt2(tiktoken_gpt2):
    enc = fineweb.gpt2_encoding()
    assert (enc.n_vocab, enc.eot_token) == (tiktoken_gpt2.n_vocab, tiktoken_gpt2.eot_token) == (50257, 50256)
    text = VARIED * 3
    ids = enc.encode_ordinary(text)
    assert len(ids) > 300
    assert ids == tiktoken_gpt2.encode_ordinary(text)
    assert enc.encode(text, disallowed_special=()) == tiktoken_gpt2.encode(text, disallowed_special=())
    assert enc.encode(text, allowed_special="all") == tiktoken_gpt2.encode(text, allowed_special="all")
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.decode(ids) == text
    # shakespeare, the demo's corpus, end to end (fineweb's workers encode to numpy)
    shakespeare = (ASSETS / "tinyshakespeare" / "input.txt").read_text()
    assert enc.encode_to_numpy(shakespeare).tolist() == tiktoken_gpt2.encode_ordinary(shakespeare)


@pytest.fixture
def damaged_assets(tmp_path, monkeypatch):
    """A copy of assets/ in which one byte in the middle of encoder.json is flipped, in use."""
    copy = tmp_path / "assets"
    shutil.copytree(ASSETS, copy)
    path = copy / "gpt2" / "encoder.json"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    monkeypatch.setattr(fineweb, "ASSETS", copy)
    return path


def test_a_damaged_tokenizer_file_stops_every_script_in_one_line(damaged_assets, tmp_path, capsys):
    with pytest.raises(fineweb.AssetError, match="encoder.json is damaged"):
        fineweb.gpt2_encoding()
    # the trainer, in process (fineweb.ASSETS points at the damaged copy)
    data = make_shards(tmp_path / "data")
    assert train_gpt2.main(tiny_args(data, str(tmp_path / "log"), max_steps=1)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {damaged_assets} is damaged" in err, err
    assert "git checkout -- assets" in err
    # fineweb.py
    (tmp_path / "doc.txt").write_text("some text")
    with pytest.raises(SystemExit) as e:
        fineweb.main(["--data_files", str(tmp_path / "doc.txt"), "--local_dir", str(tmp_path / "out")])
    assert "encoder.json is damaged" in str(e.value.code) and "\n" not in str(e.value.code)


def test_a_damaged_hellaswag_file_is_one_line(tmp_path, monkeypatch):
    copy = tmp_path / "assets"
    shutil.copytree(ASSETS, copy)
    path = copy / "hellaswag" / "hellaswag_val.jsonl.gz"
    path.write_bytes(path.read_bytes()[:1000])  # cut short
    monkeypatch.setattr(fineweb, "ASSETS", copy)
    with pytest.raises(hellaswag.HellaSwagError) as e:
        next(hellaswag.iterate_examples("val"))
    assert f"{path} is damaged" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_hf_endpoint_reaches_datasets_and_transformers(http_server, tmp_path):
    """A stand-in for a Hugging Face mirror that has nothing: each library asks it, and fails."""
    url, paths = http_server.url, http_server.seen
    env = {"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    # fineweb.py asks the mirror for FineWeb-Edu (through datasets), which it lacks
    p = run(["--max_tokens", "1000", "--local_dir", str(tmp_path / "shards")], script="fineweb.py",
            env=env, check=False, timeout=120)
    one_line_error(p, "cannot load HuggingFaceFW/fineweb-edu", "HF_ENDPOINT")
    assert any("HuggingFaceFW/fineweb-edu" in path for path in paths), paths
    # sample.py -m gpt2 asks it for OpenAI's weights (through transformers)
    paths.clear()
    p = run(["-m", "gpt2", "--device", "cpu"], script="sample.py", env=env, check=False, timeout=120)
    one_line_error(p, "cannot load gpt2 from Hugging Face", "HF_ENDPOINT")
    assert any(path.startswith(("/gpt2/", "/api/models/gpt2")) for path in paths), paths
