"""Policy specs of the command line: ``csp``, ``csp:population``, ``snapkv:k1``, ``adakv``, ``csp+pyramid``,
``csp+imgpool+k3`` ... -> CSPConfig."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from csp_compile.config import CROSS_RATIO_RULES, CSPConfig
from csp_compile.policies import available_policies

__all__ = ["PolicySpec", "chunk_label", "parse_budgets", "parse_policies", "parse_policy", "parse_prefill_chunks"]


@dataclass(frozen=True)
class PolicySpec:
    """One evaluated policy: its label (``csp:mass``, ``adakv``, ``csp+pyramid``), registered policy and
    the CSPConfig fields it sets (``cross_ratio``, ``pool``, ``pool_kernel``, ``layer_budget``, ``head_budget``)."""

    label: str
    policy: str
    fields: tuple[tuple[str, Any], ...] = ()

    def config(self, budget: float, base: CSPConfig) -> CSPConfig:
        """``base`` with this policy, ``budget`` and the spec's fields."""
        return base.replace(policy=self.policy, budget=budget, **dict(self.fields))

    @property
    def cross_ratio(self) -> str | float | None:
        return dict(self.fields).get("cross_ratio")


# Baselines named after their papers: a registered policy plus the fields that make it that method.
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "adakv": ("snapkv", {"head_budget": "adaptive"}),  # AdaKV (Feng et al. 2024) on SnapKV scores
    "pyramidkv": ("snapkv", {"layer_budget": "pyramid"}),  # PyramidKV (Cai et al. 2024) on SnapKV scores
}
MODIFIERS: dict[str, dict[str, str]] = {
    "pyramid": {"layer_budget": "pyramid"}, "adaptive": {"head_budget": "adaptive"},
    "nopool": {"pool": "none"}, "pool1d": {"pool": "1d"}, "imgpool": {"pool": "image", "image_grid": "run"},
    "imgpool2d": {"pool": "image", "image_grid": "auto"},
}


def _allowed() -> str:
    rules = ", ".join(f"csp:{rule}" for rule in CROSS_RATIO_RULES)
    return (f"{', '.join(available_policies())}, {', '.join(ALIASES)}, {rules}, csp:<float in [0, 1]>, "
            f"snapkv:k<odd pooling kernel>, each optionally followed by {' / '.join('+' + m for m in MODIFIERS)} "
            f"/ +k<odd pooling kernel>")


def _parse_one(text: str, option: str) -> PolicySpec:
    head, *modifiers = text.split("+")
    name, colon, variant = head.partition(":")
    fields: dict[str, Any] = {}
    if name in ALIASES and not colon:
        name, aliased = ALIASES[name]
        fields.update(aliased)
    elif name not in available_policies():
        raise ValueError(f"{option}: unknown policy {text!r}; allowed {_allowed()}")
    if colon:
        fields.update(_variant(name, variant, text, option))
    for modifier in modifiers:
        kernel = _pool_kernel(modifier)
        if kernel is not None:
            fields["pool_kernel"] = kernel
        elif modifier in MODIFIERS:
            fields.update(MODIFIERS[modifier])
        else:
            raise ValueError(f"{option}: policy {text!r}: unknown modifier '+{modifier}'; allowed {_allowed()}")
    try:
        CSPConfig(policy=name, **fields)
    except ValueError as error:
        raise ValueError(f"{option}: policy {text!r}: {error}") from None
    return PolicySpec(text, name, tuple(sorted(fields.items())))


def _pool_kernel(text: str) -> int | None:
    """The kernel of ``k<odd int>`` (``snapkv:k1``, ``+k3``), else None."""
    digits = text[1:]
    return int(digits) if text.startswith("k") and digits.isdigit() and int(digits) % 2 == 1 else None


def _variant(name: str, variant: str, text: str, option: str) -> dict[str, Any]:
    """The fields of ``csp:<rule>`` or ``snapkv:k<kernel>``."""
    if name == "snapkv":
        kernel = _pool_kernel(variant)
        if kernel is None:
            raise ValueError(f"{option}: policy {text!r}: snapkv takes ':k<odd kernel>' (e.g. snapkv:k1); allowed {_allowed()}")
        return {"pool_kernel": kernel}
    if name != "csp":
        raise ValueError(f"{option}: policy {text!r}: only csp (cross-ratio rule) and snapkv (pooling kernel) take a "
                         f"variant after ':'; allowed {_allowed()}")
    if variant in CROSS_RATIO_RULES:
        return {"cross_ratio": variant}
    try:
        ratio = float(variant)
    except ValueError:
        raise ValueError(f"{option}: policy {text!r}: unknown cross-ratio rule {variant!r}; allowed {_allowed()}") from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{option}: policy {text!r}: cross ratio {ratio} is outside [0, 1]; allowed {_allowed()}")
    return {"cross_ratio": ratio}


def parse_policies(text: str, option: str = "--policies") -> list[PolicySpec]:
    """Comma-separated policy specs, in order, without duplicates; ValueError names ``option`` and the bad one."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise ValueError(f"{option} is empty: allowed a comma-separated list of {_allowed()}")
    specs = [_parse_one(part, option) for part in parts]
    labels = [spec.label for spec in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"{option} lists {', '.join(duplicates)} more than once")
    return specs


def parse_policy(text: str, option: str = "--policy") -> PolicySpec:
    """Exactly one policy spec (``csp``, ``csp:mass``, ``snapkv`` ...); ValueError names ``option`` and
    what is allowed, also for a comma-separated list."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > 1:
        raise ValueError(f"{option} {text!r} is a comma-separated list, but it takes exactly one policy: "
                         f"allowed one of {_allowed()}")
    if not parts[0]:
        raise ValueError(f"{option} is empty: allowed one of {_allowed()}")
    return _parse_one(parts[0], option)


def parse_budgets(text: str) -> list[float]:
    """Comma-separated budget fractions, each in (0, 1]; ValueError names the bad one."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise ValueError("--budgets is empty: allowed a comma-separated list of fractions in (0, 1]")
    budgets = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"budget {part!r} is not a number: allowed fractions in (0, 1]") from None
        if not 0.0 < value <= 1.0:
            raise ValueError(f"budget {part} is out of range: allowed fractions in (0, 1]")
        budgets.append(value)
    return budgets


def parse_prefill_chunks(text: str | None) -> list[int]:
    """``--prefill-chunk``: None -> [] (one-shot prefill only), else comma-separated chunk sizes,
    each an int >= 1, without duplicates; ValueError names the bad one."""
    if text is None:
        return []
    allowed = "allowed a comma-separated list of ints >= 1 (prompt tokens prefilled per chunk)"
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise ValueError(f"--prefill-chunk is empty: {allowed}")
    chunks = []
    for part in parts:
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"--prefill-chunk {part!r} is not an integer: {allowed}") from None
        if value < 1:
            raise ValueError(f"--prefill-chunk {part} is out of range: {allowed}")
        if value in chunks:
            raise ValueError(f"--prefill-chunk lists {value} more than once")
        chunks.append(value)
    return chunks


def chunk_label(label: str, prefill_chunk: int | None) -> str:
    """The policy label of a record: ``csp`` (one-shot prefill) or ``csp (chunk 32)``."""
    return label if prefill_chunk is None else f"{label} (chunk {prefill_chunk})"
