"""LLaVA (CLIP vision tower + MLP projector + Llama): a tiny random transformers model, saved with its image
processor config, loaded into OmniModel's vision encoder + projector. Same pixel values as transformers' CLIP
processor, same logits on a padded batch with images (≤1e-4), same 32 greedy tokens."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_weights_hf import byte_tokenizer, write_tokenizer  # noqa: E402
from vlm_inputs import noise_images  # noqa: E402

from omnimini.engine.generate import GenRequest, generate  # noqa: E402
from omnimini.engine.sampling import SamplingParams  # noqa: E402
from omnimini.images import vision_pixels  # noqa: E402
from omnimini.weights.checkpoint import CheckpointError  # noqa: E402
from omnimini.weights.hf import load_hf  # noqa: E402

IMAGE_TOKEN, SIDE, PATCH = 299, 56, 14
N_IMG = (SIDE // PATCH) ** 2  # 16 tokens per image


def _images():
    return noise_images((50, 70), (90, 60))


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    T = transformers
    d = tmp_path_factory.mktemp("llava")
    vision = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=SIDE, patch_size=PATCH)
    text = T.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.15,
                         max_position_embeddings=256)
    torch.manual_seed(0)
    ref = T.LlavaForConditionalGeneration(T.LlavaConfig(vision_config=vision, text_config=text,
                                                         image_token_id=IMAGE_TOKEN)).eval()
    with torch.no_grad():  # make the norms, biases and class token matter
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias") or "class_embedding" in name:
                p.add_(torch.randn_like(p) * 0.2)
    ref.generation_config.eos_token_id = None
    ref.save_pretrained(d)
    write_tokenizer(d)
    processor = T.models.clip.image_processing_pil_clip.CLIPImageProcessorPil(
        size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    processor.save_pretrained(d)
    return ref, d, processor


def _batch():
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    ids[0, 3:3 + N_IMG] = IMAGE_TOKEN
    ids[1, 1:1 + N_IMG] = IMAGE_TOKEN
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 24:] = 0  # right padding
    return ids * mask, mask


def test_pixels_logits_and_greedy_match_transformers(llava):
    ref, d, processor = llava
    model, _ = load_hf(d)
    assert model.config.arch == "llava" and model.config.vision.num_layers == 2  # read at layer -2
    pixels = torch.stack([vision_pixels(img, model.config.vision) for img in _images()])
    want_pixels = processor(_images(), return_tensors="pt").pixel_values
    torch.testing.assert_close(pixels, want_pixels, atol=1e-5, rtol=0)

    ids, mask = _batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, pixel_values=want_pixels).logits
        got = model(ids, attention_mask=mask, pixels=pixels).logits
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1, :24], want[1, :24], atol=1e-4, rtol=0)

    prompt = ids[0].tolist()
    params = SamplingParams(temperature=0, max_tokens=32)
    ours = generate(model, [GenRequest(prompt, params, pixels=pixels[:1])], eos_ids=[])[0]
    with torch.no_grad():
        theirs = ref.generate(input_ids=ids[:1], pixel_values=want_pixels[:1], max_new_tokens=32, min_new_tokens=32,
                              do_sample=False, pad_token_id=0)
    assert ours == theirs[0, len(prompt):].tolist()


def test_missing_preprocessor_config_is_named(llava, tmp_path):
    assert_needs_preprocessor(llava[1], tmp_path)


def assert_needs_preprocessor(d, dst):
    """A copy of VLM directory d without preprocessor_config.json is refused naming the file."""
    import shutil

    for f in d.iterdir():
        if f.name != "preprocessor_config.json":
            shutil.copy(f, dst / f.name)
    with pytest.raises(CheckpointError, match="missing preprocessor_config.json"):
        load_hf(dst)


# in the style of llava-hf's processor templates: content parts, one <image> per image part
LLAVA_TEMPLATE = ("{% for message in messages %}{{ message['role'].upper() + ': ' }}"
                  "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}"
                  "{% endfor %}{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}"
                  "{{ part['text'] + ' ' }}{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def _llava_tokenizer(d):
    """Bytes, then fillers, with <image> at the model's image token id and the template above."""
    import json

    tok = byte_tokenizer(["</s>"] + [f"<|x{i}|>" for i in range(IMAGE_TOKEN - 257)] + ["<image>"])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "chat_template": LLAVA_TEMPLATE}))


def test_served_with_an_image_through_the_openai_client(llava):
    """`omnimini serve --model llava_dir`: the image becomes the tower's 16 tokens, the answer is transformers'
    greedy answer to the same prompt and pixels."""
    openai = pytest.importorskip("openai")
    from test_server import png_url

    from omnimini.images import decode_data_url
    from omnimini.tokenizer import Tokenizer

    ref, d, processor = llava
    _llava_tokenizer(d)
    url = png_url(40, 30, (200, 30, 30))
    out = ask_served(openai, d, url, "What colour?", max_context=128)
    tok = Tokenizer.from_dir(d)
    prompt = tok.encode("USER: " + "<image>" * N_IMG + "\nWhat colour? ASSISTANT:")
    assert out.usage.prompt_tokens == len(prompt) and prompt.count(IMAGE_TOKEN) == N_IMG
    pixels = processor(decode_data_url(url), return_tensors="pt").pixel_values
    with torch.no_grad():
        want = ref.generate(input_ids=torch.tensor([prompt]), pixel_values=pixels, max_new_tokens=8,
                            min_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(prompt):]
    assert out.choices[0].message.content == tok.decode(want.tolist())


def ask_served(openai, d, url, text, max_context, **serve):
    """`omnimini serve --model d` on 127.0.0.1, asked through the openai client about one image (8 greedy tokens);
    serve: more ServeConfig fields."""
    from test_server import LiveServer, free_port

    from omnimini.serve.config import ServeConfig

    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": text}]}]
    srv = LiveServer(ServeConfig(models=[str(d)], port=free_port(), quantize="none", max_batch=2,
                                 max_context=max_context, **serve))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
        return client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=8, temperature=0)
    finally:
        srv.stop()
