"""`CSPConfig`: every knob of the pruning pass, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

CROSS_RATIO_RULES = ("auto", "population", "mass")
NEW_TURN_MODES = ("evict", "append")
LAYER_BUDGETS = ("uniform", "pyramid")
HEAD_BUDGETS = ("uniform", "adaptive")
MASS_POLICIES = ("csp", "csp_giveback", "snapkv", "h2o")  # scores that are attention mass, comparable across heads
POOL_MODES = ("none", "1d", "image")
IMAGE_GRIDS = ("run", "square", "auto")


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"CSPConfig.{field}={value!r} is invalid: allowed {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_budget_value(field: str, value: Any, prefix: str = "") -> None:
    allowed = f"{prefix}a float in (0, 1] (fraction) or an int >= 1 (tokens)"
    if _is_int(value):
        if value < 1:
            _fail(field, value, allowed)
    elif isinstance(value, float):
        if not (math.isfinite(value) and 0.0 < value <= 1.0):
            _fail(field, value, allowed)
    else:
        _fail(field, value, allowed)


@dataclass(frozen=True, kw_only=True)
class CSPConfig:
    """Configuration of KV-cache pruning at prefill (docs/design.md §2).

    budget: float in (0, 1] = fraction of the prompt kept, or int >= 1 = tokens kept
        (note: ``1`` keeps one token, ``1.0`` keeps everything).
    window: the last ``window`` prompt tokens are the observation queries and always kept.
    cross_ratio: share of the non-window budget spent on cross-modal scores: a float in
        [0, 1] or a rule, "auto" (mean of the other two), "population" or "mass".
    n: the n of n-softmax, ``exp(x_i) / (n + sum_j exp(x_j))``; 0 is plain softmax.
    policy: name of a registered policy (see ``csp_compile.policies.available_policies()``).
    sink_tokens: leading tokens the "streaming" policy always keeps.
    pool: how a window-scored policy (csp, csp_giveback, snapkv) smooths its scores over neighbouring keys
        before ranking (``scoring.pool_scores``): None (the policy's default: "1d" for snapkv, "none" for
        csp), "none", "1d" (average over ``pool_kernel`` consecutive keys, SnapKV's) or "image" (image
        and video tokens averaged over their neighbours on the image's own patch grid, text unpooled).
    pool_kernel: the pooling width (odd; "image" pools a pool_kernel x pool_kernel square); 5 as in
        SnapKV's reference code and kvpress.
    image_grid: the neighbourhood of "image" pooling: "run" (``pool_kernel`` tokens along each run of
        consecutive image tokens: measured better than 2-D on the grid task, the default), "square"
        (each run whose count is a square number is a row-major square grid, pooled
        ``pool_kernel`` x ``pool_kernel``: Llava, Gemma3, PaliGemma, Idefics3 tiles) or "auto" (the model
        family's grid, resolved by ``optimize`` and the vLLM plugin; "run" where no model is known).
    seed: seed of the "random" policy.
    on_new_turn: what a call of more than one token on a non-empty cache (a new turn of a
        conversation) does: "evict" re-selects ``B`` of the logical total among [kept cache + new
        tokens], the new tokens' last ``window`` being the observation window; "append" keeps the
        pruned cache and appends the new tokens.
    decode_budget: decode-time eviction: None (off), a float in (0, 1] (fraction of the tokens seen)
        or an int >= 1 (tokens); every ``decode_every`` decoded tokens each evicting layer is
        re-scored with the last ``window`` tokens' queries and compressed back to it.
    decode_every: decoded tokens between two decode-time compressions (an int >= 1).
    prefill_chunk: None (one-shot prefill) or an int >= 1: a longer prompt is prefilled this many
        tokens at a time, re-selecting after each chunk, so the KV cache peaks at about B + chunk.
    layer_budget: "uniform" (every layer keeps B) or "pyramid" (PyramidKV: more in lower layers, the
        same total; ``csp_compile.adaptive``).
    head_budget: "uniform" (every KV head keeps B) or "adaptive" (AdaKV: a layer's picks go to the heads
        whose scores hold the most attention mass, the same total per layer; csp, snapkv, h2o only).
        Either adaptive setting keeps a rectangular cache of W + 2K slots per head (shorter heads
        padded and masked at decode) and works with one-shot prefill and on_new_turn="append".
    """

    budget: float | int = 0.2
    window: int = 32
    cross_ratio: float | str = "auto"
    n: float = 1.0
    policy: str = "csp"
    sink_tokens: int = 4
    pool: str | None = None
    pool_kernel: int = 5
    image_grid: str = "run"
    seed: int = 0
    on_new_turn: str = "evict"
    decode_budget: float | int | None = None
    decode_every: int = 16
    prefill_chunk: int | None = None
    layer_budget: str = "uniform"
    head_budget: str = "uniform"

    def __post_init__(self) -> None:
        self._check_budget()
        if not _is_int(self.window) or self.window < 1:
            _fail("window", self.window, "an int >= 1")
        self._check_cross_ratio()
        if not _is_real(self.n) or not math.isfinite(self.n) or self.n < 0:
            _fail("n", self.n, "a finite float >= 0 (0 = plain softmax)")
        object.__setattr__(self, "n", float(self.n))
        self._check_policy()
        if not _is_int(self.sink_tokens) or self.sink_tokens < 0:
            _fail("sink_tokens", self.sink_tokens, "an int >= 0")
        if not _is_int(self.pool_kernel) or self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            _fail("pool_kernel", self.pool_kernel, "an odd int >= 1")
        self._check_pool()
        if not _is_int(self.seed) or self.seed < 0:
            _fail("seed", self.seed, "an int >= 0")
        if not isinstance(self.on_new_turn, str) or self.on_new_turn not in NEW_TURN_MODES:
            _fail("on_new_turn", self.on_new_turn, f"one of {list(NEW_TURN_MODES)}")
        self._check_adaptive()

    def _check_adaptive(self) -> None:
        if not isinstance(self.layer_budget, str) or self.layer_budget not in LAYER_BUDGETS:
            _fail("layer_budget", self.layer_budget, f"one of {list(LAYER_BUDGETS)}")
        if not isinstance(self.head_budget, str) or self.head_budget not in HEAD_BUDGETS:
            _fail("head_budget", self.head_budget, f"one of {list(HEAD_BUDGETS)}")
        if self.head_budget == "adaptive" and self.policy not in MASS_POLICIES:
            _fail("head_budget", self.head_budget, f"'uniform' with policy {self.policy!r} (adaptive needs "
                  f"attention-mass scores: policy one of {list(MASS_POLICIES)})")
        if self.layer_budget == "uniform" and self.head_budget == "uniform":
            return
        for name in ("decode_budget", "prefill_chunk"):
            if getattr(self, name) is not None:
                _fail(name, getattr(self, name), f"None with layer_budget={self.layer_budget!r} / head_budget="
                      f"{self.head_budget!r} (adaptive budgets do not re-select yet)")

    def _check_pool(self) -> None:
        from csp_compile.policies import get_policy, window_scored_policies

        if self.pool is not None and (not isinstance(self.pool, str) or self.pool not in POOL_MODES):
            _fail("pool", self.pool, f"None (the policy's default) or one of {list(POOL_MODES)}")
        if self.pool not in (None, "none") and get_policy(self.policy).default_pool is None:
            _fail("pool", self.pool, f"None or 'none' with policy {self.policy!r} (pooling smooths window scores: "
                  f"policy one of {list(window_scored_policies())})")
        if not isinstance(self.image_grid, str) or self.image_grid not in IMAGE_GRIDS:
            _fail("image_grid", self.image_grid, f"one of {list(IMAGE_GRIDS)}")

    @property
    def pooling(self) -> str:
        """The pooling mode in effect: ``pool``, else the policy's default ("none" for unpooled policies)."""
        from csp_compile.policies import get_policy

        return self.pool if self.pool is not None else (get_policy(self.policy).default_pool or "none")

    def _check_budget(self) -> None:
        _check_budget_value("budget", self.budget)
        if self.decode_budget is not None:
            _check_budget_value("decode_budget", self.decode_budget, "None (off), ")
        if not _is_int(self.decode_every) or self.decode_every < 1:
            _fail("decode_every", self.decode_every, "an int >= 1")
        if self.prefill_chunk is not None and (not _is_int(self.prefill_chunk) or self.prefill_chunk < 1):
            _fail("prefill_chunk", self.prefill_chunk, "None (one-shot prefill) or an int >= 1")

    @property
    def decode_config(self) -> "CSPConfig":
        """This config with ``budget = decode_budget`` (what a decode-time compression keeps)."""
        if self.decode_budget is None:
            raise ValueError("CSPConfig.decode_budget is None: decode-time eviction is off")
        return self.replace(budget=self.decode_budget, decode_budget=None, prefill_chunk=None)

    def _check_cross_ratio(self) -> None:
        allowed = f"a float in [0, 1] or one of {list(CROSS_RATIO_RULES)}"
        if isinstance(self.cross_ratio, str):
            if self.cross_ratio not in CROSS_RATIO_RULES:
                _fail("cross_ratio", self.cross_ratio, allowed)
        elif _is_real(self.cross_ratio) and math.isfinite(self.cross_ratio) and 0 <= self.cross_ratio <= 1:
            object.__setattr__(self, "cross_ratio", float(self.cross_ratio))
        else:
            _fail("cross_ratio", self.cross_ratio, allowed)

    def _check_policy(self) -> None:
        from csp_compile.policies import available_policies

        known = available_policies()
        if not isinstance(self.policy, str) or self.policy not in known:
            _fail("policy", self.policy, f"one of {list(known)}")

    def replace(self, **overrides: Any) -> "CSPConfig":
        """A copy with ``overrides`` applied (validated); unknown field names raise ValueError."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"CSPConfig has no field(s) {unknown}: allowed {sorted(names)}")
        return dataclasses.replace(self, **overrides)


def pooling_in_words(config: CSPConfig) -> str:
    """``config.pooling`` in one line, as ``explain`` prints it."""
    mode, kernel = config.pooling, config.pool_kernel
    origin = "" if config.pool is not None else f" (policy {config.policy}'s default)"
    if mode == "none":
        return f"none{origin}"
    if mode == "1d":
        return f"1d{origin}: each key averaged over {kernel} consecutive keys"
    if config.image_grid == "square":
        shape = (f"its {kernel} x {kernel} neighbours on the image's square grid (1-D over {kernel} along a run "
                 f"of a non-square count, and when re-selecting a pruned cache)")
    else:
        grid = "" if config.image_grid == "run" else f" (image_grid={config.image_grid!r}: no model to resolve it)"
        shape = f"the {kernel} tokens around it along its run of image tokens{grid}"
    return f"image{origin}: each image / video token averaged over {shape}; text unpooled"
