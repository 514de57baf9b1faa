"""What a reader and a user of the scripts rely on: train_gpt2.py reads like the lecture's
file (its sections, its names, comments as dense as the lecture's in the loop), importing a
script runs nothing, and every option of every script says what it does and its default."""
import argparse
import dataclasses
import re

import pytest
from conftest import REPO, run

import train_gpt2

SCRIPTS = ["train_gpt2", "fineweb", "hellaswag", "sample", "bench", "export_hf", "plot_log", "bench_fineweb"]
LECTURE_LINES = 521  # the lecture's train_gpt2.py


def parts():
    lines = (REPO / "train_gpt2.py").read_text().splitlines()
    banner = next(i for i, line in enumerate(lines) if re.match(r"# Beyond the lecture", line))
    return lines[:banner - 1], lines  # the top part ends at the "# ===" line above the banner


def test_the_top_part_is_the_lectures_file():
    top, _ = parts()
    assert len(top) <= 1.3 * LECTURE_LINES, len(top)
    text = "\n".join(top)
    # its sections, in the lecture's order
    order = ["class CausalSelfAttention", "class MLP", "class Block", "class GPTConfig", "class GPT(",
             "def from_pretrained", "def configure_optimizers", "def load_tokens", "class DataLoaderLite",
             "def get_lr", "def train(", "ddp = int(os.environ.get", "model = GPT(GPTConfig(",
             "for step in range(", "= train_step(model"]
    positions = [text.index(s) for s in order]
    assert positions == sorted(positions)
    # the lecture's names, assigned where the lecture assigns them
    for name in ("ddp", "ddp_rank", "ddp_local_rank", "ddp_world_size", "master_process", "device",
                 "device_type", "grad_accum_steps", "model", "raw_model", "loss_accum", "last_step",
                 "t0", "t1", "dt", "tokens_per_sec", "total_batch_size", "B", "T", "enc",
                 "train_loader", "val_loader", "optimizer", "log_file", "xgen", "sample_rng"):
        assert re.search(rf"^\s+(\w+, )*{name}( |,).*=", text, re.M), name
    assert text.count("NANOGPT_SCALE_INIT") == 3
    # the model is the lecture's: no KV cache, no attention switch, five config fields
    assert [f.name for f in dataclasses.fields(train_gpt2.GPTConfig)] == [
        "block_size", "vocab_size", "n_layer", "n_head", "n_embd"]
    assert "kv_cache" not in text and "flash_attention" not in text


def test_the_loop_is_commented_like_the_lecture():
    top, _ = parts()
    start = next(i for i, line in enumerate(top) if line.startswith("def train("))
    body = [line.strip() for line in top[start:] if line.strip()]
    comments = sum(1 for line in body if "#" in line)  # whole-line and trailing comments
    code = sum(1 for line in body if not line.startswith("#"))
    assert comments * 3 >= code, (comments, code)


# What importing each script may pull in: none prints or starts anything, none imports the heavy
# optional packages; fineweb.py (and its --help) needs no torch and no trainer, hellaswag.py no
# tokenizer and no trainer. Checked in one fresh process, lightest script first.
HEAVY = {"tiktoken", "transformers", "datasets", "matplotlib", "requests", "wandb", "tensorboard",
         "torch.utils.tensorboard"}
IMPORT_CODE = """
import sys, io, contextlib
out = io.StringIO()
def pulled(names):
    return sorted(set(names) & set(sys.modules))
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    import fineweb
    print("fineweb", pulled(HEAVY | {"tqdm", "torch", "train_gpt2"}), file=sys.__stdout__)
    try:
        fineweb.main(["--help"])
    except SystemExit:
        pass
    print("fineweb --help", pulled({"torch", "train_gpt2"}), file=sys.__stdout__)
    out.seek(0), out.truncate()  # --help's text
    import hellaswag
    print("hellaswag", pulled(HEAVY | {"train_gpt2"}), file=sys.__stdout__)
    import SCRIPTS
    print("all", pulled(HEAVY), file=sys.__stdout__)
print("output", repr(out.getvalue()))
"""


@pytest.mark.slow
def test_importing_a_script_runs_nothing_and_is_cheap():
    code = IMPORT_CODE.replace("HEAVY", repr(HEAVY)).replace("import SCRIPTS", f"import {', '.join(SCRIPTS)}")
    p = run(["-c", code], script=None, timeout=120)
    assert p.stdout.splitlines() == ["fineweb []", "fineweb --help []", "hellaswag []", "all []",
                                     "output ''"], p.stdout + p.stderr


class Parser(Exception):
    """Raised with the parser a script's main() built, before it parses anything."""


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_says_what_it_does_and_its_default(script, monkeypatch):
    def capture(self, *args, **kwargs):
        raise Parser(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    module = __import__(script)
    with pytest.raises(Parser) as e:
        module.main([])
    parser = e.value.args[0]
    assert parser.description
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help and len(action.help) > 8, name
        assert "(default:" in action.help or "(required)" in action.help, (name, action.help)
        if "0|1" == action.metavar:  # a boolean shows its default as 0 or 1
            assert re.search(r"\(default: [01]\)", action.help), (name, action.help)
    reads_env = {"train_gpt2": ["HELLASWAG_DIR"], "hellaswag": ["HELLASWAG_DIR", "HF_ENDPOINT"],
                 "sample": ["HF_ENDPOINT"], "fineweb": ["HF_ENDPOINT", "HF_HUB_OFFLINE"]}
    for variable in reads_env.get(script, []):
        assert variable in (parser.epilog or ""), (script, variable)
