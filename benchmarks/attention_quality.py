"""Quality of attention variants on long sequences: validation loss after the same number of steps.

    python benchmarks/attention_quality.py --json $OUT/attn_quality.json            # GPU, S = 4096
    python benchmarks/attention_quality.py --text corpus.txt --seq-len 8192 ...     # byte-level text
    python benchmarks/attention_quality.py --dry-run                                # CPU smoke test

A small pre-LN causal transformer LM (same init, data order and steps for every variant) with:
  dense               SDPA, full causal attention (the bar)
  pixelfly            butterfly blocks + neighbours + global tokens, one softmax (the shipped variant)
  sparse_only         butterfly blocks + neighbours
  global_only         global tokens (+ the token itself) only: the global term alone
Data: byte-level text from --text, else a synthetic stream mixing a peaked first-order Markov chain
(local structure) with copies of earlier spans from anywhere in the sequence (long-range recall).
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
import transformers

from pixelfly_hf.config import PixelflyAttentionConfig
from pixelfly_hf.layers.attention import pattern_of, pixelfly_attention_forward

VARIANTS = ("dense", "pixelfly", "sparse_only", "global_only")


class _AttnOwner(torch.nn.Module):
    """What transformers passes as ``module``: is_causal and a config holding the settings."""

    def __init__(self, settings: PixelflyAttentionConfig):
        super().__init__()
        self.is_causal = True
        self.config = transformers.PretrainedConfig(pixelfly_attention=settings.to_dict())


def make_attention(variant: str, settings: PixelflyAttentionConfig):
    forced = dict(settings.to_dict(), min_seq_len_for_sparse=0, max_density_for_sparse=1.0)
    if variant == "dense":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if variant in ("pixelfly", "sparse_only"):
        options = dict(forced)
        if variant == "sparse_only":
            options["n_global_tokens"] = 0
        owner = _AttnOwner(PixelflyAttentionConfig(**options))
        return lambda q, k, v: pixelfly_attention_forward(owner, q, k, v, None)[0].transpose(1, 2)
    if variant == "global_only":
        def global_only(q, k, v):
            s = q.shape[2]
            pos = torch.arange(s, device=q.device)
            keep = (pos[None, :] < settings.n_global_tokens) & (pos[None, :] <= pos[:, None]) | torch.eye(s, dtype=torch.bool, device=q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

        return global_only
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


class Block(torch.nn.Module):
    def __init__(self, d_model, n_heads, attention):
        super().__init__()
        self.n_heads, self.attention = n_heads, attention
        self.ln1, self.ln2 = torch.nn.LayerNorm(d_model), torch.nn.LayerNorm(d_model)
        self.qkv, self.proj = torch.nn.Linear(d_model, 3 * d_model), torch.nn.Linear(d_model, d_model)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d_model, 4 * d_model), torch.nn.GELU(), torch.nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(self.attention(q, k, v).transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.ln2(x))


class TinyLM(torch.nn.Module):
    def __init__(self, vocab, seq_len, d_model, n_layers, n_heads, attention):
        super().__init__()
        self.tok, self.pos = torch.nn.Embedding(vocab, d_model), torch.nn.Embedding(seq_len, d_model)
        self.blocks = torch.nn.ModuleList(Block(d_model, n_heads, attention) for _ in range(n_layers))
        self.ln, self.head = torch.nn.LayerNorm(d_model), torch.nn.Linear(d_model, vocab, bias=False)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def synthetic_rows(gen, n_rows, length, vocab=256):
    """Markov chain with peaked transitions (table fixed by its own seed), then about half of the
    stream overwritten, span by span, with copies of earlier spans from anywhere before it."""
    probs = torch.softmax(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(1234)) * 3.0, dim=-1)
    cdf = probs.cumsum(-1)
    out = torch.empty(n_rows, length, dtype=torch.long)
    out[:, 0] = torch.randint(vocab, (n_rows,), generator=gen)
    u = torch.rand(n_rows, length, generator=gen)
    for pos in range(1, length):  # vectorised over rows
        out[:, pos] = torch.searchsorted(cdf[out[:, pos - 1]], u[:, pos : pos + 1].contiguous()).squeeze(1).clamp_max(vocab - 1)
    for row in range(n_rows):
        pos = 256
        while pos < length:
            span = int(torch.randint(16, 65, (1,), generator=gen))
            if torch.rand(1, generator=gen).item() < 0.5:
                src = int(torch.randint(0, pos - span, (1,), generator=gen))
                n = min(span, length - pos)
                out[row, pos : pos + n] = out[row, src : src + n]
            pos += span
    return out


def text_batch(gen, data, batch, seq_len):
    starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([data[s : s + seq_len] for s in starts.tolist()])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    parser.add_argument("--dry-run", action="store_true", help="tiny model and sequences on CPU")
    parser.add_argument("--text", help="train on the bytes of this file (else synthetic data)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--val-batches", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--n-factors", type=int, default=3)
    parser.add_argument("--butterfly-size", type=int, default=None)
    parser.add_argument("--n-global-tokens", type=int, default=64, help="global tokens (first positions seen by all)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for small studies (reference path)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.seq_len, args.batch, args.steps, args.val_batches = 256, 2, 3, 1
        args.d_model, args.layers, args.heads, args.block_size, args.n_factors, args.n_global_tokens = 64, 2, 4, 16, 2, 8
        device = torch.device("cpu")
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            parser.error("no CUDA GPU: pass --device cpu with small sizes, or --dry-run")
        device = torch.device(args.device)
    settings = PixelflyAttentionConfig(block_size=args.block_size, n_factors=args.n_factors,
                                 butterfly_size=args.butterfly_size, n_global_tokens=args.n_global_tokens)

    if args.text:
        with open(args.text, "rb") as f:
            data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
        split = int(0.9 * len(data))
        train_data, val_data = data[:split], data[split:]
        get_train = lambda g: text_batch(g, train_data, args.batch, args.seq_len + 1)  # noqa: E731
        get_val = lambda g: text_batch(g, val_data, args.batch, args.seq_len + 1)  # noqa: E731
    tokens = args.seq_len + 1  # inputs and shifted targets
    val_gen, train_gen = torch.Generator().manual_seed(999), torch.Generator().manual_seed(0)
    if args.text:
        val_set = [get_val(val_gen) for _ in range(args.val_batches)]
        train_set = [get_train(train_gen) for _ in range(args.steps)]  # same batches for every variant
    else:
        val_set = synthetic_rows(val_gen, args.val_batches * args.batch, tokens).split(args.batch)
        train_set = synthetic_rows(train_gen, args.steps * args.batch, tokens).split(args.batch)
    val_set = [ids.to(device) for ids in val_set]

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    results = []
    for variant in args.variants:
        torch.manual_seed(0)
        model = TinyLM(256, args.seq_len, args.d_model, args.layers, args.heads,
                       make_attention(variant, settings)).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 20) * 0.5 * (1 + math.cos(math.pi * i / args.steps)))
        t0 = time.time()
        for ids in train_set:
            ids = ids.to(device)
            with autocast:
                loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1).float(), ids[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        train_s = time.time() - t0
        model.eval()
        with torch.no_grad(), autocast:
            val = sum(F.cross_entropy(model(ids[:, :-1]).flatten(0, 1).float(), ids[:, 1:].flatten()).item() for ids in val_set)
        row = dict(variant=variant, val_loss=round(val / len(val_set), 4), last_train_loss=round(loss.item(), 4),
                   train_s=round(train_s, 1))
        results.append(row)
        print(json.dumps(row), flush=True)
        del model, opt

    print(f"\nAttention quality: S={args.seq_len}, {args.steps} steps, batch {args.batch}, "
          f"d_model {args.d_model}, {args.layers} layers, {args.heads} heads, data={'text' if args.text else 'synthetic'}")
    print(f"{'variant':>20} {'val loss':>9} {'train loss':>10} {'train s':>8}")
    for r in results:
        print(f"{r['variant']:>20} {r['val_loss']:>9.4f} {r['last_train_loss']:>10.4f} {r['train_s']:>8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), settings=settings.to_dict(), rows=results), f, indent=1)


if __name__ == "__main__":
    main()
