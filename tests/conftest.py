import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from omnimini import kernels
from omnimini.config import ModelConfig, MoEConfig, VisionConfig
from omnimini.model import OmniModel
from omnimini.tokenizer import Tokenizer

torch.set_num_threads(min(2, os.cpu_count() or 1))
# build (or load) omnimini's CPU kernels now, into the user's cache: a test that points OMNIMINI_CACHE elsewhere
# must not trigger a second build
kernels.available()

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared benchmark/training data folder; tests that need it skip when it is absent."""
    p = Path(os.environ.get("OMNIMINI_DATA", REPO.parent / "shared" / "data"))
    if not p.is_dir():
        pytest.skip(f"shared data folder not found at {p} (set OMNIMINI_DATA)")
    return p


@pytest.fixture(scope="session", autouse=True)
def _state_dir(tmp_path_factory):
    """Servers built by tests keep their state (stored responses) in a temporary folder, never in $HOME."""
    old = os.environ.get("OMNIMINI_STATE_DIR")
    os.environ["OMNIMINI_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    yield
    if old is None:
        os.environ.pop("OMNIMINI_STATE_DIR", None)
    else:
        os.environ["OMNIMINI_STATE_DIR"] = old


TEXT = "The quick brown fox jumps over the lazy dog. Omni models see images and read text. " * 40


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny MoE + vision checkpoint with its own trained tokenizer: dir/model, dir/red.png, dir/not_image.png."""
    d = tmp_path_factory.mktemp("ck")
    (d / "corpus.txt").write_text(TEXT)
    tok = Tokenizer.train([d / "corpus.txt"], vocab_size=300, show_progress=False)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, max_seq_len=96, moe=MoEConfig(num_experts=8, top_k=2,
                                                                          expert_intermediate=16),
                      vision=VisionConfig(image_size=32, patch_size=8, hidden_size=16, num_layers=1, num_heads=2,
                                          intermediate_size=32), image_token_id=tok.image_token_id)
    torch.manual_seed(0)
    OmniModel(cfg).save_pretrained(d / "model", tokenizer=tok)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(d / "red.png")
    (d / "not_image.png").write_bytes(b"hello, I am text")
    return d
