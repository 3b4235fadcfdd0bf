"""ModelStep (the model part of a training step): eager and torch.compile agree on a tiny MoE model."""

import pytest
import torch

from omnimini.config import ModelConfig, MoEConfig
from omnimini.model.model import OmniModel
from omnimini.train.config import TrainConfig
from omnimini.train.dist import DistInfo
from omnimini.train.trainer import ModelStep


def tiny() -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=64, max_seq_len=32, qk_norm="head",
                       moe=MoEConfig(num_experts=4, top_k=2, expert_intermediate=16, first_k_dense=1))


def batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (2, 16))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    return {"input_ids": ids, "labels": labels, "positions": torch.arange(16).expand(2, 16), "pixels": None,
            "weights": torch.full((2,), 1 / 30)}


def run(compile_: bool, steps: int = 2) -> list[dict]:
    torch.manual_seed(0)
    step = ModelStep(OmniModel(tiny()), TrainConfig(seq_len=16, micro_batch_size=2, steps=10, warmup_steps=0,
                                                    compile=compile_), DistInfo())
    return [step([batch()]) for _ in range(steps)]


def test_eager_step_matches_plain_autograd_loss():
    torch.manual_seed(0)
    ref = OmniModel(tiny())
    b = batch()
    want = ref(b["input_ids"], labels=b["labels"]).lm_loss
    got = run(False, 1)[0]
    assert got["loss"] == pytest.approx(float(want.detach()), rel=1e-5)
    assert sum(map(sum, got["expert_load"])) == 2 * 16 * 2  # tokens x top_k in the one MoE layer


@pytest.mark.slow
def test_compiled_step_matches_eager():
    eager, comp = run(False), run(True)
    for e, c in zip(eager, comp, strict=True):
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-4)
        assert c["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-3)
        assert c["expert_load"] == e["expert_load"]


def test_nonfinite_gradient_stops_before_the_update():
    """A finite loss with a NaN gradient (as cuDNN's bf16 attention backward once produced) must not reach
    the optimizer: the step raises and every weight keeps its value."""
    from omnimini.train.trainer import TrainError

    torch.manual_seed(0)
    model = OmniModel(tiny())
    step = ModelStep(model, TrainConfig(seq_len=16, micro_batch_size=2, steps=10, warmup_steps=0), DistInfo())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.blocks[0].attn.q_proj.weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(TrainError, match="gradient norm became nan"):
        step([batch()])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
