"""PixelflyConfig and PixelflyAttentionConfig: which matrices of a model become Pixelfly, with what budget, and how
attention is sparsified (PEFT-style), plus the checks every structure field goes through.

Knows nothing about models or kernels and imports only the standard library, so `import pixelfly_hf` stays cheap: it
only validates and (de)serialises the user's choices. The per-module plan that `get_model` derives from it lives in
the patched model's own config (`config.pixelfly`).

One name per concept, for linears and attention alike:
    block_size      the kernel's tile edge: a linear's tiles are at least this wide; attention's sequence
                    blocks are exactly this many tokens.
    butterfly_size  how many tiles (linear) or sequence blocks (attention) one butterfly spans.
    n_factors       butterfly factors k: tile (i, j) is stored iff i XOR j is 0 or a power of two below 2**k.
    low_rank        the rank of a linear's low-rank term U V.
    n_global_tokens attention's global term: the first positions, attended by (and, bidirectional, attending)
                    every position.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields

CONFIG_NAME = "pixelfly_config.json"

ROLES = ("attn", "mlp")
INIT_CHOICES = ("project", "random")
ATTENTION_CHOICES = ("dense", "pixelfly")
# fields a per-module override may set
OVERRIDE_KEYS = ("density", "butterfly_size", "n_factors", "low_rank", "gate", "block_size")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_power_of_two(value) -> bool:
    return _is_int(value) and value >= 1 and value & (value - 1) == 0


def check_butterfly_size(value, where: str = "") -> None:
    if not _is_power_of_two(value) or value < 2:
        raise ValueError(f"{where}butterfly_size={value!r} must be a power of 2 and at least 2 (e.g. 4, 8, 16).")


def check_n_factors(value, butterfly_size: int | None, where: str = "", minimum: int = 0) -> None:
    """n_factors in [minimum, log2(butterfly_size)]; without a butterfly_size only the minimum applies."""
    if butterfly_size is None:
        if not _is_int(value) or value < minimum:
            raise ValueError(f"{where}n_factors={value!r} must be an integer >= {minimum}.")
        return
    top = int(math.log2(butterfly_size))
    if not _is_int(value) or not minimum <= value <= top:
        raise ValueError(
            f"{where}n_factors={value!r} must be an integer in [{minimum}, log2(butterfly_size={butterfly_size})] "
            f"= [{minimum}, {top}]."
        )


def check_block_size(value, where: str = "") -> None:
    if not _is_power_of_two(value) or value < 16:
        raise ValueError(
            f"{where}block_size={value!r} must be a power of 2 and at least 16 (the smallest tensor-core tile "
            "edge): 16, 32, 64 or 128."
        )


def check_count(name: str, value, where: str = "", limit: int | None = None, hint: str = "") -> None:
    """An integer in [0, limit] (no upper bound without a limit)."""
    if not _is_int(value) or value < 0 or (limit is not None and value > limit):
        bound = f"in [0, {limit}]" if limit is not None else ">= 0"
        raise ValueError(f"{where}{name}={value!r} must be an integer {bound}{hint}.")


def check_density(value, where: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{where}density={value!r} must be a fraction in (0, 1], e.g. 0.25 for a quarter of dense.")


def _check_structure(where: str, values: dict) -> None:
    """Validate density / butterfly_size / n_factors / low_rank / gate / block_size found in `values`."""
    density = values.get("density")
    bs, k = values.get("butterfly_size"), values.get("n_factors")
    if density is not None:
        check_density(density, where)
    if density is not None and (bs is not None or k is not None):
        raise ValueError(
            f"{where}density={density!r} and butterfly_size={bs!r}/n_factors={k!r} were both given: give either a "
            "density budget (the planner picks the layout) or an explicit (butterfly_size, n_factors), not both."
        )
    if (bs is None) != (k is None):
        raise ValueError(
            f"{where}butterfly_size={bs!r} and n_factors={k!r}: an explicit layout needs both (e.g. "
            "butterfly_size=8, n_factors=1), or neither to use a density budget."
        )
    if bs is not None:
        check_butterfly_size(bs, where)
        check_n_factors(k, bs, where)
    if values.get("low_rank") is not None:
        check_count("low_rank", values["low_rank"], where, hint=" (0 disables the low-rank term)")
    if values.get("block_size") is not None:
        check_block_size(values["block_size"], where)
    gate = values.get("gate")
    if gate is not None and not isinstance(gate, bool):
        raise ValueError(f"{where}gate={gate!r} must be True or False.")


def _check_patterns(name: str, value, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{name}='' is empty: give a regex over module names, or a list of roles/names.")
        return
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(
            f"{name}={value!r} must be a non-empty list of roles {ROLES} or module-name patterns "
            f"(e.g. ['attn', 'mlp'] or ['c_fc', r'h\\.0\\.attn\\.c_attn']), or one regex string."
        )


# what a linear-layer name means for attention, for the unknown-option error
_ATTENTION_NAME_HINTS = {"rank": "n_global_tokens"}


@dataclass(frozen=True)
class PixelflyAttentionConfig:
    """Pixelfly attention: a flat block butterfly pattern over sequence blocks (+ the neighbouring blocks) and
    global tokens, under one softmax. Stored as a plain dict in the patched model's `config.pixelfly_attention`.

    block_size: tokens per sequence block, the attention kernels' tile edge (>= 128 on GPU, small in tests).
    butterfly_size: the pattern's period in blocks (a power of 2 >= 2**n_factors): block i also reaches blocks j
        with (i XOR j) mod butterfly_size in the set, a strided long-range pattern of density about
        (n_factors + 1) / butterfly_size. None: no period (each block links within its aligned group of
        2**n_factors blocks).
    n_factors: butterfly factors k >= 1: block (i, j) is allowed iff i XOR j is in {0, 1, 2, ..., 2**(k-1)}.
    n_global_tokens: the first positions, which every position attends to (and which attend to everything when
        bidirectional). A multiple of block_size keeps the Triton kernels (they take whole tiles only); other
        counts run on FlexAttention, where 64 tokens were 1.1-1.3x slower fwd+bwd than 128 at S=4096 on an H200
        (research/tune_attention.py).
    min_seq_len_for_sparse: shorter sequences use dense SDPA.
    max_density_for_sparse: sequences whose tile density exceeds this use dense SDPA (the sparse kernels run at
        0.5-0.7x of cuDNN's rate per visited tile on an H200, so they cannot win above ~0.5).
    """

    block_size: int = 128
    butterfly_size: int | None = None
    n_factors: int = 3
    n_global_tokens: int = 128
    min_seq_len_for_sparse: int = 2048
    max_density_for_sparse: float = 0.5

    def __post_init__(self):
        where = "attention_config."
        check_block_size(self.block_size, where)
        if self.butterfly_size is not None:
            check_butterfly_size(self.butterfly_size, where)
        check_n_factors(self.n_factors, self.butterfly_size, where, minimum=1)
        check_count("n_global_tokens", self.n_global_tokens, where, hint=" (0 disables the global term)")
        check_count("min_seq_len_for_sparse", self.min_seq_len_for_sparse, where)
        density = self.max_density_for_sparse
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(f"{where}max_density_for_sparse={density!r} must be a number in (0, 1].")

    @classmethod
    def from_dict(cls, options: dict | None) -> "PixelflyAttentionConfig":
        options = dict(options or {})
        if "low_rank" in options and "n_global_tokens" in options:
            raise ValueError(
                f"pixelfly_attention has both low_rank={options['low_rank']!r} and "
                f"n_global_tokens={options['n_global_tokens']!r}: low_rank is the old name of n_global_tokens; drop it."
            )
        if "low_rank" in options:
            # the name saved configs used before the linear and attention names were made one per concept
            warnings.warn(
                "pixelfly_attention option low_rank is deprecated: it is n_global_tokens (the global tokens); "
                "save the model again to store the new name.",
                FutureWarning,
                stacklevel=2,
            )
            options["n_global_tokens"] = options.pop("low_rank")
        unknown = sorted(set(options) - _ATTENTION_OPTION_NAMES)
        if unknown:
            hints = "".join(
                f"; for attention {name} is {_ATTENTION_NAME_HINTS[name]}" for name in unknown if name in _ATTENTION_NAME_HINTS
            )
            raise ValueError(
                f"unknown pixelfly_attention option(s) {unknown}; known options: {sorted(_ATTENTION_OPTION_NAMES)}{hints}."
            )
        return cls(**options)

    def to_dict(self) -> dict:
        return asdict(self)


# read once: dataclasses.fields() inside a torch.compile'd attention call would break the graph
_ATTENTION_OPTION_NAMES = frozenset(f.name for f in fields(PixelflyAttentionConfig))


@dataclass
class PixelflyConfig:
    """What to replace with Pixelfly (flat block butterfly + low rank) and the budget.

    target_modules: a list whose entries are roles ("attn": the attention projections, "mlp": the MLP matrices)
        or module-name patterns (an entry matches a module whose name equals it or ends with "." + it; entries
        are regexes, so "h\\.[01]\\.mlp\\.c_fc" works); or one string, a regex that must match a whole name.
    exclude_modules: same forms; matching modules stay dense.
    density: the budget per matrix as a fraction of its dense parameters, low rank included (planner mode;
        default 0.25). Or give butterfly_size and n_factors for an explicit layout instead.
    low_rank: the rank of the low-rank term. None (default): the planner picks it per matrix, up to the paper's 32,
        leaving room in the density budget for butterfly factors (32 with an explicit layout); the summary shows
        what it chose. A given rank is honoured, or lowered with a warning naming the matrix when the budget or the
        shape forces a lower one.
    gate: mix the sparse and low-rank terms with a learned per-token gate.
    block_size: the kernel's minimum tile edge (16 for tiny models, 32 default, 64/128 for speed).
    overrides: {role or pattern: {field: value}} with fields among density, butterfly_size, n_factors,
        low_rank, gate, block_size; applied in order, later keys win.
    init: "project" fits the existing dense weights (truncated SVD + tiles), "random" re-initialises.
    projection_iters: alternating-projection iterations for init="project".
    attention: "dense" keeps the model's attention; "pixelfly" switches to Pixelfly attention.
    attention_config: a PixelflyAttentionConfig or a dict of its fields (converted and checked at construction);
        defaults to PixelflyAttentionConfig() when attention="pixelfly".
    """

    target_modules: list[str] | str = field(default_factory=lambda: ["attn", "mlp"])
    exclude_modules: list[str] | str | None = None
    density: float | None = None
    butterfly_size: int | None = None
    n_factors: int | None = None
    low_rank: int | None = None
    gate: bool = False
    block_size: int = 32
    overrides: dict[str, dict] = field(default_factory=dict)
    init: str = "project"
    projection_iters: int = 3
    attention: str = "dense"
    attention_config: PixelflyAttentionConfig | dict | None = None

    def __post_init__(self):
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        if self.density is None and self.butterfly_size is None and self.n_factors is None:
            self.density = 0.25
        if self.attention_config is None and self.attention == "pixelfly":
            self.attention_config = PixelflyAttentionConfig()
        self.validate()

    def validate(self) -> None:
        """Check every field; a dict attention_config becomes a PixelflyAttentionConfig."""
        _check_patterns("target_modules", self.target_modules, allow_none=False)
        _check_patterns("exclude_modules", self.exclude_modules, allow_none=True)
        _check_structure("", {f: getattr(self, f) for f in OVERRIDE_KEYS})
        if not isinstance(self.overrides, dict):
            raise ValueError(f"overrides={self.overrides!r} must be a dict {{role or pattern: {{field: value}}}}.")
        for key, values in self.overrides.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"overrides key {key!r} must be a role {ROLES} or a module-name pattern.")
            if not isinstance(values, dict) or not values:
                raise ValueError(f"overrides[{key!r}]={values!r} must be a non-empty dict of fields {OVERRIDE_KEYS}.")
            unknown = sorted(set(values) - set(OVERRIDE_KEYS))
            if unknown:
                raise ValueError(f"overrides[{key!r}] has unknown field(s) {unknown}; allowed: {list(OVERRIDE_KEYS)}.")
            _check_structure(f"overrides[{key!r}]: ", values)
        if self.init not in INIT_CHOICES:
            raise ValueError(
                f"init={self.init!r} must be 'project' (fit the existing dense weights) or 'random' (fresh init)."
            )
        if isinstance(self.projection_iters, bool) or not isinstance(self.projection_iters, int) or self.projection_iters < 1:
            raise ValueError(f"projection_iters={self.projection_iters!r} must be an integer >= 1.")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention={self.attention!r} must be one of {ATTENTION_CHOICES}.")
        if isinstance(self.attention_config, dict):
            self.attention_config = PixelflyAttentionConfig.from_dict(self.attention_config)
        if self.attention_config is not None and not isinstance(self.attention_config, PixelflyAttentionConfig):
            raise ValueError(
                f"attention_config={self.attention_config!r} must be a PixelflyAttentionConfig, a dict of its "
                "fields, or None."
            )
        if self.attention_config is not None and self.attention != "pixelfly":
            raise ValueError(
                f"attention_config={self.attention_config!r} is set but attention={self.attention!r}: set "
                "attention='pixelfly' to use it, or drop attention_config."
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "PixelflyConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown PixelflyConfig key(s) {unknown}; valid keys: {sorted(known)}.")
        return cls(**values)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write `pixelfly_config.json` into save_directory (created if needed); returns the file's path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        return path

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, **hub_kwargs) -> "PixelflyConfig":
        """Read `pixelfly_config.json` from a local folder or a Hub repo (hub_kwargs go to hf_hub_download)."""
        path = os.path.join(path_or_repo_id, CONFIG_NAME)
        if not os.path.isfile(path):
            if os.path.isdir(path_or_repo_id):
                raise FileNotFoundError(f"no {CONFIG_NAME} in folder {path_or_repo_id!r}.")
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(str(path_or_repo_id), CONFIG_NAME, **hub_kwargs)
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
