"""Preview CLI: `python -m omnimini.data.scenes --preview DIR [--n 4] [--seed S]`.

Writes one PNG per episode plus samples.md (image, prompt, answer) and samples.jsonl per family.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from .tasks import FAMILIES, episodes


def write_preview(out: Path, n: int = 4, seed: int = 0, families: list[str] | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written, md = [], ["# Scene task samples\n"]
    names = families or list(FAMILIES)
    with open(out / "samples.jsonl", "w", encoding="utf-8") as jl:
        for fam in tqdm(names, desc="families"):
            md.append(f"\n## {fam}\n")
            for ep in episodes(fam, range(seed, seed + n)):
                png = out / f"{fam}_{ep.seed}.png"
                ep.image.save(png)
                written.append(png)
                rec = ep.to_record()
                rec["image"] = png.name
                jl.write(json.dumps({k: v for k, v in rec.items() if k != "meta"}) + "\n")
                md.append(f"\n### {fam} seed {ep.seed} ({ep.subset})\n\n![{png.name}]({png.name})\n\n"
                          f"**Prompt**\n\n```text\n{ep.prompt}\n```\n\n**Answer**\n\n```text\n{ep.answer}\n```\n")
    (out / "samples.md").write_text("".join(md), encoding="utf-8")
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m omnimini.data.scenes", description=__doc__)
    ap.add_argument("--preview", type=Path, required=True, metavar="DIR", help="folder to write samples into")
    ap.add_argument("--n", type=int, default=4, help="episodes per family")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--family", action="append", choices=sorted(FAMILIES), help="only these families")
    args = ap.parse_args(argv)
    if args.n < 1 or args.seed < 0:
        ap.error("--n must be >= 1 and --seed >= 0")
    files = write_preview(args.preview, args.n, args.seed, args.family)
    print(f"wrote {len(files)} images and samples.md / samples.jsonl to {args.preview}")


if __name__ == "__main__":
    main()
