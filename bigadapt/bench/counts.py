"""`python -m bigadapt.bench.counts`: every method's trainable-parameter count beside the LoRA paper's.

Counts come from meta-device models (shapes only, no memory): `model.build_meta` + `methods.apply`, the
same code a run uses, so GPT-3 175B takes seconds. Task heads are left out, as in the paper's counts.
Paper numbers: LoRA paper Tables 2, 3, 4 and 15 (RoBERTa-base, GPT-2 medium, GPT-3 175B); settings the paper
does not print (adapter sizes on GPT-2 M and RoBERTa-base) are the ones that reproduce its counts.
"""
from __future__ import annotations

import argparse
import time

from .. import methods
from ..config import config_from_dict
from ..model import build_meta

GPT2_M = {"model_type": "gpt2", "n_layer": 24, "n_embd": 1024, "n_head": 16}
ROBERTA_BASE = {"model_type": "roberta", "num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
                "intermediate_size": 3072, "vocab_size": 50265}
GPT3_175B = {"model_type": "gpt2", "n_layer": 96, "n_embd": 12288, "n_head": 96, "n_positions": 2048,
             "vocab_size": 50257}
MODELS = {"GPT-2 M": (GPT2_M, "causal_lm"), "RoBERTa-base": (ROBERTA_BASE, "seq_cls"),
          "GPT-3 175B": (GPT3_175B, "causal_lm")}

# (model, method settings, paper's count as printed or None, where the paper prints it)
ROWS = [
    ("GPT-2 M", {"name": "full"}, "354.92M", "Table 3"),
    ("GPT-2 M", {"name": "ft_top_k", "top_k": 2}, "25.19M", "Table 3 (FTTop2)"),
    ("GPT-2 M", {"name": "bitfit"}, None, ""),
    ("GPT-2 M", {"name": "bitfit", "bitfit_subset": True}, None, ""),
    ("GPT-2 M", {"name": "adapter_l", "r": 6}, "0.37M", "Table 3"),
    ("GPT-2 M", {"name": "adapter_l", "r": 224}, "11.09M", "Table 3"),
    ("GPT-2 M", {"name": "adapter_h", "r": 111}, "11.09M", "Table 3"),
    ("GPT-2 M", {"name": "adapter_p", "r": 8}, None, ""),
    ("GPT-2 M", {"name": "adapter_d", "r": 8, "adapter_drop": 6}, None, ""),
    ("GPT-2 M", {"name": "lora", "r": 4, "targets": ["q", "v"]}, "0.35M", "Table 3"),
    ("RoBERTa-base", {"name": "full"}, "125.0M", "Table 2"),
    ("RoBERTa-base", {"name": "bitfit"}, "0.1M", "Table 2"),
    ("RoBERTa-base", {"name": "bitfit", "bitfit_subset": True}, None, ""),
    ("RoBERTa-base", {"name": "adapter_d", "r": 16}, "0.3M", "Table 2 (AdptD)"),
    ("RoBERTa-base", {"name": "adapter_d", "r": 48}, "0.9M", "Table 2 (AdptD)"),
    ("RoBERTa-base", {"name": "adapter_h", "r": 8}, None, ""),
    ("RoBERTa-base", {"name": "adapter_l", "r": 8}, None, ""),
    ("RoBERTa-base", {"name": "adapter_p", "r": 16}, None, ""),
    ("RoBERTa-base", {"name": "ft_top_k", "top_k": 2}, None, ""),
    ("RoBERTa-base", {"name": "lora", "r": 8, "targets": ["q", "v"]}, "0.3M", "Table 2"),
    ("GPT-3 175B", {"name": "full"}, "175,255.8M", "Table 4"),
    ("GPT-3 175B", {"name": "ft_top_k", "top_k": 2}, None, ""),
    ("GPT-3 175B", {"name": "bitfit"}, "14.2M", "Table 4"),
    ("GPT-3 175B", {"name": "bitfit", "bitfit_subset": True}, None, ""),
    ("GPT-3 175B", {"name": "adapter_h", "r": 1}, "7.1M", "Tables 4, 15"),
    ("GPT-3 175B", {"name": "adapter_h", "r": 4}, "21.2M", "Table 15"),
    ("GPT-3 175B", {"name": "adapter_h", "r": 8}, "40.1M", "Tables 4, 15"),
    ("GPT-3 175B", {"name": "adapter_h", "r": 64}, "304.4M", "Table 15"),
    ("GPT-3 175B", {"name": "adapter_l", "r": 8}, None, ""),
    ("GPT-3 175B", {"name": "adapter_p", "r": 8}, None, ""),
    ("GPT-3 175B", {"name": "adapter_d", "r": 8, "adapter_drop": 48}, None, ""),
    ("GPT-3 175B", {"name": "lora", "r": 1, "targets": ["q", "v"]}, "4.7M", "Tables 4, 15"),
    ("GPT-3 175B", {"name": "lora", "r": 8, "targets": ["q", "v"]}, "37.7M", "Tables 4, 15"),
]


def trainable(model_name: str, method: dict) -> int:
    """Trainable elements after `methods.apply` on a meta-device model (task head excluded)."""
    arch, objective = MODELS[model_name]
    cfg = config_from_dict({"model": {"arch": arch, "objective": objective},
                            "method": dict({"train_head": False}, **method)})
    model = build_meta(cfg.model)
    methods.apply(model, cfg)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def setting(method: dict) -> str:
    keys = {"r": "r", "top_k": "top_k", "adapter_drop": "adapter_drop", "targets": "targets"}
    parts = [f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in method.items() if k in keys]
    return " ".join((["subset"] if method.get("bitfit_subset") else []) + parts)


def same_as_printed(count: int, paper: str) -> bool:
    """Does our count round to the paper's number at the precision the paper prints?"""
    digits = paper.rstrip("M").replace(",", "")
    decimals = len(digits.partition(".")[2])
    return round(count / 1e6, decimals) == float(digits)


def table(rows=ROWS) -> str:
    lines = ["| model | method | setting | bigadapt | paper | paper's precision | where |",
             "| --- | --- | --- | ---: | ---: | :---: | --- |"]
    for model_name, method, paper, where in rows:
        n = trainable(model_name, method)
        match = ("=" if same_as_printed(n, paper) else "differs") if paper else ""
        lines.append(f"| {model_name} | {method['name']} | {setting(method)} | {n:,} ({n / 1e6:,.2f}M) | "
                     f"{paper or '—'} | {match} | {where} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bigadapt.bench.counts", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), help="only this model's rows")
    args = p.parse_args(argv)
    t0 = time.time()
    print(table([r for r in ROWS if args.model in (None, r[0])]))
    print(f"\n(meta-device counts, {time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
