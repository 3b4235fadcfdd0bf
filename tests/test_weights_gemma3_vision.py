"""Gemma 3 vision-language (SigLIP tower + average-pooling projector + Gemma 3 text model): a tiny random
transformers model, saved with its image processor config, loaded into OmniModel's vision encoder + projector.
Same pixel values as transformers' Gemma 3 image processor, same prompt ids as its processor ("\\n\\n<start_of_image>"
+ soft tokens + "<end_of_image>\\n\\n"), same logits on a padded batch with images (<=1e-4: the soft tokens of one
image attend to each other both ways, text stays causal), same 32 greedy tokens, chunked prefill in the engine
never splitting an image, and served through the openai client."""

import json
import shutil

import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from test_weights_hf import byte_tokenizer  # noqa: E402
from vlm_inputs import image_messages, noise_images  # noqa: E402

from omnimini.engine.generate import GenRequest, generate  # noqa: E402
from omnimini.engine.sampling import SamplingParams  # noqa: E402
from omnimini.engine.scheduler import Engine, EngineRequest  # noqa: E402
from omnimini.runtime import encode_messages  # noqa: E402
from omnimini.weights.checkpoint import CheckpointError  # noqa: E402
from omnimini.weights.hf import load_hf  # noqa: E402

VOCAB, SIZE, PATCH, MM_TOKENS = 300, 32, 4, 4  # an 8 x 8 patch grid pooled 4 x 4 -> 2 x 2 = 4 soft tokens
BOI, EOI, SOFT = 296, 297, 298
SPECIALS = ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
# Gemma 3's own template, reduced: turns, and <start_of_image> for each image part
TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
            "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
            "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
            "{{ '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}"
            "{% endif %}")


def _write_tokenizer(d):
    fillers = [f"<|x{i}|>" for i in range(BOI - 256 - len(SPECIALS))]
    tok = byte_tokenizer(SPECIALS + fillers + ["<start_of_image>", "<end_of_image>", "<image_soft_token>", "<x>"])
    assert tok.token_to_id("<image_soft_token>") == SOFT and tok.get_vocab_size() == VOCAB
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<end_of_turn>", "pad_token": "<pad>",
                                                         "bos_token": "<bos>", "chat_template": TEMPLATE}))


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    T = transformers
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    from transformers.models.siglip.configuration_siglip import SiglipVisionConfig

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("gemma3")
    # sliding layers with a window shorter than the prompts, so the window and the image blocks meet
    text = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=24,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                            query_pre_attn_scalar=16, max_position_embeddings=512, initializer_range=0.02)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=SIZE, patch_size=PATCH, vision_use_head=False)
    cfg = T.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=MM_TOKENS,
                         boi_token_index=BOI, eoi_token_index=EOI, image_token_index=SOFT)
    torch.manual_seed(0)
    ref = T.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # make the norms, biases and the tower's weights matter
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
            elif "vision_tower" in name or "multi_modal_projector" in name:
                p.add_(torch.randn_like(p) * 0.3)
    ref.generation_config.eos_token_id = None
    ref.save_pretrained(d)
    _write_tokenizer(d)
    ip = Gemma3ImageProcessorPil(size={"height": SIZE, "width": SIZE})
    ip.save_pretrained(d)
    hf_tok = T.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), pad_token="<pad>",
                                       bos_token="<bos>", eos_token="<end_of_turn>",
                                       extra_special_tokens={"boi_token": "<start_of_image>",
                                                             "eoi_token": "<end_of_image>",
                                                             "image_token": "<image_soft_token>"})
    processor = T.Gemma3Processor(image_processor=ip, tokenizer=hf_tok, chat_template=TEMPLATE,
                                  image_seq_length=MM_TOKENS)
    return ref, d, processor


def _images():
    return noise_images((50, 70), (20, 33))


_messages = image_messages


def test_pixels_prompt_logits_and_greedy_match_transformers(gemma3):
    ref, d, processor = gemma3
    model, tok = load_hf(d)
    v = model.config.vision
    assert model.config.arch == "gemma3" and v.projector == "gemma3" and v.tokens_per_image == MM_TOKENS
    assert model.config.image_attention == "bidirectional"
    images = _images()
    texts = ["Describe it.", "What is in this long picture, and what colour is it?"]
    prompts = [processor.apply_chat_template(_messages(t), add_generation_prompt=True) for t in texts]
    want = processor(text=prompts, images=[[images[0]], [images[1]]], padding=True, return_tensors="pt")
    ours = [encode_messages(model, tok, _messages(t, img)) for img, t in zip(images, texts, strict=True)]
    for i, (ids, pixels) in enumerate(ours):
        n = int(want.attention_mask[i].sum())
        assert ids == want.input_ids[i, :n].tolist()  # the processor's expansion, right padded
        torch.testing.assert_close(pixels[0], want.pixel_values[i], atol=1e-5, rtol=0)
    assert ours[0][0].count(SOFT) == MM_TOKENS and BOI in ours[0][0] and EOI in ours[0][0]

    ids, mask = want.input_ids, want.attention_mask
    assert int(mask[0].sum()) < ids.shape[1] and ids.shape[1] > 24  # padded, and longer than the window
    pixels = torch.cat([p for _, p in ours])
    with torch.no_grad():
        theirs = ref(**want).logits
        got = model(ids, attention_mask=mask, pixels=pixels).logits
    for i in range(2):
        n = int(mask[i].sum())
        torch.testing.assert_close(got[i, :n], theirs[i, :n], atol=1e-4, rtol=0)
    # the image's soft tokens really see each other both ways: causal-only attention changes the logits
    model.config.image_attention = "causal"
    with torch.no_grad():
        causal = model(ids, attention_mask=mask, pixels=pixels).logits
    model.config.image_attention = "bidirectional"
    assert (causal[0, : int(mask[0].sum())] - theirs[0, : int(mask[0].sum())]).abs().max() > 1e-3

    prompt, pix = ours[1]
    params = SamplingParams(temperature=0, max_tokens=32)
    greedy = generate(model, [GenRequest(prompt, params, pixels=pix)], eos_ids=[])[0]
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor([prompt]), pixel_values=pix,
                           token_type_ids=(torch.tensor([prompt]) == SOFT).long(), max_new_tokens=32,
                           min_new_tokens=32, do_sample=False, pad_token_id=0, suppress_tokens=[SOFT])
    assert greedy == out[0, len(prompt):].tolist()
    assert len(set(greedy)) > 3

    # the engine's chunked prefill: a chunk that would end inside the image runs to its end instead (a split
    # image's first tokens would never see its last ones)
    eng = Engine(model, tok, max_batch=1, prefill_chunk=prompt.index(SOFT) + 2)
    try:
        res = eng.generate([EngineRequest(prompt, params, pixels=pix)])
    finally:
        eng.shutdown()
    assert res[0].completions[0].token_ids == greedy


def test_bad_gemma3_configs_are_named(gemma3, tmp_path):
    from test_weights_llava import assert_needs_preprocessor

    _, d, _ = gemma3
    assert_needs_preprocessor(d, tmp_path)
    shutil.copy(d / "preprocessor_config.json", tmp_path)  # (pan-and-scan: test_gemma3_pan_and_scan.py)
    cfg = json.loads((d / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "mm_tokens_per_image": 3}))
    with pytest.raises(CheckpointError, match="3 image tokens do not pool a 8 x 8 patch grid"):
        load_hf(tmp_path)


def test_served_with_an_image_through_the_openai_client(gemma3):
    openai = pytest.importorskip("openai")
    from test_server import png_url
    from test_weights_llava import ask_served

    ref, d, processor = gemma3
    img = Image.new("RGB", (40, 30), (200, 30, 30))
    resp = ask_served(openai, d, png_url(40, 30, (200, 30, 30)), "What colour?", max_context=128)
    prompt = processor.apply_chat_template(_messages("What colour?"), add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[[img]], return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                           suppress_tokens=[SOFT])
    want = processor.tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    assert resp.choices[0].message.content == want


def test_gguf_model_and_gemma3_mmproj_give_the_hf_load(gemma3, tmp_path):
    """llama.cpp's layout: the Gemma 3 text model as model.gguf + the tower and projector as mmproj.gguf
    (projector type gemma3); loaded with --mmproj they give the HF directory's logits on the padded batch."""
    pytest.importorskip("gguf")
    from gguf_from_hf import assert_same_inputs_and_logits, vocab_of, write_gguf_from_hf, write_mmproj_from_gemma3

    from omnimini.runtime import load_for_inference
    from omnimini.weights.gguf_loader import GGUFError
    from omnimini.weights.gguf_mmproj import attach_mmproj

    ref, d, processor = gemma3
    # this model's own layer pattern (llama.cpp's default is five sliding layers, then a global one)
    vocab = vocab_of(d / "tokenizer.json", TEMPLATE, "<bos>", "<end_of_turn>", lambda w: w.add_array(
        "gemma3.attention.sliding_window_pattern", [True, True, False]))

    lm = transformers.Gemma3ForCausalLM(ref.config.text_config).eval()
    state = {"model." + k: v for k, v in ref.model.language_model.state_dict().items()}
    lm.load_state_dict({**state, "lm_head.weight": ref.lm_head.weight})
    model_path = write_gguf_from_hf(tmp_path / "model.gguf", lm, tokenizer_fn=vocab)
    mm = write_mmproj_from_gemma3(tmp_path / "mmproj.gguf", ref)
    model, tok = load_for_inference(str(model_path), quantize="none", mmproj=str(mm))
    assert model.config.image_attention == "bidirectional" and model.config.image_token_id == SOFT
    hf_model, hf_omni_tok = load_hf(d)
    images = _images()
    texts = ["Describe it.", "What is in this long picture, and what colour is it?"]
    ours = [encode_messages(model, tok, _messages(t, img)) for img, t in zip(images, texts, strict=True)]
    want = [encode_messages(hf_model, hf_omni_tok, _messages(t, img)) for img, t in zip(images, texts, strict=True)]
    assert_same_inputs_and_logits(model, hf_model, ours, want)
    # without the scale-factor key: clip.cpp's default, 4 (this model's too); a factor that does not fit is named
    m2, t2 = load_for_inference(str(model_path), quantize="none")
    attach_mmproj(m2, t2, write_mmproj_from_gemma3(tmp_path / "nokey.gguf", ref, scale_factor_key=False))
    assert m2.config.vision.pixel_shuffle == 4 and m2.config.vision.tokens_per_image == MM_TOKENS
    m3, t3 = load_for_inference(str(model_path), quantize="none")
    with pytest.raises(GGUFError, match="8 x 8 patch grid does not pool by scale_factor 3"):
        attach_mmproj(m3, t3, write_mmproj_from_gemma3(tmp_path / "bad.gguf", ref, scale_factor=3))
