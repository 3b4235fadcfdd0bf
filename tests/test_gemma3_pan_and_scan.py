"""Gemma 3 pan-and-scan: the tiny random Gemma 3 of test_weights_gemma3_vision saved with do_pan_and_scan=true (crops
of at least 16 px, so its 32 px tower's crop rule is exercised). omnimini's crops are transformers' (number, place
and size, for wide, tall, near-square and clamped images, against Gemma3ImageProcessorPil.pan_and_scan itself), the
pixel values of every view equal the processor's, the prompt is Gemma3Processor's "Here is the original image ...
and here are some crops to help you see better ..." expansion, and the logits on a padded batch of two such prompts
are within 1e-4 of transformers' (32 greedy tokens identical)."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

# gemma3: the fixture `panned` builds on
from test_weights_gemma3_vision import MM_TOKENS, SIZE, SOFT, TEMPLATE, _messages, gemma3  # noqa: E402, F401

from omnimini.engine.generate import GenRequest, generate  # noqa: E402
from omnimini.engine.sampling import SamplingParams  # noqa: E402
from omnimini.pan_and_scan import crop_boxes  # noqa: E402
from omnimini.runtime import encode_messages  # noqa: E402
from omnimini.weights.checkpoint import CheckpointError  # noqa: E402
from omnimini.weights.hf import load_hf  # noqa: E402

MIN_CROP, MAX_CROPS, RATIO = 16, 4, 1.2
PAN = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": MIN_CROP, "pan_and_scan_max_num_crops": MAX_CROPS,
       "pan_and_scan_min_ratio_to_activate": RATIO}


def _image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def panned(request, tmp_path_factory):
    """(transformers model, a copy of its directory with pan-and-scan on, its Gemma3Processor). The processor's
    own defaults (do_pan_and_scan false, 256 px, ...) win over the saved image processor's: it pans and scans when
    called with PAN, as vLLM's mm_processor_kwargs ask for it."""
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    ref, d, processor = request.getfixturevalue("gemma3")
    out = tmp_path_factory.mktemp("gemma3-pan")
    for f in d.iterdir():
        shutil.copy(f, out / f.name)
    ip = Gemma3ImageProcessorPil(size={"height": SIZE, "width": SIZE}, **PAN)
    ip.save_pretrained(out)
    assert json.loads((out / "preprocessor_config.json").read_text())["do_pan_and_scan"] is True
    pan = transformers.Gemma3Processor(image_processor=ip, tokenizer=processor.tokenizer, chat_template=TEMPLATE,
                                       image_seq_length=MM_TOKENS)
    return ref, out, pan


@pytest.mark.parametrize("h, w", [(40, 130), (90, 30), (50, 55), (20, 200), (200, 20), (15, 100), (40, 47),
                                  (33, 33), (30, 61), (17, 300)])
def test_crops_are_the_processors(h, w):
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    ip = Gemma3ImageProcessorPil()
    chw = np.arange(h * w, dtype=np.int64).reshape(1, h, w)  # every pixel its own value: crops are located
    theirs = ip.pan_and_scan(chw, MIN_CROP, MAX_CROPS, RATIO)
    ours = crop_boxes(w, h, MIN_CROP, MAX_CROPS, RATIO)
    assert len(ours) == len(theirs)
    for (left, top, right, bottom), crop in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(chw[:, top:bottom, left:right], crop)


def test_pixels_prompt_logits_and_greedy_match_transformers(panned):
    ref, d, pan = panned
    model, tok = load_hf(d)
    v = model.config.vision
    assert (v.pan_and_scan, v.pan_min_crop, v.pan_max_crops, v.pan_min_ratio) == (True, MIN_CROP, MAX_CROPS, RATIO)
    images = [_image(40, 130), _image(200, 20, seed=1)]  # 3 crops across; 4 down (10 clamped to max_crops)
    texts = ["Describe it.", "What is in this tall picture?"]
    prompts = [pan.apply_chat_template(_messages(t), add_generation_prompt=True) for t in texts]
    want = pan(text=prompts, images=[[images[0]], [images[1]]], padding=True, return_tensors="pt", **PAN)
    assert "Here is the original image" in pan.tokenizer.decode(want.input_ids[0])
    ours = [encode_messages(model, tok, _messages(t, img)) for img, t in zip(images, texts, strict=True)]
    start = 0
    for i, (ids, pixels) in enumerate(ours):
        n = int(want.attention_mask[i].sum())
        assert ids == want.input_ids[i, :n].tolist()  # the processor's crops expansion, right padded
        assert ids.count(SOFT) == MM_TOKENS * len(pixels)
        torch.testing.assert_close(pixels, want.pixel_values[start: start + len(pixels)], atol=0, rtol=0)
        start += len(pixels)
    assert start == len(want.pixel_values) == 1 + 3 + 1 + 4

    ids, mask = want.input_ids, want.attention_mask
    pixels = torch.cat([p for _, p in ours])
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=mask, pixel_values=want.pixel_values,
                     token_type_ids=want.token_type_ids).logits
        got = model(ids, attention_mask=mask, pixels=pixels).logits
    for i in range(2):
        n = int(mask[i].sum())
        print(f"pan-and-scan row {i}: max |omnimini - transformers| {(got[i, :n] - theirs[i, :n]).abs().max():.2e}")
        torch.testing.assert_close(got[i, :n], theirs[i, :n], atol=1e-4, rtol=0)

    prompt, pix = ours[0]
    greedy = generate(model, [GenRequest(prompt, SamplingParams(temperature=0, max_tokens=32), pixels=pix)],
                      eos_ids=[])[0]
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor([prompt]), pixel_values=pix,
                           token_type_ids=(torch.tensor([prompt]) == SOFT).long(), max_new_tokens=32,
                           min_new_tokens=32, do_sample=False, pad_token_id=0, suppress_tokens=[SOFT])
    assert greedy == out[0, len(prompt):].tolist() and len(set(greedy)) > 3


def test_near_square_images_and_null_keys(panned, tmp_path):
    """A near-square image is one view (the plain prompt); null keys (hub configs) take Gemma3Processor's
    defaults, 256 px / 4 crops / 1.2; a crop count under 2 is refused naming the file."""
    ref, d, pan = panned
    model, tok = load_hf(d)
    img = _image(50, 55)
    ids, pixels = encode_messages(model, tok, _messages("Hi", img))
    want = pan(text=[pan.apply_chat_template(_messages("Hi"), add_generation_prompt=True)], images=[[img]],
               return_tensors="pt", **PAN)
    assert len(pixels) == 1 and ids == want.input_ids[0].tolist()
    for f in d.iterdir():
        shutil.copy(f, tmp_path / f.name)
    p = json.loads((d / "preprocessor_config.json").read_text())
    nulls = {**p, **{k: None for k in PAN if k != "do_pan_and_scan"}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(nulls))
    v = load_hf(tmp_path)[0].config.vision
    assert (v.pan_and_scan, v.pan_min_crop, v.pan_max_crops, v.pan_min_ratio) == (True, 256, 4, 1.2)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**p, "pan_and_scan_max_num_crops": 1}))
    with pytest.raises(CheckpointError, match="preprocessor_config.json: pan-and-scan needs"):
        load_hf(tmp_path)
