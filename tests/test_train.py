"""Training loop: resume equivalence, atomic checkpoints, schedule, weight-decay groups, config errors, learning."""

import errno
import json

import pytest
import torch

from omnimini.config import ConfigError
from omnimini.model.model import OmniModel
from omnimini.train import state as S
from omnimini.train.config import TrainConfig
from omnimini.train.optim import lr_factor, param_groups
from omnimini.train.recipe import apply_overrides, run_recipe
from omnimini.train.tiny import TINY_MODEL, tiny_config, tiny_tokenizer, write_corpus
from omnimini.train.trainer import Trainer, train


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()  # the tiny configs ask for 1 intra-op thread; give the others theirs back
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    corpus = write_corpus(d / "corpus.txt")
    tiny_tokenizer(corpus, d / "tok")
    return d, corpus


def cfg(setup, name, **kw) -> TrainConfig:
    d, corpus = setup
    return TrainConfig.from_dict(tiny_config(d / name, d / "tok", corpus, **kw))


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in open(run_dir / "log.jsonl")]


def test_resume_continues_exactly(setup):
    d, _ = setup
    full = cfg(setup, "full", steps=6, model_overrides={"moe": {"bias_update_rate": 0.01}})
    train(full, resume=False)
    half = cfg(setup, "half", steps=6, model_overrides={"moe": {"bias_update_rate": 0.01}})
    r1 = train(half, resume=False, stop_after=3)
    assert r1["steps"] == 3 and S.latest_checkpoint(d / "half" / "checkpoints").name == "step_000003"
    with open(d / "half" / "log.jsonl", "a") as f:  # a step logged after the checkpoint, then a crash
        f.write(json.dumps({"step": 4, "loss": 99.0}) + "\n")
    r2 = train(half)  # resume="auto" picks up step 3
    assert r2["steps"] == 6 and r2["steps_this_run"] == 3
    assert losses(d / "half") == losses(d / "full")  # bit-identical loss curve
    a = OmniModel.from_pretrained(d / "full" / "checkpoints" / "step_000006")
    b = OmniModel.from_pretrained(d / "half" / "checkpoints" / "step_000006")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), k
    assert a.blocks[0].mlp.router.selection_bias.abs().sum() > 0  # aux-loss-free bias was updated and saved


def test_log_has_moe_stats_and_report(setup):
    d, _ = setup
    rep = train(cfg(setup, "stats", steps=2, eval_every=1, val_data=[{"kind": "text", "paths": [str(setup[1])]}]),
                resume=False)
    rec = json.loads(open(d / "stats" / "log.jsonl").readline())
    assert len(rec["expert_load"]) == 2 and len(rec["expert_load"][0]) == 4
    assert sum(rec["expert_load"][0]) == 2 * 2 * 2 * 32  # top-2 of every token in the global batch
    assert rec["aux_loss"] > 0 and rec["z_loss"] > 0 and rec["val_loss"] > 0
    assert rec["tok_per_s"] > 0 and 0 < rec["mfu"]
    assert rep["val_loss"] is not None and (d / "stats" / "report.md").read_text().startswith("# Training report")


def test_failed_save_keeps_previous_checkpoint(setup, monkeypatch):
    d, _ = setup
    c = cfg(setup, "disk", steps=4)
    train(c, resume=False, stop_after=2)
    ck = d / "disk" / "checkpoints"

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(S.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        train(c)
    monkeypatch.undo()
    assert S.latest_checkpoint(ck).name == "step_000002"
    assert not list(ck.glob(".tmp-*"))
    tr = Trainer(c)
    assert tr.resume() and tr.step == 2


def test_schedule_and_decay_groups():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    mid = lr_factor(55, 10, 100, 0.1)
    assert 0.1 < mid < 1.0 and mid == pytest.approx(0.1 + 0.9 * 0.5)
    from omnimini.config import ModelConfig

    model = OmniModel(ModelConfig.from_dict(dict(TINY_MODEL)))
    decay, no_decay = param_groups(model, 0.1)[:2]
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert "embed.weight" in nd and all("norm" in n or n == "embed.weight" for n in nd)
    assert any("gate_up" in names[id(p)] for p in decay["params"]) and decay["weight_decay"] == 0.1


def test_config_errors(setup):
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        cfg(setup, "bad", model_overrides={"num_heads": 3}).model_config()
    with pytest.raises(ConfigError, match="top_k"):
        cfg(setup, "bad", model_overrides={"moe": {"top_k": 9}}).model_config()
    with pytest.raises(ConfigError, match="unknown training config keys"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ConfigError, match="warmup_steps"):
        TrainConfig(steps=3, warmup_steps=5)
    with pytest.raises(ConfigError, match="vocab_size"):
        Trainer(cfg(setup, "bad", model_overrides={"vocab_size": 100}))
    with pytest.raises(ConfigError, match="override"):
        apply_overrides({}, ["steps"])


def test_tiny_run_learns_below_unigram_entropy(setup):
    """The fast variant of the CI run: the loss drops well below the unigram entropy of the corpus."""
    d, corpus = setup
    conf = tiny_config(d / "learn", d / "tok", corpus, steps=40, lr=1e-2, warmup_steps=4)
    res = run_recipe(conf, overrides=["progress=false"], resume=False)["train"]
    assert res["unigram_entropy"] > 3.0
    assert res["final_loss"] < 0.6 * res["unigram_entropy"], res
