"""Range problems of the config, collected one line each (`Problems`), and the one line that refuses them
(`refuse`): what each section's own `check()` and `irm.config.check_all` share."""

from __future__ import annotations

from typing import Any


class Problems:
    """Collects range problems, each as `section.field=value is not valid; what a valid value is`."""

    def __init__(self, cfg: Any = None, prefix: str = ""):
        """Fields are named by where they sit in `cfg`, or with `prefix` (a section checking itself)."""
        self.cfg, self.prefix, self.out = cfg, prefix, []

    def need(self, ok: bool, where: str, value, rule: str) -> None:
        """Record `<problem>; <fix>`: the value and what a valid one is (a rule "must ..." reads after the field)."""
        if not ok:
            fix = f"{where} {rule}" if rule.startswith(("must", "each must")) else rule
            self.out.append(f"{where}={value!r} is not valid; {fix}")

    def at_least(self, section, name: str, low, optional: bool = False, rule: str | None = None) -> None:
        """`section.name` >= `low` (or None when `optional`); `rule` replaces the default `must be >= low` text."""
        v = getattr(section, name, None) if section is not None else None
        where = f"{self._name_of(section)}{name}"
        if v is None and optional:
            return
        self.need(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= low, where, v,
                  rule or f"must be >= {low}" + (" (or null)" if optional else ""))

    def positive(self, section, name: str) -> None:
        import math

        v = getattr(section, name)
        self.need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, f"{self._name_of(section)}{name}",
                  v, "must be a positive finite number")

    def fraction(self, section, name: str, low_open: bool = False) -> None:
        v = getattr(section, name)
        ok = (0.0 < v < 1.0) if low_open else (0.0 <= v < 1.0)
        self.need(ok, f"{self._name_of(section)}{name}", v,
                  "must be in (0, 1)" if low_open else "must be in [0, 1)")

    def _name_of(self, section) -> str:
        return self.prefix if self.cfg is None else _name_of(self.cfg, section)


def _name_of(cfg: Any, section) -> str:
    """`<field>.` of the RunConfig `cfg` that holds `section`; "" for `cfg` itself."""
    if section is cfg:
        return ""
    for f in cfg.__dataclass_fields__:
        if getattr(cfg, f) is section:
            return f"{f}."
    return ""


def refuse(problems: list[str]) -> None:
    """One UserError line for `problems` (the first, and how many more), or nothing when there are none."""
    from irm.errors import UserError

    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:3])})" if len(problems) > 1 else ""
        raise UserError(f"bad configuration: {problems[0]}{more}")
