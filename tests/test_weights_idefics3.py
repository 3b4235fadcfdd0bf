"""Idefics3 / SmolVLM (SigLIP tower + pixel shuffle + linear projector + Llama, images split into tiles): a tiny
random transformers model, saved with its image processor config, loaded into OmniModel's vision encoder +
projector. Same pixel values as transformers' Idefics3 image processor, same prompt ids as its processor (tiles
framed by <fake_token_around_image>, <row_r_col_c>, <global-img>), same logits on a padded batch with images
(≤1e-4), same 32 greedy tokens, and served through the openai client."""

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_weights_hf import byte_tokenizer, write_tokenizer  # noqa: E402
from vlm_inputs import image_messages, noise_images  # noqa: E402

from omnimini.config import ConfigError, ModelConfig, VisionConfig  # noqa: E402
from omnimini.engine.generate import GenRequest, generate  # noqa: E402
from omnimini.engine.sampling import SamplingParams  # noqa: E402
from omnimini.images import image_inputs, split_tiles  # noqa: E402
from omnimini.model import OmniModel  # noqa: E402
from omnimini.runtime import encode_messages  # noqa: E402
from omnimini.weights.checkpoint import CheckpointError  # noqa: E402
from omnimini.weights.hf import load_hf  # noqa: E402
from omnimini.weights.hf_idefics3 import position_ids  # noqa: E402

IMAGE_TOKEN, VOCAB, TILE, PATCH = 299, 300, 32, 4
SEQ = (TILE // PATCH // 2) ** 2  # 16 tokens per tile after the 2x2 pixel shuffle
SPECIALS = ["</s>", "<end_of_utterance>", "<fake_token_around_image>", "<global-img>"] + \
    [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
# SmolVLM's own template: content parts, one <image> per image part
TEMPLATE = ("<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
            "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
            "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
            "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
            "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def _images():
    # 2x2 tiles + global, 1x2 + global (a wide one), and one smaller than a tile (enlarged, then split too)
    return noise_images((50, 70), (20, 70), (12, 9))


def _write_tokenizer(d):
    fillers = [f"<|x{i}|>" for i in range(IMAGE_TOKEN - 256 - len(SPECIALS))]
    tok = byte_tokenizer(SPECIALS + fillers + ["<image>"])
    assert tok.token_to_id("<image>") == IMAGE_TOKEN
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<end_of_utterance>", "pad_token": "</s>",
                                                         "chat_template": TEMPLATE}))


@pytest.fixture(scope="module")
def idefics3(tmp_path_factory):
    T = transformers
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("idefics3")
    vision = T.Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=TILE, patch_size=PATCH)
    text = T.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.15,
                         max_position_embeddings=512)
    torch.manual_seed(0)
    ref = T.Idefics3ForConditionalGeneration(T.Idefics3Config(vision_config=vision, text_config=text, scale_factor=2,
                                                              image_token_id=IMAGE_TOKEN)).eval()
    with torch.no_grad():  # make the norms, biases and the tower's weights matter
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
            elif "vision_model" in name or "connector" in name:
                p.mul_(5.0)
    ref.generation_config.eos_token_id = None
    ref.save_pretrained(d)
    _write_tokenizer(d)
    image_processor = T.models.idefics3.image_processing_pil_idefics3.Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * TILE}, max_image_size={"longest_edge": TILE})
    image_processor.save_pretrained(d)
    hf_tok = T.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), eos_token="<end_of_utterance>",
                                       pad_token="</s>")
    processor = T.Idefics3Processor(image_processor=image_processor, tokenizer=hf_tok, image_seq_len=SEQ,
                                    chat_template=TEMPLATE)
    return ref, d, processor


_messages = image_messages


def test_tiles_pixels_prompt_logits_and_greedy_match_transformers(idefics3):
    ref, d, processor = idefics3
    model, tok = load_hf(d)
    v = model.config.vision
    assert model.config.arch == "idefics3" and v.projector == "linear" and v.tokens_per_image == SEQ
    images = _images()
    assert [split_tiles(img, v)[1:] for img in images] == [(2, 2), (1, 2), (2, 2)]

    texts = ["Describe it.", "What is in this long picture?"]
    prompts = [processor.apply_chat_template(_messages(t), add_generation_prompt=True) for t in texts]
    want = processor(text=prompts, images=[[images[0]], [images[1]]], padding=True, return_tensors="pt")
    ours = [encode_messages(model, tok, [{"role": "user", "content": [{"type": "image", "image": img},
                                                                      {"type": "text", "text": t}]}])
            for img, t in zip(images[:2], texts, strict=True)]
    # the processor's prompt: the framing tokens and <image> x 16 per tile, tile by tile
    for i, (ids, _) in enumerate(ours):
        n = int(want.attention_mask[i].sum())
        assert ids == want.input_ids[i, :n].tolist()
    # its pixels: 5 and 3 tiles, the second sample padded with an all-zero tile the model drops
    assert want.pixel_values.shape == (2, 5, 3, TILE, TILE)
    torch.testing.assert_close(ours[0][1], want.pixel_values[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[1][1], want.pixel_values[1, :3], atol=1e-5, rtol=0)
    # the image smaller than a tile is enlarged and split as the processor does
    alone = processor.image_processor(images[2], return_tensors="pt").pixel_values[0]
    torch.testing.assert_close(image_inputs([images[2]], v, "<image>").pixels, alone, atol=1e-5, rtol=0)

    ids, mask = want.input_ids, want.attention_mask
    assert int(mask[1].sum()) < ids.shape[1]  # a padded batch
    pixels = torch.cat([ours[0][1], ours[1][1]])
    with torch.no_grad():
        theirs = ref(**want).logits
        got = model(ids, attention_mask=mask, pixels=pixels).logits
    for i in range(2):
        n = int(mask[i].sum())
        torch.testing.assert_close(got[i, :n], theirs[i, :n], atol=1e-4, rtol=0)

    prompt, pix = ours[1]
    params = SamplingParams(temperature=0, max_tokens=32)
    greedy = generate(model, [GenRequest(prompt, params, pixels=pix)], eos_ids=[])[0]
    with torch.no_grad():  # omnimini never samples the image placeholder; neither may transformers here
        out = ref.generate(input_ids=torch.tensor([prompt]), pixel_values=pix[None], max_new_tokens=32,
                           min_new_tokens=32, do_sample=False, pad_token_id=0, suppress_tokens=[IMAGE_TOKEN])
    assert greedy == out[0, len(prompt):].tolist()
    assert len(set(greedy)) > 3  # not a constant run


def test_unsplit_images_match_the_processor(idefics3):
    _, d, processor = idefics3
    ip = transformers.models.idefics3.image_processing_pil_idefics3.Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * TILE}, max_image_size={"longest_edge": TILE}, do_image_splitting=False)
    v = VisionConfig(image_size=TILE, patch_size=PATCH, pixel_shuffle=2, resize="tiles", resample="lanczos",
                     max_edge=2 * TILE, positions="1d", projector="linear", image_prompt="idefics3")
    inputs = image_inputs(_images()[:2], v, "<image>")
    torch.testing.assert_close(inputs.pixels, ip(_images()[:2], return_tensors="pt").pixel_values[0],
                               atol=1e-5, rtol=0)
    assert inputs.texts == ["<fake_token_around_image><global-img>" + "<image>" * SEQ + "<fake_token_around_image>"] * 2


def test_position_ids_follow_transformers_bucketing():
    """transformers' float32 bucketing does not always give patch i position i; the loader gathers the table."""
    T = transformers
    captured = {}
    for n in (8, 19, 25):
        emb = T.models.idefics3.modeling_idefics3.Idefics3VisionEmbeddings(
            T.Idefics3VisionConfig(hidden_size=8, image_size=n * 2, patch_size=2))
        emb.position_embedding.register_forward_hook(lambda m, i, o: captured.update(ids=i[0]))
        emb(torch.zeros(1, 3, 2 * n, 2 * n), torch.ones(1, n, n, dtype=torch.bool))
        assert torch.equal(position_ids(n), captured["ids"][0])
    assert not torch.equal(position_ids(19), torch.arange(19 * 19))


def test_linear_projector_and_tile_options():
    v = VisionConfig(image_size=16, patch_size=4, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
                     pixel_shuffle=2, positions="1d", projector="linear", act="gelu_tanh", resize="tiles",
                     split_images=True, max_edge=32)
    m = OmniModel(ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                              intermediate_size=32, vision=v, image_token_id=63))
    assert m.vision.proj_fc2 is None and m.vision.proj_fc1.bias is None
    assert m.encode_images(torch.zeros(3, 3, 16, 16)).shape == (3, 4, 16)
    for bad in ({"split_images": True}, {"projector": "linear2"}, {"resample": "nearest"},
                {"image_prompt": "qwen"}, {"resize": "tiles", "max_edge": 0}):
        with pytest.raises(ConfigError):
            ModelConfig(vision=VisionConfig(**bad))


def test_missing_preprocessor_config_and_framing_tokens_are_named(idefics3, tmp_path):
    from test_weights_llava import assert_needs_preprocessor

    _, d, _ = idefics3
    assert_needs_preprocessor(d, tmp_path)
    shutil.copy(d / "preprocessor_config.json", tmp_path)
    write_tokenizer(tmp_path, VOCAB)  # a vocabulary without <fake_token_around_image> and friends
    with pytest.raises(CheckpointError, match="lacks <fake_token_around_image>, <global-img>, <row_1_col_1>"):
        load_hf(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_image_size": {"longest_edge": 48}}))
    with pytest.raises(CheckpointError, match="longest_edge=48 does not match the vision tower's image_size 32"):
        load_hf(tmp_path)
    assert cfg["model_type"] == "idefics3"


def test_gguf_model_and_idefics3_mmproj_give_the_hf_load(idefics3, tmp_path):
    """llama.cpp's layout: the Llama text model as model.gguf + the SigLIP tower and connector as mmproj.gguf
    (projector type idefics3). With the processor's longest edge in the file: the same tiles, prompt ids and
    pixels as the HF directory, and its logits on a padded batch with images; without it (an older converter):
    one whole-image tile, as older llama.cpp reads it; a scale factor that does not fit the connector is named."""
    pytest.importorskip("gguf")
    from gguf_from_hf import assert_same_inputs_and_logits, vocab_of, write_gguf_from_hf, write_mmproj_from_idefics3

    from omnimini.runtime import load_for_inference
    from omnimini.weights.gguf_loader import GGUFError
    from omnimini.weights.gguf_mmproj import attach_mmproj

    ref, d, _ = idefics3
    lm = transformers.LlamaForCausalLM(ref.config.text_config).eval()
    lm.load_state_dict({**{"model." + k: v for k, v in ref.model.text_model.state_dict().items()},
                        "lm_head.weight": ref.lm_head.weight})
    vocab = vocab_of(d / "tokenizer.json", TEMPLATE, None, "<end_of_utterance>")
    model_path = write_gguf_from_hf(tmp_path / "model.gguf", lm, tokenizer_fn=vocab)
    mm = write_mmproj_from_idefics3(tmp_path / "mmproj.gguf", ref, preproc_size=2 * TILE)
    model, tok = load_for_inference(str(model_path), quantize="none", mmproj=str(mm))
    v = model.config.vision
    assert (v.projector, v.split_images, v.max_edge, v.tokens_per_image) == ("linear", True, 2 * TILE, SEQ)
    hf_model, hf_tok = load_hf(d)
    images, texts = _images()[:2], ["Describe it.", "What is in this long picture?"]

    def encode(m, t, img, text):
        return encode_messages(m, t, [{"role": "user", "content": [{"type": "image", "image": img},
                                                                  {"type": "text", "text": text}]}])

    ours = [encode(model, tok, img, t) for img, t in zip(images, texts, strict=True)]
    want = [encode(hf_model, hf_tok, img, t) for img, t in zip(images, texts, strict=True)]
    assert [p.shape[0] for _, p in ours] == [5, 3]  # 2x2 and 1x2 tiles + the whole image
    assert_same_inputs_and_logits(model, hf_model, ours, want)

    m2, t2 = load_for_inference(str(model_path), quantize="none")
    attach_mmproj(m2, t2, write_mmproj_from_idefics3(tmp_path / "old.gguf", ref, scale_factor_key=False))
    assert m2.config.vision.pixel_shuffle == 2 and not m2.config.vision.split_images  # scale read off mm.model.fc
    ids2, px2 = encode(m2, t2, images[0], "Describe it.")
    assert px2.shape[0] == 1 and ids2.count(IMAGE_TOKEN) == SEQ
    m3, t3 = load_for_inference(str(model_path), quantize="none")
    with pytest.raises(GGUFError, match="mm.model.fc takes 128 features, not the tower's 32 x scale_factor 3"):
        attach_mmproj(m3, t3, write_mmproj_from_idefics3(tmp_path / "bad.gguf", ref, scale_factor=3))


def test_served_with_an_image_through_the_openai_client(idefics3):
    """`omnimini serve --model idefics3_dir`: the image becomes its tiles' framed tokens, the answer is
    transformers' greedy answer to the processor's prompt and pixels."""
    openai = pytest.importorskip("openai")
    from test_server import png_url
    from test_weights_llava import ask_served

    from omnimini.images import decode_data_url
    from omnimini.tokenizer import Tokenizer

    ref, d, processor = idefics3
    url = png_url(40, 30, (200, 30, 30))
    out = ask_served(openai, d, url, "What colour?", max_context=256)
    prompt = processor.apply_chat_template(_messages("What colour?"), add_generation_prompt=True)
    want = processor(text=[prompt], images=[[decode_data_url(url)]], return_tensors="pt")
    assert out.usage.prompt_tokens == want.input_ids.shape[1]
    with torch.no_grad():
        gen = ref.generate(**want, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                           suppress_tokens=[IMAGE_TOKEN])[0, want.input_ids.shape[1]:]
    assert out.choices[0].message.content == Tokenizer.from_dir(d).decode(gen.tolist())


@pytest.mark.slow
def test_smolvlm_matches_transformers(tmp_path):
    """SmolVLM is Idefics3's layout under its own names (smolvlm / smolvlm_vision): same pixels, same logits."""
    T = transformers
    torch.set_num_threads(1)
    vision = T.SmolVLMVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   image_size=TILE, patch_size=PATCH)
    text = T.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.15)
    torch.manual_seed(0)
    ref = T.SmolVLMForConditionalGeneration(T.SmolVLMConfig(vision_config=vision, text_config=text,
                                                            image_token_id=IMAGE_TOKEN)).eval()
    ref.save_pretrained(tmp_path)
    _write_tokenizer(tmp_path)
    ip = T.models.smolvlm.image_processing_pil_smolvlm.SmolVLMImageProcessorPil(
        size={"longest_edge": 2 * TILE}, max_image_size={"longest_edge": TILE})
    ip.save_pretrained(tmp_path)
    model, tok = load_hf(tmp_path)
    assert model.config.arch == "smolvlm"
    img = _images()[0]
    ids, pixels = encode_messages(model, tok, [{"role": "user", "content": [{"type": "image", "image": img},
                                                                            {"type": "text", "text": "Hi"}]}])
    want = ip([img], return_tensors="pt").pixel_values
    torch.testing.assert_close(pixels, want[0], atol=1e-5, rtol=0)
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor([ids]), pixel_values=want).logits
        ours = model(torch.tensor([ids]), pixels=pixels).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
