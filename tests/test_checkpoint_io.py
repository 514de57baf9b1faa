"""Checkpoint reads and writes: a resume maps the file (every rank of a node would otherwise
hold the whole checkpoint in memory), and the log says how long each save and load took."""
import os
import re

import pytest
from conftest import make_shards, tiny_args, tiny_checkpoint

import train_gpt2


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
def test_a_checkpoint_is_memory_mapped_not_read_whole(tmp_path):
    path, _ = tiny_checkpoint(tmp_path / "model_00010.pt")
    checkpoint = train_gpt2.load_checkpoint(path)
    with open("/proc/self/maps") as f:
        assert path in f.read()  # the tensors' storage is the file's pages
    assert checkpoint["step"] == 10


def test_saves_and_loads_say_how_long_they_took(tmp_path, capsys):
    data = make_shards(tmp_path / "data")
    log_dir = str(tmp_path / "log")
    assert train_gpt2.main(tiny_args(data, log_dir, max_steps=4)) == 0
    assert train_gpt2.main(tiny_args(data, log_dir, max_steps=6, resume="auto")) == 0
    out = capsys.readouterr().out
    saves = re.findall(r"^saved (\S+) \((\d+\.\d)s\)$", out, re.M)
    assert [os.path.basename(p) for p, _ in saves] == ["model_00003.pt", "model_00004.pt", "model_00005.pt",
                                                      "model_00006.pt"], out
    assert re.search(rf"^resumed from {re.escape(log_dir)}/model_00004.pt at step 4 \(loaded in \d+\.\ds\)$",
                     out, re.M), out
