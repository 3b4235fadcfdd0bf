"""torchrun + FSDP2 on CPU (gloo): 2 processes match one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest

from omnimini.train.tiny import tiny_config, tiny_tokenizer, write_corpus


def run(args, env):
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def test_two_process_fsdp_matches_single_process(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    tiny_tokenizer(corpus, tmp_path / "tok")
    # global batch 4 sequences: one process with 2 micro-batches of 2, or two processes with 1 micro-batch of 2
    for name, accum in [("single", 2), ("dist", 1)]:
        conf = tiny_config(tmp_path / name, tmp_path / "tok", corpus, steps=3, grad_accum=accum, threads=1,
                           save_every=2)
        (tmp_path / f"{name}.json").write_text(json.dumps(conf))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run([sys.executable, "-m", "omnimini.train.cli", str(tmp_path / "single.json"), "--quiet"], env)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "omnimini.train.cli", str(tmp_path / "dist.json"), "--quiet"], env)
    logs = {n: [json.loads(x) for x in open(tmp_path / n / "log.jsonl")] for n in ("single", "dist")}
    assert len(logs["dist"]) == 3  # only rank 0 writes the log
    for a, b in zip(logs["single"], logs["dist"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
        assert a["expert_load"] == b["expert_load"]
    # the FSDP run saved full (unsharded) weights in the foundation format, loadable in one process
    from omnimini.model.model import OmniModel

    m = OmniModel.from_pretrained(tmp_path / "dist" / "checkpoints" / "step_000003")
    assert m.config.num_layers == 2
    rep = json.loads((tmp_path / "dist" / "report.json").read_text())
    assert rep["world_size"] == 2 and rep["global_batch"] == 4
