"""`bigadapt generate RUN`: try what you trained, on a prompt, a JSONL file of prompts, or in a chat.

The model is the run's base with its trained adapter (`export.load_model`): in one process, or under a launcher
(`deepspeed --num_gpus N launch/bigadapt.py generate RUN ...`) sharded over the ranks with ZeRO-3 exactly as
training builds it, every rank decoding its share of the prompts (`evaluate.generate_sharded`). `--merged`
folds the adapter into the base first, as deployed. Runs of `data.task: sft` render each prompt with the run's
chat template (`bigadapt.data.chat`); other runs tokenize the text as is.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from . import evaluate, export, zero
from .errors import ConfigError, DataError


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory or checkpoint directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (sft runs: the user's message)")
    src.add_argument("--chat", action="store_true", help="interactive: one message per line; empty line or EOF ends")
    src.add_argument("--file", help="JSONL, one row per prompt: {\"prompt\": ...} or {\"messages\": [...]}")
    p.add_argument("--out", help="write JSONL rows (the input row + \"output\") here instead of stdout")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: greedy)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of the default greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per generate call")
    p.add_argument("--merged", action="store_true", help="fold the adapter into the base first (LoRA, BitFit)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher


def settings_from(args) -> evaluate.GenerationSettings:
    return evaluate.GenerationSettings(num_beams=args.num_beams, length_penalty=1.0, no_repeat_ngram_size=0,
                                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                       do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
                                       top_k=args.top_k)


def main(args) -> int:
    _, _, cfg = export.read_run(args.run)  # refuse before building anything
    if cfg.model.objective != "causal_lm":
        raise ConfigError(f"{args.run}: model.objective={cfg.model.objective} is a classifier and cannot generate; "
                          f"use `bigadapt eval {args.run}`")
    if args.chat and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--chat reads stdin in one process; run it without the launcher (or use --file)")
    if args.chat and cfg.data.task != "sft":
        raise ConfigError(f"--chat needs a chat run (data.task: sft); this run is {cfg.data.task}: use --prompt")
    rows = read_rows(args.file) if args.file else [{"prompt": args.prompt}] if args.prompt is not None else []
    model, _, cfg = export.load_model(args.run)
    if args.merged:
        export.fold(model, cfg)
    gen = Generator(model, cfg, settings_from(args), args.seed)
    if args.chat:
        return gen.chat(sys.stdin, sys.stdout)
    outputs = gen.texts([gen.encode(r.get("prompt"), r.get("messages")) for r in rows])
    if outputs is None:  # ranks other than 0
        return 0
    if args.prompt is not None and not args.out:
        print(outputs[0])
        return 0
    lines = "".join(json.dumps(dict(r, output=o), ensure_ascii=False) + "\n" for r, o in zip(rows, outputs))
    if args.out:
        Path(args.out).write_text(lines)
    else:
        sys.stdout.write(lines)
    return 0


def read_rows(path: str) -> list[dict]:
    """JSONL rows that each hold `prompt` (text) or `messages` (a chat); anything else is a one-line DataError."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"--file {path}: no such file")
    rows = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not (isinstance(row.get("prompt"), str) or isinstance(row.get("messages"),
                                                                                                list)):
            raise DataError(f"{path}:{n}: each row needs \"prompt\" (text) or \"messages\" (a list of "
                            f"{{\"role\", \"content\"}})")
        rows.append(row)
    return rows


class Generator:
    """The run's model, tokenizer and decoding settings; prompts in, texts out (on rank 0)."""

    def __init__(self, model, cfg, settings: evaluate.GenerationSettings, seed: int = 0):
        from .data.chat import stop_ids
        from .data.tasks import task_tokenizer
        from .model import pad_id
        self.model, self.cfg, self.settings, self.seed = model, cfg, settings, seed
        self.tok = task_tokenizer(cfg, model.config.vocab_size)
        self.pad = pad_id(model)
        # a chat reply ends at its end-of-turn marker too, which is often not eos
        self.eos = stop_ids(self.tok, cfg.data, getattr(model.config, "eos_token_id", None))
        room = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 0)
        self.keep = max(1, room - settings.max_new_tokens) if room else None  # prompt tokens that fit

    def encode(self, prompt: str | None, messages: list[dict] | None = None) -> list[int]:
        if self.cfg.data.task == "sft":
            from .data.chat import chat_prompt_ids
            ids = list(chat_prompt_ids(self.tok, self.cfg.data, messages or [{"role": "user", "content": prompt}]))
        elif messages is not None:
            raise DataError(f"data.task={self.cfg.data.task}: \"messages\" rows need a chat template (an sft run); "
                            f"give \"prompt\" text")
        elif getattr(self.tok, "is_fallback", False):
            ids = self.tok.encode(prompt)
        else:
            ids = list(self.tok(prompt)["input_ids"])
        return ids[-self.keep:] if self.keep else ids  # the end of a long prompt is what continues

    def texts(self, prompts: list[list[int]]) -> list[str] | None:
        """*Collective.* Decoded continuations on rank 0, None elsewhere."""
        torch.manual_seed(self.seed + zero.rank())
        outs = evaluate.generate_sharded(self.model, prompts, self.settings, self.pad, self.eos,
                                         progress=len(prompts) > 1)
        if outs is None:
            return None
        return [self.tok.decode(o, skip_special_tokens=True).strip() for o in outs]

    def chat(self, stdin, stdout) -> int:
        """One user message per line; the conversation accumulates; an empty line or EOF ends it."""
        messages: list[dict] = []
        while True:
            stdout.write("> ")
            stdout.flush()
            line = stdin.readline()
            if not line.strip():
                return 0
            messages.append({"role": "user", "content": line.strip()})
            reply = self.texts([self.encode(None, messages)])[0]
            messages.append({"role": "assistant", "content": reply})
            stdout.write(reply + "\n")
