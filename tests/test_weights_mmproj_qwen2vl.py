"""llama.cpp's layout for Qwen2-VL / Qwen2.5-VL: the tiny random models of test_weights_qwen2vl written as
model.gguf (architecture qwen2vl: Qwen2 + rope.dimension_sections) and mmproj.gguf (projector types
qwen2vl_merger / qwen2.5vl_merger, convert_hf_to_gguf.py's tensor names: the Conv3d cut into two frames, qkv in
three) with gguf's writer. Loaded with --mmproj they are the HF load: same prompt ids and pixels, logits on a padded
batch with two images of different grids within 1e-4 (the tower is the one QwenVisionEncoder), the same 32 greedy
tokens as transformers' generate; a file that does not fit its model is refused naming both sizes."""

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gguf_from_hf import vocab_of, write_mmproj_from_qwen2vl, write_qwen2vl_gguf  # noqa: E402
from test_weights_qwen2vl import (  # noqa: E402
    FRAMES,
    MAX_PIXELS,
    MERGE,
    MIN_PIXELS,
    PAD,
    PATCH,
    TEMPLATE,
    TEXTS,
    _built,
    _images,
    _messages,
)

from omnimini.engine.generate import GenRequest, generate  # noqa: E402
from omnimini.engine.sampling import SamplingParams  # noqa: E402
from omnimini.model.qwen_vision import patchify  # noqa: E402
from omnimini.runtime import encode_messages, load_for_inference  # noqa: E402
from omnimini.weights.gguf_loader import GGUFError, load_gguf  # noqa: E402
from omnimini.weights.gguf_mmproj import attach_mmproj  # noqa: E402
from omnimini.weights.hf import load_hf  # noqa: E402


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def vl(request, tmp_path_factory):
    """(transformers model, its HF directory, its processor), built once per session with test_weights_qwen2vl."""
    return _built(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def vl2(tmp_path_factory):
    return _built(tmp_path_factory, "qwen2_vl")


def _files(qwen, out, **kw):
    ref, d, _ = qwen
    lm = write_qwen2vl_gguf(out / "model.gguf", ref, vocab_of(d / "tokenizer.json", TEMPLATE, None, "<|im_end|>"))
    mm = write_mmproj_from_qwen2vl(out / "mmproj.gguf", ref, pixels=(MIN_PIXELS, MAX_PIXELS), **kw)
    return lm, mm


def test_model_and_mmproj_give_the_hf_load(vl, tmp_path):
    ref, d, processor = vl
    lm, mm = _files(vl, tmp_path)
    model, tok = load_for_inference(str(lm), quantize="none", mmproj=str(mm))
    hf_model, hf_tok = load_hf(d)
    assert model.config.mrope_section == hf_model.config.mrope_section == [2, 3, 3]
    assert model.config.image_token_id == PAD and tok.image_token == "<|image_pad|>"
    # the same tower, described the same way (the HF load's image_size / max_grid / preprocessing included), up
    # to the float32 the file stores its eps and image mean / std in
    import dataclasses

    approx = ("norm_eps", "image_mean", "image_std")
    v, hv = model.config.vision, hf_model.config.vision
    assert dataclasses.replace(v, **{k: getattr(hv, k) for k in approx}) == hv
    for k in approx:
        assert getattr(v, k) == pytest.approx(getattr(hv, k), rel=1e-7)
    assert type(model.vision) is type(hf_model.vision)
    hf_state = hf_model.vision.state_dict()
    for k, t in model.vision.state_dict().items():
        torch.testing.assert_close(t, hf_state[k], atol=0, rtol=0)

    images = _images()
    ours = [encode_messages(model, tok, _messages(t, img)) for img, t in zip(images, TEXTS, strict=True)]
    want = processor([processor.apply_chat_template(_messages(t)) for t in TEXTS], images)
    ids, mask = want["input_ids"], want["attention_mask"]
    start = 0
    for i, (row, pixels) in enumerate(ours):
        assert row == ids[i, : int(mask[i].sum())].tolist()
        hf_row, hf_pixels = encode_messages(hf_model, hf_tok, _messages(TEXTS[i], images[i]))
        assert row == hf_row
        torch.testing.assert_close(pixels[0], hf_pixels[0], atol=1e-6, rtol=0)
        patches = patchify(pixels[0], PATCH, MERGE, FRAMES)  # transformers' own pixel_values
        torch.testing.assert_close(patches, want["pixel_values"][start: start + len(patches)], atol=1e-6, rtol=0)
        start += len(patches)
    pixels = [p[0] for _, p in ours]
    with torch.no_grad():
        got = model(ids, attention_mask=mask, pixels=pixels).logits
        hf = hf_model(ids, attention_mask=mask, pixels=pixels).logits
        theirs = ref(**want).logits
    for i in range(2):
        n = int(mask[i].sum())
        print(f"{ref.config.model_type}: max |gguf - hf load| {(got[i, :n] - hf[i, :n]).abs().max():.2e}, "
              f"max |gguf - transformers| {(got[i, :n] - theirs[i, :n]).abs().max():.2e}")
        torch.testing.assert_close(got[i, :n], hf[i, :n], atol=1e-5, rtol=0)
        torch.testing.assert_close(got[i, :n], theirs[i, :n], atol=1e-4, rtol=0)

    # 32 greedy tokens after an image: transformers' generate on the processor's inputs
    prompt, pix = ours[1]
    one = processor([processor.apply_chat_template(_messages(TEXTS[1]))], [images[1]])
    with torch.no_grad():
        out = ref.generate(**one, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0,
                           suppress_tokens=[PAD])
    greedy = generate(model, [GenRequest(prompt, SamplingParams(temperature=0, max_tokens=32), pixels=pix)],
                      eos_ids=[])[0]
    assert greedy == out[0, len(prompt):].tolist() and len(set(greedy)) > 3


def test_file_defaults_are_clip_cpps(vl, tmp_path):
    """Without the pixel-range and window keys (what the converter writes): clip.cpp's 8..4096 tokens and, for
    Qwen2.5-VL, its 112 px window; the full-attention layers from n_wa_pattern."""
    ref, d, _ = vl
    lm = write_qwen2vl_gguf(tmp_path / "model.gguf", ref, vocab_of(d / "tokenizer.json", TEMPLATE, None,
                                                                    "<|im_end|>"))
    mm = write_mmproj_from_qwen2vl(tmp_path / "bare.gguf", ref, window_key=False)
    model, tok = load_gguf(lm, progress=False)
    attach_mmproj(model, tok, mm)
    v = model.config.vision
    assert (v.min_pixels, v.max_pixels) == (8 * 8 * 8, 4096 * 8 * 8)
    if ref.config.model_type == "qwen2_5_vl":
        assert v.window_size == 112 and v.full_attention_layers == (1,) and v.mlp == "gated"
    else:
        assert v.window_size == 0 and v.act == "quick_gelu" and v.norm == "layer"


def test_mismatched_mmproj_is_named(vl2, tmp_path):
    ref, d, _ = vl2
    lm, good = _files(vl2, tmp_path)
    bad = write_mmproj_from_qwen2vl(tmp_path / "narrow.gguf", ref, drop_out_rows=8)
    model, tok = load_gguf(lm, progress=False)
    with pytest.raises(GGUFError, match="hidden size mismatch: the mmproj gives 56-wide image tokens but the "
                                        "language model's hidden size is 64"):
        attach_mmproj(model, tok, bad)
    # a Qwen2-VL projector on a language model without M-RoPE
    from gguf_from_hf import write_gguf_from_hf

    text = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    plain = write_gguf_from_hf(tmp_path / "qwen2.gguf", text, tokenizer_fn=vocab_of(d / "tokenizer.json", TEMPLATE,
                                                                                      None, "<|im_end|>"))
    model, tok = load_gguf(plain, progress=False)
    with pytest.raises(GGUFError, match="needs the qwen2vl language model .* not a qwen2 one"):
        attach_mmproj(model, tok, good)


def test_served_with_mmproj(vl2, tmp_path):
    """`omnimini serve --model model.gguf --mmproj mmproj.gguf` answers an image request as transformers does."""
    openai = pytest.importorskip("openai")
    from PIL import Image
    from test_server import png_url
    from test_weights_llava import ask_served

    ref, _, processor = vl2
    lm, mm = _files(vl2, tmp_path)
    resp = ask_served(openai, lm, png_url(40, 30, (200, 30, 30)), "What colour?", max_context=128, mmproj=str(mm))
    inputs = processor([processor.apply_chat_template(_messages("What colour?"))], [Image.new("RGB", (40, 30),
                                                                                              (200, 30, 30))])
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                           suppress_tokens=[PAD])
    want = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert resp.choices[0].message.content == want
