"""llama.cpp mmproj files: the tiny random LLaVA of test_weights_llava written as model.gguf (its Llama) +
mmproj.gguf (CLIP tower + MLP projector, llama.cpp's clip.cpp names) with gguf's writer; loaded by omnimini they
give the HF load's logits on a padded batch with images, `omnimini serve --model model.gguf --mmproj mmproj.gguf`
answers an image request as transformers does, and a file that does not fit its model is refused naming why."""

import argparse

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gguf_from_hf import TEMPLATE, write_gguf_from_hf, write_mmproj_from_llava  # noqa: E402
from test_weights_llava import IMAGE_TOKEN, LLAVA_TEMPLATE, N_IMG, _batch, _images, llava  # noqa: E402, F401

from omnimini.images import vision_pixels  # noqa: E402
from omnimini.tokenizer import BYTE_TO_CHAR  # noqa: E402
from omnimini.weights.gguf_loader import GGUFError, load_gguf  # noqa: E402
from omnimini.weights.gguf_mmproj import attach_mmproj  # noqa: E402
from omnimini.weights.hf import load_hf  # noqa: E402


def _vocab(template):
    """The LLaVA test's vocabulary as GGUF metadata: bytes at 0..255, </s>, fillers, <image> at IMAGE_TOKEN."""
    tokens = [BYTE_TO_CHAR[b] for b in range(256)] + ["</s>"] + [f"<|x{i}|>" for i in range(IMAGE_TOKEN - 257)]
    tokens.append("<image>")

    def write(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(tokens)
        w.add_token_types([1] * 256 + [3] * (len(tokens) - 256))
        w.add_token_merges([])
        w.add_eos_token_id(256)
        w.add_chat_template(template)
    return write


def _language_model(ref):
    """The LLaVA's Llama as a transformers LlamaForCausalLM (what llama.cpp's converter writes as model.gguf)."""
    lm = transformers.LlamaForCausalLM(ref.config.text_config).eval()
    state = {"model." + k: v for k, v in ref.model.language_model.state_dict().items()}
    state["lm_head.weight"] = ref.lm_head.weight
    lm.load_state_dict(state)
    return lm


@pytest.fixture(scope="module")
def files(request, tmp_path_factory):
    """(the LLaVA, its directory, its CLIP processor, a folder for files, its model.gguf)."""
    ref, d, processor = request.getfixturevalue("llava")
    out = tmp_path_factory.mktemp("mmproj")
    lm = write_gguf_from_hf(out / "model.gguf", _language_model(ref), tokenizer_fn=_vocab(LLAVA_TEMPLATE))
    return ref, d, processor, out, lm


@pytest.mark.parametrize("legacy, feature_key", [(True, True), (False, False)])
def test_model_and_mmproj_give_the_hf_load(files, legacy, feature_key):
    """Both fc1/fc2 namings (legacy converter, gguf-py), with and without clip.vision.feature_layer."""
    ref, d, processor, out, lm_path = files
    mm = write_mmproj_from_llava(out / f"mmproj-{legacy}.gguf", ref, legacy=legacy, feature_layer_key=feature_key)
    model, tok = load_gguf(lm_path, progress=False)
    attach_mmproj(model, tok, mm)
    hf_model, _ = load_hf(d)
    assert model.config.vision.num_layers == hf_model.config.vision.num_layers == 2
    assert model.config.image_token_id == IMAGE_TOKEN and tok.image_token == "<image>"
    pixels = torch.stack([vision_pixels(img, model.config.vision) for img in _images()])
    torch.testing.assert_close(pixels, processor(_images(), return_tensors="pt").pixel_values, atol=1e-5, rtol=0)
    ids, mask = _batch()
    with torch.no_grad():
        got = model(ids, attention_mask=mask, pixels=pixels).logits
        want = hf_model(ids, attention_mask=mask, pixels=pixels).logits
        theirs = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1, :24], want[1, :24], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[0], theirs[0], atol=1e-4, rtol=0)


def test_mismatched_mmproj_is_named(files):
    ref, _, _, out, lm_path = files
    cases = [({"drop_out_rows": 8}, "hidden size mismatch: the projector gives 56-wide image tokens but the "
                                    "language model's hidden size is 64"),
             ({"patch_size": 7}, r"patch size mismatch: clip.vision.patch_size=7 .* v.patch_embd.weight is "
                                 r"\[32, 3, 14, 14\]")]
    for i, (kw, message) in enumerate(cases):
        model, tok = load_gguf(lm_path, progress=False)
        with pytest.raises(GGUFError, match=message):
            attach_mmproj(model, tok, write_mmproj_from_llava(out / f"bad{i}.gguf", ref, **kw))
    text_only = write_gguf_from_hf(out / "text.gguf", _language_model(ref), tokenizer_fn=_vocab(TEMPLATE))
    model, tok = load_gguf(text_only, progress=False)
    with pytest.raises(GGUFError, match="not an mmproj file"):
        attach_mmproj(model, tok, text_only)


def test_served_with_mmproj_through_the_openai_client(files):
    """`omnimini serve --model model.gguf --mmproj mmproj.gguf`: transformers' greedy answer to the same image."""
    openai = pytest.importorskip("openai")
    from test_server import png_url
    from test_weights_llava import ask_served

    from omnimini.images import decode_data_url
    from omnimini.serve.config import add_serve_args, serve_config_from_args

    ref, _, processor, out, lm_path = files
    mm = write_mmproj_from_llava(out / "mmproj.gguf", ref)
    p = argparse.ArgumentParser()
    add_serve_args(p)
    cfg = serve_config_from_args(p.parse_args(["--model", str(lm_path), "--mmproj", str(mm)]))
    assert cfg.mmproj == str(mm) and cfg.models == [str(lm_path)]
    url = png_url(40, 30, (200, 30, 30))
    reply = ask_served(openai, lm_path, url, "What colour?", max_context=128, mmproj=str(mm))
    model, tok = load_gguf(lm_path, progress=False)
    prompt = tok.encode("USER: " + "<image>" * N_IMG + "\nWhat colour? ASSISTANT:")
    assert reply.usage.prompt_tokens == len(prompt)
    pixels = processor(decode_data_url(url), return_tensors="pt").pixel_values
    with torch.no_grad():
        want = ref.generate(input_ids=torch.tensor([prompt]), pixel_values=pixels, max_new_tokens=8,
                            min_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(prompt):]
    assert reply.choices[0].message.content == tok.decode(want.tolist())
