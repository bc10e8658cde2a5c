r"""LoRA (Hu et al. 2021): h = W0 x + (alpha/r) B A x, with A random, B zero, dropout on the LoRA input only.

One `LoRA` module wraps a frozen nn.Linear or GPT-2 Conv1D. On a fused projection (GPT-2 `c_attn` = [q|k|v])
only the enabled slices get a (B_i, A_i) pair; A stacks the enabled A_i as rows, B stacks the B_i.
The hot path never copies the base weight, skips dropout when p = 0, and multiplies (x A^T) B^T so the
wide product is never formed. Merging adds the same delta into the base weight explicitly (never as a
side effect of .eval()), one module at a time, gathered under ZeRO-3.

Per-module rank and alpha (`method.rank_pattern`, `method.alpha_pattern`) follow peft's rule exactly, so an
exported adapter means the same thing there: each key is a regex that selects a module when
`re.match(rf"(.*\.)?({key})$", name)` does (the whole name, or its tail after a dot); the first key in the
dict's order wins, unmatched modules keep `r` / `alpha`. DoRA (`method.dora`) lives in dora.py.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from .. import targets as tg
from .. import zero
from ..errors import BigadaptError, ConfigError
from . import lora_branch


def _shape(base: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out): Conv1D stores its weight as [in, out]."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, False
    if isinstance(base, tg._conv1d()):
        rows, cols = zero.full_shape(base.weight)
        return rows, cols, True
    raise BigadaptError(f"LoRA supports nn.Linear and GPT-2 Conv1D, not {type(base).__name__}")


class LoRA(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 slices: tuple[int, ...] | None = None, n_parts: int = 1, rslora: bool = False):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features, self.fan_in_fan_out = _shape(base)
        part = self.out_features // n_parts
        # [(start, stop)] of the base output that each (A_i, B_i) writes to
        self.spans = tuple((i * part, (i + 1) * part) for i in slices) if slices else ((0, self.out_features),)
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        self.lora_A = nn.Parameter(torch.empty(len(self.spans) * r, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(sum(b - a for a, b in self.spans), r))
        # as the authors' loralib: kaiming-uniform A, zero B, so training starts from the base model
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        h = F.dropout(x, self.dropout, self.training) if self.dropout and self.training else x
        return lora_branch.add(y, h.to(self.lora_A.dtype), self.lora_A, self.lora_B, self.scaling,
                               self.spans, self.r)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A laid out like the base weight ([out, in], or [in, out] for Conv1D), in fp32."""
        A, B = self.lora_A.float(), self.lora_B.float()
        full = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=A.device)
        row = 0
        for i, (a, b) in enumerate(self.spans):
            full[a:b] = B[row:row + b - a] @ A[i * self.r:(i + 1) * self.r]
            row += b - a
        full *= self.scaling
        return full.T if self.fan_in_fan_out else full

    def merge(self, sign: float = 1.0) -> None:
        w = self.base_layer.weight
        with zero.gathered([w, self.lora_A, self.lora_B], modify=True) as writer:
            if writer:
                w.data += (sign * self.delta_weight()).to(w.dtype)
        self.merged = sign > 0

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, spans={self.spans}, dropout={self.dropout}"


def validate(mcfg) -> None:
    """The LoRA keys config.validate does not check (r, alpha, dropout, targets are checked there)."""
    for key, kind in (("rank_pattern", "a positive integer rank"), ("alpha_pattern", "a positive number")):
        table = getattr(mcfg, key)
        if not isinstance(table, dict):
            raise ConfigError(f"method.{key}={table!r}: give a mapping {{module-name regex: {kind}}}")
        for pattern, value in table.items():
            try:
                re.compile(_peft_regex(pattern))
            except (re.error, TypeError) as e:
                raise ConfigError(f"method.{key}: {pattern!r} is not a valid regex ({e}); escape it or fix it") \
                    from None
            number = isinstance(value, int) if key == "rank_pattern" else isinstance(value, (int, float))
            if isinstance(value, bool) or not number or value <= 0:
                raise ConfigError(f"method.{key}[{pattern!r}]={value!r}: must be {kind}")
    if mcfg.dora and mcfg.name == "qlora":
        raise ConfigError("method.dora=true: DoRA needs the base weight's row norms, which a 4/8-bit base does "
                          "not hold exactly; use method.name=lora on a full-precision base, or method.dora=false")


def _peft_regex(key: str) -> str:
    """peft's get_pattern_key rule (peft/utils/other.py): the key matches the whole name or its tail after a dot."""
    return rf"(.*\.)?({key})$"


def pattern_value(table: dict, name: str, default):
    """The value of the first key (in the dict's order) whose regex matches the module name, as peft picks it."""
    for key, value in table.items():
        if re.match(_peft_regex(key), name):
            return value
    return default


def inject(model: nn.Module, mcfg, cls: type | None = None) -> list[str]:
    """Wrap every resolved target in a LoRA module (`cls`: LoRA, or DoRA when method.dora); returns the names."""
    from . import dora, lora_init
    cls = cls or (dora.DoRA if mcfg.dora else LoRA)
    found = tg.resolve(model, mcfg.targets)
    _check_patterns_match(mcfg, [t.name for t in found])
    for t in found:
        r = pattern_value(mcfg.rank_pattern, t.name, mcfg.r)
        alpha = pattern_value(mcfg.alpha_pattern, t.name, mcfg.alpha)
        lora = cls(t.module, r, alpha, mcfg.dropout, t.slices, t.n_parts, mcfg.rslora)
        _replace(model, t.name, lora)
        lora_init.init(lora, mcfg.lora_init, t.name)  # gaussian/PiSSA/OLoRA: A, B (and W0's residual) from W0
        if isinstance(lora, dora.DoRA):  # last: the norm of W0 + s B A as initialised (after any A/B/W0 init)
            lora.init_magnitude()
    return [t.name for t in found]


def _check_patterns_match(mcfg, names: list[str]) -> None:
    """A pattern that selects no targeted module is a typo (peft only warns): refuse before anything is built."""
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in getattr(mcfg, key):
            if not any(re.match(_peft_regex(pattern), n) for n in names):
                raise ConfigError(f"method.{key}: {pattern!r} matches none of the {len(names)} targeted modules "
                                  f"(e.g. {names[0]!r}); write a regex for a module name or its dotted tail")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def lora_modules(model: nn.Module) -> list[tuple[str, LoRA]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRA)]


def merge(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        if not m.merged:
            m.merge(+1.0)


def unmerge(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        if m.merged:
            m.merge(-1.0)


def unwrap(model: nn.Module) -> None:
    """Replace each (merged) LoRA wrapper by its base layer: a plain Hugging Face model again."""
    for name, m in lora_modules(model):
        if not m.merged:
            raise BigadaptError(f"{name}: merge before unwrapping, or the LoRA update would be dropped")
        _replace(model, name, m.base_layer)
