"""The first command of a newcomer, `python train_gpt2.py --demo`: offline, with what the
repository ships, it shows every stage of the real run, and every tool works on its checkpoint.
(A shorter demo than the real one, whose time and losses the README gives.)"""
import os

import pytest
from conftest import check_resumed, checkpoint_names, read_config, read_log, run

import train_gpt2

pytestmark = pytest.mark.slow  # every step is a subprocess


def test_the_demo_shows_every_stage_and_the_tools_work_on_its_checkpoint(tmp_path):
    data, log = str(tmp_path / "data_demo"), str(tmp_path / "log_demo")
    short = ["--data_root", data, "--log_dir", log, "--hellaswag_limit", "8", "--checkpoint_interval", "8"]
    p = run(["--demo", "--max_steps", "16", "--eval_interval", "8"] + short)
    # its data: tiny shakespeare's 338,026 tokens, as fineweb.py's shards, written on first use
    assert "wrote 11 shards, 338,026 tokens" in p.stdout
    assert sorted(os.listdir(data))[-2:] == ["edufineweb_val_000000.npy", "manifest.json"]
    # the demo's model and flags, under the flags given
    config = read_config(log)
    assert config["demo"] and (config["n_layer"], config["n_embd"], config["max_steps"]) == \
        (train_gpt2.DEMO["n_layer"], train_gpt2.DEMO["n_embd"], 16)
    # every stage: train loss at every step, val loss and HellaSwag at 0, 8 and 15, samples
    lines = read_log(log)
    assert [s for s, kind, _ in lines if kind == "train"] == list(range(16))
    assert [s for s, kind, _ in lines if kind == "val"] == [0, 8, 15]
    assert [s for s, kind, _ in lines if kind == "hella"] == [0, 8, 15]
    train = [v for _, kind, v in lines if kind == "train"]
    assert train[-1] < 0.85 * train[0], train  # the loss visibly falls, even in 16 steps
    assert p.stdout.count("rank 0 sample 0: Hello, I'm a language model,") == 2  # at steps 8 and 15
    assert checkpoint_names(log) == ["model_00008.pt", "model_00015.pt", "model_00016.pt"]
    assert os.path.getsize(os.path.join(log, "log.png")) > 10_000  # the plot, drawn at the end

    # a rerun of the same command finds the shards done; --resume auto continues the run
    p = run(["--demo", "--max_steps", "20", "--eval_interval", "8", "--resume", "auto"] + short)
    assert "already done: 11 shards" in p.stdout
    check_resumed(p.stdout, 16, f"{log}/model_00016.pt")
    assert [s for s, kind, _ in read_log(log) if kind == "train"] == list(range(20))

    # every tool, on the demo's trained weights
    ckpt = os.path.join(log, "model_00020.pt")
    p = run(["--checkpoint", ckpt, "--prompt", "ROMEO:", "--num_samples", "1", "--device", "cpu"],
            script="sample.py")
    assert p.stdout.startswith("sample 0: ROMEO:")
    p = run(["--checkpoint", ckpt, "--limit", "20", "-d", "cpu"], script="hellaswag.py")
    assert "acc_norm: " in p.stdout and "/20 = " in p.stdout
    p = run([log, "--out", str(tmp_path / "demo.png")], script="plot_log.py")
    assert "log_demo: min train loss" in p.stdout and (tmp_path / "demo.png").exists()
    p = run(["--checkpoint", ckpt, "--out", str(tmp_path / "demo-hf")], script="export_hf.py")
    assert (tmp_path / "demo-hf" / "tokenizer.json").exists() and "max |logit difference|" in p.stdout
