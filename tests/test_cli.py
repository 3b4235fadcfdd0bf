import json
import subprocess
import sys

import pytest

from omnimini.cli import main


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_params_json_has_the_model_card_keys(capsys):
    rc, out, _ = run(capsys, "params", "mini", "--tokens", "13T", "--json")
    d = json.loads(out)
    assert rc == 0
    assert {"total_params", "active_params", "tokens", "token_param_ratio", "alscore"} <= set(d)
    assert abs(d["total_params"] - 8e9) / 8e9 < 0.05
    assert 1500 < d["token_param_ratio"] < 1750 and abs(d["alscore"] - 1.1) < 0.1
    rc, out, _ = run(capsys, "params", "nano")
    assert "ACTIVE parameters per token" in out and "routed experts" in out


def test_generate_is_deterministic_and_streams_text(tiny_ckpt, capsys):
    args = ["generate", "--model", str(tiny_ckpt / "model"), "The quick", "--max-tokens", "8"]
    rc, a, _ = run(capsys, *args)
    _, b, _ = run(capsys, *args)
    assert rc == 0 and a == b and a.endswith("\n")
    rc, c, _ = run(capsys, *args, "--temperature", "1.0", "--seed", "3", "--top-p", "0.9", "--top-k", "50")
    rc2, d, _ = run(capsys, *args, "--temperature", "1.0", "--seed", "3", "--top-p", "0.9", "--top-k", "50")
    assert rc == rc2 == 0 and c == d


def test_generate_with_an_image(tiny_ckpt, capsys):
    rc, out, err = run(capsys, "generate", "--model", str(tiny_ckpt / "model"), "what is this?", "--image",
                       str(tiny_ckpt / "red.png"), "--max-tokens", "4")
    assert rc == 0, err


@pytest.mark.parametrize("argv,needle", [
    (["params", "gigantic"], "unknown preset 'gigantic'"),
    (["generate", "--model", "/nonexistent/dir", "hi"], "/nonexistent/dir"),
    (["generate", "--model", "{m}", "hi", "--image", "{d}/not_image.png"], "not a readable image"),
    (["generate", "--model", "{m}", "hi", "--image", "{d}/missing.png"], "image file not found"),
    (["generate", "--model", "{m}", "fox " * 200], "context window"),
])
def test_bad_input_gives_one_clear_line(tiny_ckpt, capsys, argv, needle):
    argv = [a.format(m=tiny_ckpt / "model", d=tiny_ckpt) for a in argv]
    rc, _, err = run(capsys, *argv)
    assert rc != 0
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "omnimini.cli", "params", "nano", "--json"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["total_params"] > 1e6


def test_tokenizer_train_command(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("hello world, hello tokens " * 50)
    rc, out, _ = run(capsys, "tokenizer", "train", str(tmp_path / "c.txt"), "--vocab-size", "280",
                     "--out", str(tmp_path / "tok"))
    assert rc == 0 and (tmp_path / "tok" / "tokenizer.json").exists()
    rc, _, err = run(capsys, "tokenizer", "train", str(tmp_path / "missing.txt"), "--vocab-size", "280")
    assert rc != 0 and "missing.txt" in err


def test_train_module_entry_point_reports_bad_settings_in_one_line(tmp_path, capsys):
    """`python -m omnimini.train.cli` (what torchrun runs) answers bad input like `omnimini train` does."""
    from omnimini.train.cli import main as train_main

    (tmp_path / "t.txt").write_text("some text to train on\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: nano\nsteps: 2\ndata:\n  - {{kind: text, paths: ['{tmp_path / 't.txt'}']}}\n")
    rc = train_main([str(cfg), "--set", "warmup_steps=999", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "warmup_steps 999" in err and "Traceback" not in err and err.count("\n") == 1


def test_retired_compile_flag_is_accepted_with_a_notice(capsys):
    """`--compile` (the retired compiled decode step) still parses, so old scripts keep working, and says why it
    no longer does anything."""
    import argparse

    from omnimini.runtime import COMPILE_RETIRED
    from omnimini.serve.config import add_serve_args, serve_config_from_args

    p = argparse.ArgumentParser()
    add_serve_args(p)
    cfg = serve_config_from_args(p.parse_args(["--compile"]))
    assert not hasattr(cfg, "compile_decode")
    assert COMPILE_RETIRED in capsys.readouterr().err
    assert "--compile" not in p.format_help()
