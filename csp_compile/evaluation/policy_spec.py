"""Policy specs of the command line: ``csp``, ``csp:population``, ``snapkv`` ... -> CSPConfig."""

from __future__ import annotations

from dataclasses import dataclass

from csp_compile.config import CROSS_RATIO_RULES, CSPConfig
from csp_compile.policies import available_policies

__all__ = ["PolicySpec", "chunk_label", "parse_budgets", "parse_policies", "parse_policy", "parse_prefill_chunks"]


@dataclass(frozen=True)
class PolicySpec:
    """One evaluated policy: its label (``csp:mass``), registered policy and cross-ratio override."""

    label: str
    policy: str
    cross_ratio: str | float | None = None

    def config(self, budget: float, base: CSPConfig) -> CSPConfig:
        """``base`` with this policy and ``budget`` (and the cross-ratio rule, when the spec names one)."""
        fields: dict = {"policy": self.policy, "budget": budget}
        if self.cross_ratio is not None:
            fields["cross_ratio"] = self.cross_ratio
        return base.replace(**fields)


def _allowed() -> str:
    rules = ", ".join(f"csp:{rule}" for rule in CROSS_RATIO_RULES)
    return f"{', '.join(available_policies())}, {rules} or csp:<float in [0, 1]>"


def _parse_one(text: str, option: str) -> PolicySpec:
    name, colon, rule = text.partition(":")
    if name not in available_policies():
        raise ValueError(f"{option}: unknown policy {text!r}; allowed {_allowed()}")
    if not colon:
        return PolicySpec(text, name)
    if name != "csp":
        raise ValueError(f"{option}: policy {text!r}: only csp takes a cross-ratio rule after ':'; allowed {_allowed()}")
    if rule in CROSS_RATIO_RULES:
        return PolicySpec(text, name, rule)
    try:
        ratio = float(rule)
    except ValueError:
        raise ValueError(f"{option}: policy {text!r}: unknown cross-ratio rule {rule!r}; allowed {_allowed()}") from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{option}: policy {text!r}: cross ratio {ratio} is outside [0, 1]; allowed {_allowed()}")
    return PolicySpec(text, name, ratio)


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
