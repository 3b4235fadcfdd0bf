"""The question-conditioned probe (omnimini.vl.qa_probe): it must find an answer that only the image tokens hold,
score the blank-token control at the question's prior, and refuse bad arguments by name."""

import pytest
import torch

from omnimini.vl import qa_probe


def _items(n: int, seed: int) -> dict:
    """Synthetic features: the answer is written into one image token (which one the question says), so only a
    probe that reads image and question together can answer; the blank control sees the same token everywhere."""
    g = torch.Generator().manual_seed(seed)
    hidden, tokens, L = 16, 4, 3
    answers, types = [], []
    image = torch.randn(n, tokens, hidden, generator=g) * 0.1
    question = torch.randn(n, L, hidden, generator=g) * 0.1
    for i in range(n):
        slot = int(torch.randint(tokens, (1,), generator=g))
        label = int(torch.randint(3, (1,), generator=g))
        image[i, slot, label] += 2.0
        question[i, 0, 8 + slot] += 2.0  # "what is in slot k?"
        answers.append(f"a{label}")
        types.append("slot")
    blank = torch.zeros(1, tokens, hidden).expand(n, -1, -1)
    return {"image": image, "blank": blank, "question": question, "mask": torch.ones(n, L, dtype=torch.bool),
            "answers": answers, "types": types}


def test_probe_reads_what_only_the_image_holds_and_blank_scores_the_prior():
    torch.set_num_threads(1)
    train, test = _items(1536, 0), _items(300, 1)
    classes = ["a0", "a1", "a2"]
    real = qa_probe.train_probe(train, test, classes, "image", epochs=6)
    blank = qa_probe.train_probe(train, test, classes, "blank", epochs=6)
    assert real["all"][1] == 300 and real["slot"][1] == 300
    assert real["all"][0] > 0.9, real
    assert blank["all"][0] < 0.5, blank  # three balanced answers: chance is a third


@pytest.mark.parametrize("argv, message", [
    (["--train", "0"], "--train must be at least 1"),
    (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--vision", "/nonexistent/vision.safetensors"], "--vision: no such file"),
    (["--caption-ceiling", "-3"], "--caption-ceiling must be at least 1"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        qa_probe.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
