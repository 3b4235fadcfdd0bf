"""Recipes end to end: a fast tiny pipeline (default run) and the CI-sized nano-ci recipe (slow)."""

import json

import pytest
import torch

from omnimini.train.recipe import find_recipe, run_recipe
from omnimini.train.tiny import TINY_MODEL, write_corpus


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_tiny_pipeline_tokenizer_pretrain_sft_eval(tmp_path):
    """Every stage type wired together on a tiny vision MoE; a second run skips finished stages."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    model = {**TINY_MODEL, "vocab_size": 512, "max_seq_len": 256,
             "vision": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                        "intermediate_size": 64, "pixel_shuffle": 2}}
    recipe = {"name": "tiny", "threads": 1, "progress": False, "stages": [
        {"name": "tok", "type": "tokenizer", "files": [str(corpus)], "scene_texts": 50, "vocab_size": 512},
        {"name": "pre", "model": model, "seq_len": 64, "micro_batch_size": 2, "steps": 3, "warmup_steps": 1,
         "data": [{"kind": "text", "paths": [str(corpus)]}, {"kind": "scenes", "scene_kind": "caption"}]},
        {"name": "sft", "init_from": "pre", "seq_len": 256, "micro_batch_size": 2, "steps": 2, "warmup_steps": 0,
         "loss_norm": "sample", "data": [{"kind": "scenes", "families": ["qa"], "qa_format": "mc"}]},
        {"name": "eval", "type": "scene_eval", "model": "sft", "n": 4, "qa_format": "mc", "blind_control": True},
        {"name": "cloze", "type": "scene_eval", "model": "sft", "n": 3, "mode": "loglik"},
    ]}
    res = run_recipe(recipe, out_dir=str(tmp_path / "run"))
    assert res["pre"]["steps"] == 3 and res["pre"]["unigram_entropy"] > 0
    assert res["sft"]["steps"] == 2 and res["sft"]["checkpoint"].endswith("step_000002")
    assert res["eval"]["n"] == 4 and 0 <= res["eval"]["accuracy"] <= 1 and 0.2 < res["eval"]["chance"] <= 0.5
    assert res["eval"]["blind"]["blind"] and res["eval"]["blind"]["n"] == 4
    assert json.loads((tmp_path / "run" / "recipe_report.json").read_text())["eval"]["n"] == 4
    assert res["cloze"]["n"] == 3 and res["cloze"]["blind"]["format"] == "mc-loglik-blind"
    assert res["cloze"]["mismatched"]["format"] == "mc-loglik-mismatched"
    mtime = (tmp_path / "run" / "pre" / "report.json").stat().st_mtime
    run_recipe(recipe, out_dir=str(tmp_path / "run"))  # finished stages are skipped
    assert (tmp_path / "run" / "pre" / "report.json").stat().st_mtime == mtime


def test_recipe_files_parse():
    from omnimini.train.config import TrainConfig, read_config_file
    from omnimini.train.recipe import _stage_dicts
    from omnimini.train.vision_warmup import VisionWarmupConfig

    want = {"nano-ci": ["tokenizer", "train", "train"],
            # the fixed nano recipe: the tower warmed up alone, then frozen through alignment and SFT
            "nano": ["tokenizer", "train", "vision_warmup", "train", "train"]}
    for name, head in want.items():
        d = read_config_file(find_recipe(name))
        stages = _stage_dicts(d)
        kinds = [s["type"] for s in stages]
        assert kinds[: len(head)] == head and set(kinds[len(head):]) == {"scene_eval"}
        for s in stages:
            body = {k: v for k, v in s.items() if k not in ("name", "type")}
            if s["type"] == "train":
                cfg = TrainConfig.from_dict(body)
                if name == "nano" and s.get("init_from") in ("vision_warmup", "align"):
                    assert cfg.vision_lr_mult == 0.0, s["name"]
            elif s["type"] == "vision_warmup":
                VisionWarmupConfig.from_dict(body)


@pytest.mark.slow
def test_nano_ci_recipe_learns(shared_data, tmp_path):
    """The CI-sized run (a few minutes on 2 cores): pre-training loss falls well below the unigram entropy and
    scene QA (multiple choice, held-out EVAL_SEEDS) scores clearly above chance after instruction tuning.
    The goal is also a clear margin over the blank-image control (the model looks at the image); at this budget
    it is not reached yet (recipes/README.md), so that check is an expected failure until it is."""
    res = run_recipe("nano-ci", out_dir=str(tmp_path / "nano-ci"), data_dir=str(shared_data),
                     overrides=["progress=false"])
    pre, qa, gen = res["pretrain"], res["eval_qa"], res["eval_qa_generate"]
    print(json.dumps({"pretrain": pre, "eval_qa": qa, "eval_qa_generate": gen}))
    assert pre["final_loss"] < pre["unigram_entropy"] - 1.0
    assert qa["n"] == 200 and qa["accuracy"] > qa["chance"] + 0.1
    assert qa["blind"]["n"] == 200 and gen["blind"]["n"] == 200  # both controls ran
    gap = qa["accuracy"] - max(qa["blind"]["accuracy"], qa["mismatched"]["accuracy"])
    if gap < 0.15:
        pytest.xfail(f"no visual grounding at CI size: {qa['accuracy']:.3f} with the image, "
                     f"{qa['blind']['accuracy']:.3f} with a blank one, {qa['mismatched']['accuracy']:.3f} with "
                     "another scene's")


def _tiny_vision_model(tmp_path):
    """(tokenizer, config, model): a random tiny omni model with a 32 px vision encoder."""
    from omnimini.config import ModelConfig
    from omnimini.model.model import OmniModel
    from omnimini.train.tiny import tiny_tokenizer

    tok = tiny_tokenizer(write_corpus(tmp_path / "c.txt"), tmp_path / "tok")
    cfg = ModelConfig.from_dict({**TINY_MODEL, "vision": {"image_size": 32, "patch_size": 8, "hidden_size": 32,
                                                          "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
                                                          "pixel_shuffle": 2}, "image_token_id": tok.image_token_id})
    torch.manual_seed(0)
    return tok, cfg, OmniModel(cfg).eval()


def test_choice_logprobs_match_separate_scoring(tmp_path):
    """Batched, right-padded option scoring equals scoring each option on its own."""
    from omnimini.train.scene_eval import choice_logprobs

    tok, cfg, model = _tiny_vision_model(tmp_path)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "The cat sat?"}]}]
    prompt = tok.encode_chat(msgs, image_tokens=cfg.vision.tokens_per_image)
    pixels = torch.randn(1, 3, 32, 32)
    choices = ["the mat", "a log", "five"]
    scores = choice_logprobs(model, tok, prompt, pixels, choices)
    for c, s in zip(choices, scores, strict=True):
        cont = tok.encode(c) + [tok.token_to_id("<|im_end|>")]
        with torch.no_grad():
            logp = model(torch.tensor([prompt + cont]), pixels=pixels).logits[0].log_softmax(-1)
        ref = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(cont))
        assert s == pytest.approx(ref, abs=1e-4)


def test_batched_choice_logprobs_match_one_item_at_a_time(tmp_path):
    """Scoring several questions' options in one padded forward (images encoded once) equals scoring each alone."""
    from omnimini.train.scene_eval import batch_choice_logprobs, choice_logprobs

    tok, cfg, model = _tiny_vision_model(tmp_path)
    items = []
    for text, choices in (("The cat sat?", ["the mat", "a log"]), ("Where did the dog run to today?",
                                                                     ["home", "the big park", "five", "away"])):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        items.append((tok.encode_chat(msgs, image_tokens=cfg.vision.tokens_per_image), torch.randn(1, 3, 32, 32),
                      choices))
    batched = batch_choice_logprobs(model, tok, items)
    for (prompt, pixels, choices), got in zip(items, batched, strict=True):
        assert got == pytest.approx(choice_logprobs(model, tok, prompt, pixels, choices), abs=1e-4)


def test_cloze_controls_show_blank_or_another_scenes_image(tmp_path, monkeypatch):
    """The controls keep each question and options and change only the image: blank, or the next scene's
    (every question gets a wrong image, every image is still shown once)."""
    from omnimini.data.scene_samples import eval_pixels
    from omnimini.data.scenes.qa import QAFamily
    from omnimini.data.scenes.tasks import EVAL_SEEDS
    from omnimini.train import scene_eval

    tok, cfg, model = _tiny_vision_model(tmp_path)
    seen = {}

    def record(model, tok, items):
        seen.setdefault("items", []).extend(items)
        return [[0.0] * len(choices) for _, _, choices in items]

    monkeypatch.setattr(scene_eval, "batch_choice_logprobs", record)
    short = QAFamily(cfg.vision.image_size, "short")
    real = [eval_pixels(short.episode(EVAL_SEEDS[i]), cfg.vision.image_size) for i in range(5)]
    runs = {}
    for control in ("none", "blind", "mismatched"):
        seen.clear()
        res = scene_eval.evaluate_scenes_loglik(model, tok, n=5, batch_size=2, blind=control == "blind",
                                                mismatched=control == "mismatched")
        runs[control] = seen["items"]
        assert res["n"] == 5
    assert res["format"] == "mc-loglik-mismatched"
    for i in range(5):
        prompt, px, choices = runs["none"][i]
        assert torch.equal(px, real[i])
        assert runs["blind"][i][0] == prompt and runs["blind"][i][2] == choices and not runs["blind"][i][1].any()
        assert runs["mismatched"][i][0] == prompt and runs["mismatched"][i][2] == choices
        assert torch.equal(runs["mismatched"][i][1], real[(i + 1) % 5]) and not torch.equal(real[i], real[(i + 1) % 5])
    with pytest.raises(ValueError, match="n >= 2"):
        scene_eval.evaluate_scenes_loglik(model, tok, n=1, mismatched=True)


def test_image_tokens_cannot_collapse_to_a_shared_vector():
    """A projector that learned a large constant output (the "sink" a from-scratch LM drives it to) still gives
    different images different tokens: the component all of an image's tokens share is removed."""
    from omnimini.config import VisionConfig
    from omnimini.model.vision import VisionEncoder

    torch.manual_seed(0)
    enc = VisionEncoder(VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                                     intermediate_size=64, pixel_shuffle=2), lm_hidden=48)
    with torch.no_grad():
        enc.proj_fc2.bias.fill_(100.0)  # a shared vector 1000x larger than the content
        a, b = enc(torch.rand(2, 3, 32, 32) * 2 - 1).unbind(0)
    assert (a - b).norm() > 0.2 * a.norm()
