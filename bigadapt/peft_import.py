"""Coming in from peft: a LoRA adapter directory (adapter_config.json + adapter_model.safetensors or .bin) as
bigadapt's LoRA tensors, checked against the run's config and base before anything is written.

peft's tensors are per module: `base_model.model.<module>.lora_A.weight` [r', in], `lora_B.weight` [out, r'],
`lora_magnitude_vector` [out] (DoRA) and `base_model.model.<head param>` (modules_to_save). Its scaling is
lora_alpha / r' (or / sqrt(r') with use_rslora), r' and lora_alpha per module by rank_pattern/alpha_pattern.

What maps exactly:
- a whole module (nn.Linear, GPT-2 Conv1D: peft's A and B have the same layout either way) onto a bigadapt LoRA of
  the same rank and scaling: A and B as they are;
- a fused GPT-2 `c_attn` onto bigadapt's q,v (or any) slices: only if peft's rank is k r and its B is zero outside
  each slice's own r columns, which is how `bigadapt export` writes it. A peft c_attn LoRA that writes to every
  slice is refused in one line (target `c_attn` as a module pattern instead).
Everything else (another rank, scaling, target set, DoRA on one side only, a peft feature bigadapt has not) is one
ConfigError naming `method.init_from` (or the import) and the key to set. The residual inits (pissa, olora) map
when the run's method.lora_init is the same: both sides rebuild W0's residual from the original base.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from . import display
from .errors import ConfigError

CONFIG, SAFETENSORS, BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."
# peft features bigadapt has no equivalent for: a value other than these is refused
UNSUPPORTED = {"bias": "none", "lora_bias": False, "layer_replication": None, "trainable_token_indices": None,
               "target_parameters": None, "use_qalora": False, "alora_invocation_tokens": None, "use_bdlora": None}


def is_peft(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def read(path: Path, key: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, its tensors); one ConfigError line for what bigadapt cannot read as LoRA."""
    path = Path(path)
    try:
        conf = json.loads((path / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{key}={str(path)!r}: {CONFIG} is not readable JSON ({e})") from None
    if conf.get("peft_type") != "LORA":
        raise ConfigError(f"{key}={str(path)!r}: a peft {conf.get('peft_type')} adapter; bigadapt imports LoRA only")
    for name, ok in UNSUPPORTED.items():
        value = conf.get(name, ok)
        if value != ok and value not in (None, False, [], {}):
            raise ConfigError(f"{key}={str(path)!r}: peft's {name}={value!r} has no bigadapt equivalent; "
                              f"import an adapter saved with {name}={ok!r}")
    if (path / SAFETENSORS).is_file():
        from safetensors.torch import load_file
        tensors = load_file(path / SAFETENSORS)
    elif (path / BIN).is_file():
        tensors = torch.load(path / BIN, map_location="cpu", weights_only=True)  # never unpickle code
    else:
        raise ConfigError(f"{key}={str(path)!r}: no {SAFETENSORS} or {BIN} beside {CONFIG}")
    return conf, {k: v.float() for k, v in tensors.items()}


def _modules(tensors: dict) -> dict[str, dict[str, torch.Tensor]]:
    """module name -> {lora_A, lora_B[, lora_magnitude_vector]} from peft's keys (an adapter name removed)."""
    found: dict[str, dict] = {}
    for k, t in tensors.items():
        for part in ("lora_A", "lora_B", "lora_magnitude_vector"):
            marker = f".{part}"
            if marker in k:
                name = k[:k.index(marker)].removeprefix(PREFIX)
                found.setdefault(name, {})[part] = t
    return found


def _names(names) -> str:
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    return ",".join(short[:6]) + (",..." if len(short) > 6 else "")


def convert(path: Path, model, cfg, heads: list[str] | None, key: str = "method.init_from") -> dict:
    """bigadapt parameter name -> tensor for every LoRA module of `model` (a real or meta model with the method
    applied), and for the task head when `heads` is given (None: the head starts fresh, not read)."""
    from .methods.lora import lora_modules, pattern_value
    conf, tensors = read(path, key)
    _check_base(conf, cfg, path)
    _check_init(conf, cfg, path, key)
    ours, theirs = dict(lora_modules(model)), _modules(tensors)
    if set(ours) != set(theirs):
        only_a, only_c = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
        raise ConfigError(f"{key}={str(path)!r}: the adapter has LoRA on {_names(theirs)} ({len(theirs)} modules), "
                          f"the config on {_names(ours)} ({len(ours)}); differ: adapter only {only_a[:2]}, config "
                          f"only {only_c[:2]} — set method.targets to the adapter's target_modules "
                          f"{conf.get('target_modules')!r}")
    dora = bool(conf.get("use_dora"))
    if dora != bool(getattr(cfg.method, "dora", False)):
        raise ConfigError(f"{key}={str(path)!r}: the adapter has use_dora={dora}; the config says method.dora="
                          f"{bool(getattr(cfg.method, 'dora', False))} — set method.dora={str(dora).lower()}")
    out, ranks = {}, {}
    for name, m in ours.items():
        t = theirs[name]
        if "lora_A" not in t or "lora_B" not in t:
            raise ConfigError(f"{key}={str(path)!r}: {name} has no lora_A/lora_B pair in the adapter's weights")
        rank = t["lora_A"].shape[0]
        alpha = pattern_value(conf.get("alpha_pattern") or {}, name, conf.get("lora_alpha", 8))
        scaling = alpha / (math.sqrt(rank) if conf.get("use_rslora") else rank)
        k = len(m.spans)
        ranks.setdefault((rank // k if rank % k == 0 else rank, m.r), []).append(name)
        if rank != k * m.r:
            continue  # reported together below
        _check_scaling(name, m, scaling, cfg, path, key)
        if t["lora_A"].shape[1] != m.in_features or t["lora_B"].shape != (m.out_features, rank):
            raise ConfigError(f"{key}={str(path)!r}: {name}'s lora_A/lora_B are {tuple(t['lora_A'].shape)}/"
                              f"{tuple(t['lora_B'].shape)}, this base's module takes [r, {m.in_features}]/"
                              f"[{m.out_features}, r]; import it onto the base it was trained on")
        out[f"{name}.lora_A"] = t["lora_A"]
        out[f"{name}.lora_B"] = _sliced_B(name, m, t["lora_B"], path, key)
        if dora:
            out[f"{name}.lora_magnitude_vector"] = torch.cat([t["lora_magnitude_vector"][a:b] for a, b in m.spans])
    _check_ranks(ranks, cfg, path, key)
    if heads is not None:
        out.update(_heads(model, heads, tensors, path, key))
    return out


def _check_ranks(ranks: dict, cfg, path, key) -> None:
    bad = {pair: names for pair, names in ranks.items() if pair[0] != pair[1]}
    if not bad:
        return
    wanted = {theirs for theirs, _ in ranks}
    (theirs, mine), names = next(iter(bad.items()))
    fix = f"set method.r={theirs}" if len(wanted) == 1 else "set method.rank_pattern to the adapter's per-module " \
        f"ranks, e.g. {({n.rsplit('.', 1)[-1]: r for (r, _), ns in ranks.items() for n in ns[:1]})}"
    raise ConfigError(f"{key}={str(path)!r}: the adapter has r={theirs} on {_names(names)}; the config says "
                      f"method.r={mine} — {fix}")


def _check_scaling(name: str, m, scaling: float, cfg, path, key) -> None:
    if math.isclose(scaling, m.scaling, rel_tol=1e-9):
        return
    alpha = scaling * (math.sqrt(m.r) if cfg.method.rslora else m.r)
    raise ConfigError(f"{key}={str(path)!r}: the adapter scales {name} by {scaling:g}; the config by {m.scaling:g} "
                      f"(method.alpha/r{'^0.5' if cfg.method.rslora else ''}) — set method.alpha={alpha:g} (or "
                      f"method.rslora to the adapter's use_rslora)")


def _sliced_B(name: str, m, B: torch.Tensor, path, key) -> torch.Tensor:
    """peft's B over the whole output -> bigadapt's stacked per-slice B; exact only if B is zero elsewhere."""
    if len(m.spans) == 1 and m.spans[0] == (0, m.out_features):
        return B
    rest = B.clone()
    parts = []
    for i, (a, b) in enumerate(m.spans):
        parts.append(B[a:b, i * m.r:(i + 1) * m.r])
        rest[a:b, i * m.r:(i + 1) * m.r] = 0
    if torch.count_nonzero(rest):
        raise ConfigError(f"{key}={str(path)!r}: the adapter's {name} LoRA writes to every part of the fused "
                          f"projection, the config trains only some slices — set method.targets=[c_attn] (the "
                          f"module by name)")
    return torch.cat(parts)


def _heads(model, heads: list[str], tensors: dict, path, key) -> dict:
    out = {}
    for n, p in model.named_parameters():
        if any(n.startswith(h + ".") for h in heads) and p.requires_grad:
            head, _, leaf = n.rpartition(".")
            for cand in (f"{PREFIX}{n}", f"{PREFIX}{head}.modules_to_save.default.{leaf}"):
                if cand in tensors:
                    out[n] = tensors[cand]
                    break
            else:
                raise ConfigError(f"{key}={str(path)!r}: the adapter has no {n} (peft modules_to_save), which this "
                                  f"model's fresh head needs; save the peft model with modules_to_save={heads}")
            if tuple(out[n].shape) != tuple(getattr(p, "ds_shape", p.shape)):
                raise ConfigError(f"{key}={str(path)!r}: {n} is {tuple(out[n].shape)} there, "
                                  f"{tuple(p.shape)} here; set model.num_labels to the adapter's")
    return out


def _check_init(conf: dict, cfg, path, key) -> None:
    """peft rebuilds the residual of pissa/olora adapters saved without conversion; bigadapt does too, on the
    same condition: the run's lora_init is the adapter's."""
    from .methods.lora_init import FROM_W0
    init = conf.get("init_lora_weights", True)
    theirs = init if isinstance(init, str) else "plain"
    theirs = "plain" if theirs == "gaussian" else theirs
    mine = cfg.method.lora_init if cfg.method.lora_init in FROM_W0 else "plain"
    if theirs != mine:
        want = theirs if theirs in FROM_W0 else "kaiming"
        if theirs not in FROM_W0 + ("plain",):
            raise ConfigError(f"{key}={str(path)!r}: init_lora_weights={init!r} is not one bigadapt rebuilds "
                              f"(pissa, olora, gaussian, true); convert it to a plain LoRA with peft first")
        raise ConfigError(f"{key}={str(path)!r}: the adapter is a delta on "
                          f"{'the ' + theirs + ' residual base' if theirs in FROM_W0 else 'the original base'}; the "
                          f"config says method.lora_init={cfg.method.lora_init} — set method.lora_init={want}")


def _check_base(conf: dict, cfg, path) -> None:
    """A different recorded base id is a warning: shapes and the weights the adapter is applied to decide."""
    theirs, mine = conf.get("base_model_name_or_path"), cfg.model.name_or_path
    if theirs and mine and str(theirs) != str(mine):
        display.log(f"warning: {path}: the adapter was saved for base {theirs!r}, this run's is {mine!r} (the "
                    f"shapes match; make sure it is the same model)")


def import_run(path: str | Path, cfg, overwrite: bool = False) -> int:
    """`bigadapt import-peft PEFT_DIR --config CFG`: the run directory a bigadapt run with this config would have
    written at step 0 had it started from the adapter (config.yaml + checkpoints/step-00000000, Adam state zero),
    so eval, generate, merge, export and `train --resume auto` work on it. One CPU process; the base is built from
    the config (it is what the fingerprint records), the adapter checked against it before anything is written."""
    from . import checkpoint, methods, rundir, targets
    from . import fingerprint as fp
    from . import model as base_model
    from .config import dump_config
    from .export import _quiet_transformers
    from .train import _manifest
    path, run_dir = Path(path), Path(cfg.run_dir)
    if not is_peft(path):
        raise ConfigError(f"import-peft {str(path)!r}: no {CONFIG} there; give a peft adapter directory")
    rundir.check_fresh_start(run_dir, None, overwrite)
    with _quiet_transformers():
        model = base_model.build_base(cfg.model, cfg.train.seed)
    base_fp = fp.fingerprint(model, exclude=targets.head_prefixes(model))
    methods.apply_seeded(model, cfg)
    heads = targets.head_prefixes(model) if cfg.method.train_head else []
    tensors = convert(path, model, cfg, heads, key="import-peft")
    masters = {n: tensors[n].contiguous() for n, p in model.named_parameters() if p.requires_grad}
    moments = {f"{n}.{k}": torch.zeros_like(t) for n, t in masters.items() for k in checkpoint.MOMENTS}
    state = {"step": 0, "optimizer_step": 0, "loss_scale": {}, "skipped_steps": 0, "samples_seen": 0,
             "world_size_at_save": 1, "seed": cfg.train.seed, "elapsed_s": 0.0, "train_s": 0.0}
    manifest = dict(_manifest(cfg, base_fp, 1), imported_from=str(path.resolve()))
    lock = rundir.claim(run_dir)
    try:
        if overwrite:
            rundir.clear_for_overwrite(run_dir)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        final = run_dir / "checkpoints" / "step-00000000"
        checkpoint._write_atomic(final, masters, moments, state, manifest)
    finally:
        if lock:
            lock.release()
    print(f"imported {path} into {final} ({len(masters)} tensors); try `bigadapt eval {run_dir}`")
    return 0
