"""PixelflyConfig: which matrices of a model become Pixelfly and with what budget (PEFT-style).

Knows nothing about models or kernels: it only validates and (de)serialises the user's choices. The per-module
plan that `get_model` derives from it lives in the patched model's own config (`config.pixelfly`).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

CONFIG_NAME = "pixelfly_config.json"

ROLES = ("attn", "mlp")
INIT_CHOICES = ("project", "random")
ATTENTION_CHOICES = ("dense", "pixelfly")
# fields a per-module override may set
OVERRIDE_KEYS = ("density", "butterfly_size", "n_factors", "low_rank", "gate", "block_size")


def _is_power_of_two(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


def _check_structure(where: str, values: dict) -> None:
    """Validate density / butterfly_size / n_factors / low_rank / gate / block_size found in `values`."""
    density = values.get("density")
    bs, k = values.get("butterfly_size"), values.get("n_factors")
    if density is not None and (isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1):
        raise ValueError(f"{where}density={density!r} must be a fraction in (0, 1], e.g. 0.25 for a quarter of dense.")
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
    if bs is not None and (not _is_power_of_two(bs) or bs < 2):
        raise ValueError(f"{where}butterfly_size={bs!r} must be a power of 2 and at least 2 (e.g. 4, 8, 16).")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0 or (1 << k) > bs):
        raise ValueError(f"{where}n_factors={k!r} must be an integer in [0, log2(butterfly_size={bs})].")
    rank = values.get("low_rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
        raise ValueError(f"{where}low_rank={rank!r} must be an integer >= 0 (0 disables the low-rank term).")
    block = values.get("block_size")
    if block is not None and (not _is_power_of_two(block) or block < 16):
        raise ValueError(f"{where}block_size={block!r} must be a power of 2 and at least 16 (16, 32, 64 or 128).")
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


@dataclass
class PixelflyConfig:
    """What to replace with Pixelfly (flat block butterfly + low rank) and the budget.

    target_modules: a list whose entries are roles ("attn": the attention projections, "mlp": the MLP matrices)
        or module-name patterns (an entry matches a module whose name equals it or ends with "." + it; entries
        are regexes, so "h\\.[01]\\.mlp\\.c_fc" works); or one string, a regex that must match a whole name.
    exclude_modules: same forms; matching modules stay dense.
    density: the budget per matrix as a fraction of its dense parameters, low rank included (planner mode;
        default 0.25). Or give butterfly_size and n_factors for an explicit layout instead.
    low_rank: the requested rank of the low-rank term; the planner may lower it to fit the budget.
    gate: mix the sparse and low-rank terms with a learned per-token gate.
    block_size: the kernel's minimum tile edge (16 for tiny models, 32 default, 64/128 for speed).
    overrides: {role or pattern: {field: value}} with fields among density, butterfly_size, n_factors,
        low_rank, gate, block_size; applied in order, later keys win.
    init: "project" fits the existing dense weights (truncated SVD + tiles), "random" re-initialises.
    projection_iters: alternating-projection iterations for init="project".
    attention: "dense" keeps the model's attention; "pixelfly" switches to Pixelfly attention with the
        options in attention_config (see pixelfly_hf.attention).
    """

    target_modules: list[str] | str = field(default_factory=lambda: ["attn", "mlp"])
    exclude_modules: list[str] | str | None = None
    density: float | None = None
    butterfly_size: int | None = None
    n_factors: int | None = None
    low_rank: int = 32
    gate: bool = False
    block_size: int = 32
    overrides: dict[str, dict] = field(default_factory=dict)
    init: str = "project"
    projection_iters: int = 3
    attention: str = "dense"
    attention_config: dict | None = None

    def __post_init__(self):
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        if self.density is None and self.butterfly_size is None and self.n_factors is None:
            self.density = 0.25
        self.validate()

    def validate(self) -> None:
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
        if self.attention_config is not None and not isinstance(self.attention_config, dict):
            raise ValueError(f"attention_config={self.attention_config!r} must be a dict of attention options or None.")
        if self.attention_config and self.attention != "pixelfly":
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
