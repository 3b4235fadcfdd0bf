"""Qwen2-VL and Qwen2.5-VL (native-resolution ViT with 2D rotary positions + patch merger + Qwen2 with M-RoPE): tiny
random transformers models, saved with their image processor config, loaded into OmniModel. Same pixel values and
image_grid_thw as transformers' Qwen2VLImageProcessorPil (images of different sizes, and ones past max_pixels /
under min_pixels), same prompt ids as Qwen2VLProcessor (one <|image_pad|> per merged patch), same logits on a
padded batch of two prompts whose images give different grids (<=1e-4; plain 1D RoPE in the text model is off by
more: the test would catch it), and the same 32 greedy tokens as transformers' generate after an image, through
generate() and through the engine with prefill chunks that cut the image (the rotary positions after an image are
max + 1, not the token count). Qwen2.5-VL adds RMSNorm, SwiGLU vision MLPs and window attention (the test checks
the windows matter)."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from test_weights_hf import byte_tokenizer  # noqa: E402
from vlm_inputs import image_messages, noise_images  # noqa: E402

from omnimini.engine.generate import GenRequest, generate  # noqa: E402
from omnimini.engine.sampling import SamplingParams  # noqa: E402
from omnimini.engine.scheduler import Engine, EngineRequest  # noqa: E402
from omnimini.model.qwen_vision import image_grid, patchify  # noqa: E402
from omnimini.runtime import encode_messages  # noqa: E402
from omnimini.weights.checkpoint import CheckpointError  # noqa: E402
from omnimini.weights.hf import load_hf  # noqa: E402

VOCAB, PATCH, MERGE, FRAMES = 300, 4, 2, 2
VSTART, VEND, PAD, VIDEO = 295, 296, 297, 298
MIN_PIXELS, MAX_PIXELS = 4 * 8 * 8, 80 * 80  # a grid of 2x2 .. ~10x10 merged tokens
# Qwen2-VL's own template, reduced: ChatML turns, <|vision_start|><|image_pad|><|vision_end|> for each image part
TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
            "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
            "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
            "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
            "{% endif %}")


def _write_tokenizer(d):
    fillers = [f"<|x{i}|>" for i in range(VSTART - 258)]
    tok = byte_tokenizer(["<|im_start|>", "<|im_end|>"] + fillers
                         + ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|endoftext|>"])
    assert tok.token_to_id("<|image_pad|>") == PAD and tok.get_vocab_size() == VOCAB
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                                         "chat_template": TEMPLATE}))


def _build(tmp_path_factory, family):
    T = transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp(family)
    # head_dim 16: 8 rotary frequencies in temporal / height / width sections
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    ids = dict(image_token_id=PAD, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    common = dict(depth=2, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=FRAMES)
    if family == "qwen2_vl":
        cfg = T.Qwen2VLConfig(text_config=text, vision_config=dict(embed_dim=32, hidden_size=64, mlp_ratio=2,
                                                                   **common), **ids)
        ref = T.Qwen2VLForConditionalGeneration
    else:  # windows of 16 px = 4 x 4 patches = 2 x 2 merged tokens; block 1 attends over the whole image
        cfg = T.Qwen2_5_VLConfig(text_config=text, vision_config=dict(
            hidden_size=32, intermediate_size=48, out_hidden_size=64, window_size=16, fullatt_block_indexes=[1],
            **common), **ids)
        ref = T.Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    ref = ref(cfg).eval()
    with torch.no_grad():  # make the norms, biases and the tower's weights matter
        for name, p in ref.named_parameters():
            if "norm" in name or "ln_q" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
            elif "visual" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ref.generation_config.eos_token_id = None
    ref.save_pretrained(d)
    _write_tokenizer(d)
    ip = Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=FRAMES,
                                  size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    ip.save_pretrained(d)
    hf_tok = T.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), pad_token="<|endoftext|>",
                                       eos_token="<|im_end|>")
    return ref, d, Processor(ip, hf_tok)


class Processor:
    """Qwen2VLProcessor's text side (transformers' own class needs a video processor, which needs torchvision):
    each <|image_pad|> becomes image_grid_thw.prod() / merge^2 of them, as its replace_image_token writes, and
    mm_token_type_ids marks them (M-RoPE's image tokens)."""

    def __init__(self, image_processor, tokenizer):
        self.image_processor, self.tokenizer = image_processor, tokenizer

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return self.tokenizer.apply_chat_template(messages, chat_template=TEMPLATE, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, text, images):
        out = self.image_processor(images=images, return_tensors="pt")
        grids = iter(out["image_grid_thw"].tolist())
        expanded = []
        for t in text:
            pieces = t.split("<|image_pad|>")
            expanded.append(pieces[0] + "".join("<|image_pad|>" * (int(np.prod(next(grids))) // MERGE ** 2) + p
                                                for p in pieces[1:]))
        enc = self.tokenizer(expanded, padding=True, return_tensors="pt")  # right padding
        return {**enc, "pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"],
                "mm_token_type_ids": (enc["input_ids"] == PAD).int()}


_BUILT: dict = {}


def _built(tmp_path_factory, family):
    if family not in _BUILT:
        _BUILT[family] = _build(tmp_path_factory, family)
    return _BUILT[family]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qwen(request, tmp_path_factory):
    return _built(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def qwen2vl(tmp_path_factory):
    return _built(tmp_path_factory, "qwen2_vl")


def _images():
    return noise_images((50, 70), (20, 33))


_messages = image_messages


TEXTS = ["Describe it.", "What is in this long picture, and what colour is it?"]


def test_pixels_prompt_and_logits_match_transformers(qwen):
    ref, d, processor = qwen
    model, tok = load_hf(d)
    v = model.config.vision
    family = ref.config.model_type
    assert model.config.arch == family and v.tower == "qwen2vl" and model.config.mrope_section == [2, 3, 3]
    assert (v.norm, v.mlp, v.window_size) == (("rms", "gated", 16) if family == "qwen2_5_vl" else ("layer", "fc", 0))
    images = _images()
    prompts = [processor.apply_chat_template(_messages(t)) for t in TEXTS]
    want = processor(prompts, images)
    ours = [encode_messages(model, tok, _messages(t, img)) for img, t in zip(images, TEXTS, strict=True)]
    start = 0
    for i, (ids, pixels) in enumerate(ours):
        n = int(want["attention_mask"][i].sum())
        assert ids == want["input_ids"][i, :n].tolist()  # one <|image_pad|> per merged patch, right padded
        assert len(pixels) == 1
        t, h, w = image_grid(pixels[0], v)
        assert [t, h * MERGE, w * MERGE] == want["image_grid_thw"][i].tolist()
        patches = patchify(pixels[0], PATCH, MERGE, FRAMES)
        torch.testing.assert_close(patches, want["pixel_values"][start: start + len(patches)], atol=1e-6, rtol=0)
        start += len(patches)
        assert ids.count(PAD) == h * w
    assert start == len(want["pixel_values"])
    assert want["image_grid_thw"][0].tolist() != want["image_grid_thw"][1].tolist()

    ids, mask = want["input_ids"], want["attention_mask"]
    assert int(mask[1].sum()) < ids.shape[1] or int(mask[0].sum()) < ids.shape[1]  # padded
    pixels = [p[0] for _, p in ours]
    with torch.no_grad():
        theirs = ref(**want).logits
        got = model(ids, attention_mask=mask, pixels=pixels).logits
        # the text model's rotary positions as plain token positions (no M-RoPE): not what the checkpoint computes
        plain = model(ids, attention_mask=mask, pixels=pixels, rope_positions=torch.arange(ids.shape[1])[None]
                      .expand(2, -1)).logits
    for i in range(2):
        n = int(mask[i].sum())
        torch.testing.assert_close(got[i, :n], theirs[i, :n], atol=1e-4, rtol=0)
        assert (plain[i, :n] - theirs[i, :n]).abs().max() > 1e-3
    if family == "qwen2_5_vl":  # the windows matter: every block over the whole image computes other logits
        v.window_size = 0
        with torch.no_grad():
            whole = model(ids, attention_mask=mask, pixels=pixels).logits
        v.window_size = 16
        assert (whole[0, : int(mask[0].sum())] - theirs[0, : int(mask[0].sum())]).abs().max() > 1e-3

    # a text-only prompt: M-RoPE's three coordinates are its positions, the plain rotary path
    text = torch.tensor([tok.encode_chat([{"role": "user", "content": TEXTS[1]}])])
    with torch.no_grad():
        torch.testing.assert_close(model(text).logits, ref(input_ids=text).logits, atol=1e-4, rtol=0)


def test_two_images_in_one_prompt(qwen):
    """The second image's coordinates start where the text after the first leaves off (both grids consumed in
    prompt order)."""
    ref, d, processor = qwen
    model, tok = load_hf(d)
    a, b = _images()
    messages = [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "and"},
                                             {"type": "image", "image": b}, {"type": "text", "text": "differ?"}]}]
    ids, pixels = encode_messages(model, tok, messages)
    bare = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
                                         {"type": "text", "text": "differ?"}]}]
    want = processor([processor.apply_chat_template(bare)], [a, b])
    assert ids == want["input_ids"][0].tolist() and len(pixels) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids]), pixels=pixels).logits, ref(**want).logits, atol=1e-4,
                                   rtol=0)


@pytest.mark.parametrize("hw", [(150, 90), (7, 12), (64, 64), (33, 200)])
def test_resize_to_the_processors_sizes(qwen2vl, hw):
    """smart_resize's three cases (rounded; scaled down past max_pixels; up under min_pixels): the same patches and
    grid as transformers' image processor."""
    _, d, processor = qwen2vl
    model, _ = load_hf(d)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (*hw, 3), dtype=np.uint8))
    from omnimini.images import image_inputs

    inputs = image_inputs([img], model.config.vision, "<|image_pad|>")
    want = processor.image_processor(images=[img], return_tensors="pt")
    t, h, w = image_grid(inputs.pixels[0], model.config.vision)
    assert [t, h * MERGE, w * MERGE] == want["image_grid_thw"][0].tolist()
    assert inputs.texts == ["<|image_pad|>" * (h * w)]
    torch.testing.assert_close(patchify(inputs.pixels[0], PATCH, MERGE, FRAMES), want["pixel_values"], atol=1e-6,
                               rtol=0)


def test_greedy_after_an_image_matches_transformers_generate(qwen):
    """32 greedy tokens after an image: the decode steps rotate by cache position + delta (max rotary position + 1
    after the prompt), through generate() and through the engine with prefill chunks that cut the image."""
    ref, d, processor = qwen
    model, tok = load_hf(d)
    img = _images()[0]
    prompt, pix = encode_messages(model, tok, _messages(TEXTS[1], img))
    want = processor([processor.apply_chat_template(_messages(TEXTS[1]))], [img])
    assert prompt == want["input_ids"][0].tolist()
    with torch.no_grad():
        out = ref.generate(**want, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0,
                           suppress_tokens=[PAD])
    theirs = out[0, len(prompt):].tolist()
    params = SamplingParams(temperature=0, max_tokens=32)
    greedy = generate(model, [GenRequest(prompt, params, pixels=pix)], eos_ids=[])[0]
    assert greedy == theirs
    assert len(set(greedy)) > 3
    # batched with a text-only prompt (its rotary positions stay its cache positions)
    text = tok.encode_chat([{"role": "user", "content": "Hello there"}])
    both = generate(model, [GenRequest(text, params), GenRequest(prompt, params, pixels=pix)], eos_ids=[])
    assert both[1] == theirs
    with torch.no_grad():
        alone = ref.generate(input_ids=torch.tensor([text]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                             pad_token_id=0, suppress_tokens=[PAD])
    assert both[0] == alone[0, len(text):].tolist()

    eng = Engine(model, tok, max_batch=2, prefill_chunk=prompt.index(PAD) + 5)
    try:
        res = eng.generate([EngineRequest(prompt, params, pixels=pix), EngineRequest(text, params)])
    finally:
        eng.shutdown()
    assert res[0].completions[0].token_ids == theirs
    assert res[1].completions[0].token_ids == both[0]


def test_quantized_decode_kernels_rotate_after_the_image(qwen2vl):
    """q8_0 blocks: single-token steps run omnimini's attention decode kernel (rotary, cache write and attention in
    one op; Qwen2's q/k/v biases keep the whole-layer kernel out), which takes the model's own rotary angles: the
    cached greedy tokens after an image are those of recomputing the whole sequence each step."""
    from omnimini import kernels
    from omnimini.engine.quant import quantize_model

    if not kernels.available():
        pytest.skip("omnimini's CPU kernels are not available here")
    _, d, _ = qwen2vl
    model, tok = load_hf(d)
    quantize_model(model, "q8_0")
    prompt, pix = encode_messages(model, tok, _messages(TEXTS[1], _images()[0]))
    cached = generate(model, [GenRequest(prompt, SamplingParams(temperature=0, max_tokens=12), pixels=pix)],
                      eos_ids=[])[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor([seq]), pixels=pix).logits[0, -1]
            logits[PAD] = float("-inf")
            seq.append(int(logits.argmax()))
    assert cached == seq[len(prompt):]


def test_bad_qwen2vl_checkpoints_are_named(qwen2vl, tmp_path):
    from test_weights_llava import assert_needs_preprocessor

    _, d, _ = qwen2vl
    assert_needs_preprocessor(d, tmp_path)
    p = json.loads((d / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**p, "patch_size": 14}))
    with pytest.raises(CheckpointError, match="patch_size=14 does not match the vision tower's 4"):
        load_hf(tmp_path)
    shutil.copy(d / "preprocessor_config.json", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["rope_parameters"]["mrope_section"] = [2, 2, 2]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mrope_section \[2, 2, 2\] must be 3 counts summing to head_dim/2"):
        load_hf(tmp_path)


def test_hub_layout_config_loads_the_same(qwen2vl, tmp_path):
    """Checkpoints written before transformers 5 keep the text settings at the top level and call the rope
    {type: mrope}; they load to the same model."""
    _, d, _ = qwen2vl
    for f in d.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((d / "config.json").read_text())
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    text.pop("model_type")
    flat = {**cfg, **text, "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
    (tmp_path / "config.json").write_text(json.dumps(flat))
    a, _ = load_hf(d)
    b, _ = load_hf(tmp_path)
    assert a.config == b.config


def test_saved_as_omnimini_checkpoint_round_trips(qwen, tmp_path):
    """The loaded model saved in omnimini's own format (its config keeps the tower and M-RoPE options) gives the
    same logits with images."""
    from omnimini.model.model import OmniModel

    _, d, _ = qwen
    model, tok = load_hf(d)
    model.save_pretrained(tmp_path, tokenizer=tok)
    again = OmniModel.from_pretrained(tmp_path)
    assert again.config == model.config
    ids, pixels = encode_messages(model, tok, _messages(TEXTS[0], _images()[1]))
    with torch.no_grad():
        torch.testing.assert_close(again(torch.tensor([ids]), pixels=pixels).logits,
                                   model(torch.tensor([ids]), pixels=pixels).logits, atol=0, rtol=0)


def test_served_with_an_image_through_the_openai_client(qwen2vl):
    openai = pytest.importorskip("openai")
    from test_server import png_url
    from test_weights_llava import ask_served

    ref, d, processor = qwen2vl
    img = Image.new("RGB", (40, 30), (200, 30, 30))
    resp = ask_served(openai, d, png_url(40, 30, (200, 30, 30)), "What colour?", max_context=128)
    inputs = processor([processor.apply_chat_template(_messages("What colour?"))], [img])
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                           suppress_tokens=[PAD])
    want = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert resp.choices[0].message.content == want
