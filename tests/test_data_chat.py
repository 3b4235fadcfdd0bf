"""Chat data: record shapes, assistant-only labels, tool-call turns, bad records, scene samples."""

import itertools
import json

import pytest

from omnimini.data.chat import IGNORE, ChatSource, encode_chat_sample, load_conversations, normalize_record
from omnimini.data.text import DataError, Problems
from omnimini.train.tiny import tiny_tokenizer, write_corpus


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return tiny_tokenizer(write_corpus(d / "corpus.txt"), d / "tok", vocab_size=320)


def learned_spans(tok, s) -> list[str]:
    """Decoded runs of consecutive label tokens."""
    pairs = zip(s["input_ids"], s["labels"], strict=True)
    return [tok.decode([lab for _, lab in g]) for k, g in itertools.groupby(pairs, key=lambda p: p[1] != IGNORE) if k]


def test_openai_messages_learn_only_assistant_turns(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Count"},
            {"role": "assistant", "content": "One two three"}]
    s = encode_chat_sample(tok, msgs)
    assert learned_spans(tok, s) == ["Hello!<|im_end|>", "One two three<|im_end|>"]
    assert len(s["input_ids"]) == len(s["labels"])
    # the labels are the next tokens of the rendered conversation
    full = tok.encode(tok.render_chat(msgs, add_generation_prompt=False))
    assert s["input_ids"] == full[:-1]
    assert all(lab in (IGNORE, full[j + 1]) for j, lab in enumerate(s["labels"]))


def test_sharegpt_with_function_call_and_observation(tok):
    tools = json.dumps([{"name": "add", "description": "add numbers",
                         "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}])
    rec = {"conversations": [
        {"from": "human", "value": "What is 2+3?"},
        {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 2, "b": 3}})},
        {"from": "observation", "value": "{\"result\": 5}"},
        {"from": "gpt", "value": "It is 5."}], "tools": tools}
    msgs, tls = normalize_record(rec)
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"]
    assert msgs[1]["tool_calls"][0]["function"]["name"] == "add"
    assert tls[0]["type"] == "function" and tls[0]["function"]["name"] == "add"
    spans = learned_spans(tok, encode_chat_sample(tok, msgs, tls))
    assert spans[0].startswith("<|tool_call|>") and '"name": "add"' in spans[0]
    assert spans[0].endswith("<|/tool_call|><|im_end|>")
    assert spans[1] == "It is 5.<|im_end|>"
    assert not any("result" in s or "2+3" in s for s in spans)  # tool output and user text are context only


def test_alpaca_and_part_lists(tok):
    msgs, tools = normalize_record({"instruction": "Say hi", "input": "to Bob", "output": "Hi Bob"})
    assert msgs[0] == {"role": "user", "content": "Say hi\n\nto Bob"} and tools is None
    assert learned_spans(tok, encode_chat_sample(tok, msgs)) == ["Hi Bob<|im_end|>"]
    rec = {"messages": [{"role": "user", "content": [{"type": "text", "value": "hi"}], "loss_weight": 0.0},
                        {"role": "assistant", "content": [{"type": "text", "value": "yo"}]}]}
    msgs, _ = normalize_record(rec)
    assert learned_spans(tok, encode_chat_sample(tok, msgs)) == ["yo<|im_end|>"]


def test_bad_records_are_reported(tok, tmp_path):
    with pytest.raises(DataError, match="no assistant turn"):
        normalize_record({"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(DataError, match="unrecognised"):
        normalize_record({"question": "x"})
    with pytest.raises(DataError, match="unknown ShareGPT speaker"):
        normalize_record({"conversations": [{"from": "alien", "value": "x"}]})
    p = tmp_path / "c.jsonl"
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    p.write_text(json.dumps(good) + "\n{oops\n" + json.dumps({"turns": ["q"]}) + "\n")
    probs = Problems()
    convs = load_conversations([str(p)], probs)
    assert len(convs) == 1 and probs.count == 2
    assert f"{p}:2: malformed JSON" in probs.examples[0] and f"{p}:3:" in probs.examples[1]
    with pytest.raises(DataError, match=r"c\.jsonl:2"):
        load_conversations([str(p)], Problems(strict=True))


def test_truncation_and_chat_source_resume(tok, tmp_path):
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    assert encode_chat_sample(tok, long, max_len=16) is None  # nothing left to learn after truncation
    recs = [{"instruction": f"q{i}", "output": f"answer {i}"} for i in range(7)]
    p = tmp_path / "a.json"
    p.write_text(json.dumps(recs))
    a = ChatSource([str(p)], tok, 64, seed=3)
    expected = [next(a)["input_ids"] for _ in range(17)]  # crosses two epoch reshuffles
    b = ChatSource([str(p)], tok, 64, seed=3)
    got = [next(b)["input_ids"] for _ in range(9)]
    c = ChatSource([str(p)], tok, 64, seed=3)
    c.load_state_dict(b.state_dict())
    assert got + [next(c)["input_ids"] for _ in range(8)] == expected
    assert sorted(map(tuple, expected[:7])) == sorted(map(tuple, expected[7:14]))  # each epoch sees every record


def test_shared_chat_files_load(shared_data, tok):
    files = ["alpaca_en_demo.json", "v1_sft_demo.jsonl", "glaive_toolcall_en_demo.json",
             "fastchat_dummy_conversation.json", "identity.json"]
    probs = Problems()
    convs = load_conversations([str(shared_data / "chat" / f) for f in files], probs,
                               substitutions={"{{name}}": "omnimini", "{{author}}": "the omnimini authors"})
    assert len(convs) > 2000 and probs.count == 0
    assert any(m.get("tool_calls") for msgs, _ in convs for m in msgs)


def test_scene_samples(tok):
    from omnimini.config import preset
    from omnimini.data.scene_samples import SceneSource

    cfg = preset("nano")
    cfg.image_token_id = tok.image_token_id
    cap = next(SceneSource(tok, cfg, 256, kind="caption"))
    tpi = cfg.vision.tokens_per_image
    assert cap["input_ids"].count(tok.image_token_id) == tpi
    assert tuple(cap["pixels"].shape) == (1, 3, cfg.vision.image_size, cfg.vision.image_size)
    assert learned_spans(tok, cap)[0].startswith("A top-down view of a table with")
    src = SceneSource(tok, cfg, 512, kind="task", qa_format="mc")
    task = next(src)
    (span,) = learned_spans(tok, task)
    assert span[0] in "ABCD" and span.endswith("<|im_end|>")
    again = SceneSource(tok, cfg, 512, kind="task", qa_format="mc")
    again.load_state_dict({"index": 0})
    assert next(again)["input_ids"] == task["input_ids"]  # deterministic from the index
