"""LoRA adapters <-> PEFT adapter folders, the format the PyTorch ecosystem loads.

    OUT/adapter_config.json          peft's LoraConfig (peft_type "LORA", r, lora_alpha, target_modules, ...)
    OUT/adapter_model.safetensors    base_model.model.<HF module>.lora_A.weight [r, in]
                                     base_model.model.<HF module>.lora_B.weight [out, r]
    OUT/flan_jax_adapter.json        where it came from (workdir, step, base path and fingerprint)

`peft.PeftModel.from_pretrained(hf_base, OUT)` loads it onto the Hugging Face export of the base
(`python -m flan_jax.convert --to_hf`) and computes our logits (tests/test_peft.py). The other way,
`config.lora.init_from = PEFT_DIR` starts a LoRA run from an adapter trained in PyTorch (or one of
ours), and `python -m flan_jax.convert --from_peft=PEFT_DIR --checkpoint=BASE` checks it against a
converted base and can write the merged model.

The HF module of each of our projections comes from the checkpoint mapping (convert/mapping.py),
so every family the converter knows is covered. Layout: A [*in, r] <-> lora_A [r, in] and
B [r, *out] <-> lora_B [out, r], flattened in the order the mapping flattens the kernel. GPT-2's
fused `c_attn` holds q, k and v: it is exported as one adapter of rank (r x adapted projections)
with a block-diagonal lora_B (PEFT's `rank_pattern` / `alpha_pattern` keep its scale), and a
PEFT `c_attn` adapter imports as q, k, v adapters sharing its lora_A.

Only plain LoRA is read: another peft_type (IA3, LOHA, ...), DoRA, LoRA biases, `modules_to_save`
and the other extensions are refused by name rather than half-applied.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from flan_jax.convert import checkpoint as checkpoint_lib, mapping
from flan_jax.model.config import ModelConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROVENANCE = "flan_jax_adapter.json"
PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"

# adapter_config.json fields whose non-default value changes what the adapter computes.
_UNSUPPORTED = {
    "use_dora": False, "lora_bias": False, "modules_to_save": None, "layer_replication": None,
    "trainable_token_indices": None, "target_parameters": None, "use_qalora": False, "alora_invocation_tokens": None,
    "megatron_config": None, "use_bdlora": None, "arrow_config": None,
}


class PeftFormatError(ValueError):
    """A PEFT folder flan_jax cannot read exactly (another adapter type, another base, ...)."""


@dataclasses.dataclass(frozen=True)
class Module:
    """One HF module that can carry a LoRA adapter, and the kernels of ours it holds."""

    name: str  # e.g. "model.layers.0.self_attn.q_proj"
    kernels: tuple[tuple, ...]  # our kernel paths; several for a fused module (GPT-2's c_attn: q, k, v)
    in_size: int
    out_sizes: tuple[int, ...]

    @property
    def short(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def modules(cfg: ModelConfig) -> list[Module]:
    """Every HF weight that is one or more of our projection kernels, from the checkpoint mapping."""
    from flax import nnx

    from flan_jax.model import registry
    from flan_jax.model.transformer import Dense

    # The unrolled layout: HF modules are per layer (a scanned run's adapters are unstacked first).
    model = nnx.eval_shape(lambda: registry.build_model(cfg.replace(scan_layers=False), rngs=nnx.Rngs(0)))
    dense = {(*p, "kernel"): m for p, m in nnx.iter_graph(model) if isinstance(m, Dense)}
    out = []
    for rule in mapping.rules(cfg):
        kernels = tuple(p for p in rule.paths if p in dense)
        if not kernels or len(rule.hf_keys) != 1 or not rule.hf_keys[0].endswith(".weight"):
            continue
        n_in = dense[kernels[0]].n_in
        shapes = [tuple(dense[k].kernel.shape) for k in kernels]
        out.append(Module(
            name=rule.hf_keys[0][: -len(".weight")],
            kernels=kernels,
            in_size=math.prod(shapes[0][:n_in]),
            out_sizes=tuple(math.prod(s[n_in:]) for s in shapes),
        ))
    return out


def _projection(kernel_path: tuple) -> str:
    return "/".join(map(str, kernel_path[:-1]))


# ---------------------------------------------------------------------- export
def adapter_tensors(cfg: ModelConfig, params: Mapping, scales: Mapping[str, float], rank: int) -> tuple[dict, dict, dict]:
    """(safetensors dict, rank_pattern, alpha_pattern) of an adapted model's parameters.

    `params` is the adapted model's pure dict (flat or nested); `scales` {projection path: scale}.
    """
    flat = {k: np.asarray(v) for k, v in checkpoint_lib.flatten(params).items()}
    tensors: dict[str, np.ndarray] = {}
    rank_pattern: dict[str, int] = {}
    scale_of: dict[str, float] = {}
    for module in modules(cfg):
        adapted = [i for i, k in enumerate(module.kernels) if _projection(k) in scales]
        if not adapted:
            continue
        a_blocks, b_blocks = [], []
        for i in adapted:
            proj = module.kernels[i][:-1]
            a = flat[(*proj, "lora_a")]
            b = flat[(*proj, "lora_b")]
            a_blocks.append(a.reshape(module.in_size, -1).T.astype(np.float32))  # [r, in]
            b_blocks.append(b.reshape(b.shape[0], -1).T.astype(np.float32))  # [out_i, r]
        total_rank = sum(a.shape[0] for a in a_blocks)
        lora_b = np.zeros((sum(module.out_sizes), total_rank), np.float32)
        starts = np.cumsum((0, *module.out_sizes))
        column = 0
        for i, block in zip(adapted, b_blocks):
            lora_b[starts[i]:starts[i + 1], column:column + block.shape[1]] = block
            column += block.shape[1]
        tensors[f"{PREFIX}{module.name}.lora_A.weight"] = np.ascontiguousarray(np.concatenate(a_blocks, axis=0))
        tensors[f"{PREFIX}{module.name}.lora_B.weight"] = np.ascontiguousarray(lora_b)
        if total_rank != rank:
            rank_pattern[module.short] = total_rank
        scale_of[module.short] = scales[_projection(module.kernels[adapted[0]])]
    return tensors, rank_pattern, scale_of


def peft_config(cfg: ModelConfig, lora_cfg, adapted: list[Module], rank_pattern: Mapping[str, int],
                base_name_or_path: str | None) -> dict[str, Any]:
    """The adapter_config.json of an export (peft 0.21's LoraConfig fields)."""
    every = modules(cfg)
    shorts = sorted({m.short for m in adapted})
    # Short names when they select exactly the adapted modules, else the full module names.
    if {m.name for m in every if m.short in shorts} == {m.name for m in adapted}:
        targets: list[str] = shorts
    else:
        targets = sorted(m.name for m in adapted)
    alpha_pattern = {}
    for short, rank in rank_pattern.items():
        # Same scale at the other rank: alpha / r == alpha' / r' (rsLoRA: alpha / sqrt(r)).
        root = math.sqrt if lora_cfg.rslora else (lambda x: x)
        alpha_pattern[short] = float(lora_cfg.alpha) * root(rank) / root(lora_cfg.rank)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "peft_version": PEFT_VERSION,
        "base_model_name_or_path": base_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": int(lora_cfg.rank),
        "lora_alpha": float(lora_cfg.alpha),
        "lora_dropout": float(lora_cfg.dropout),
        "target_modules": targets,
        "exclude_modules": None,
        "fan_in_fan_out": cfg.family == "gpt2",  # GPT-2's Conv1D weights are [in, out]
        "bias": "none",
        "use_rslora": bool(lora_cfg.rslora),
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": dict(rank_pattern),
        "alpha_pattern": alpha_pattern,
        "use_dora": False,
        "lora_bias": False,
    }


def write_peft(out_dir: str | os.PathLike, cfg: ModelConfig, model, lora_cfg, *, base_name_or_path: str | None = None,
               provenance: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Writes the PEFT folder of an adapted model (`lora.apply`'d, e.g. from `load_model`)."""
    from flax import nnx
    from safetensors.numpy import save_file

    from flan_jax.model import layout, lora

    params = layout.unstack(nnx.to_pure_dict(nnx.state(model, nnx.Param)))  # HF modules are per layer
    scales = lora.scales_of(model, per_layer=True)
    if not scales:
        raise ValueError("this model has no LoRA adapters to export (config.lora.rank is 0); use --to_hf")
    _refuse_other_trained(provenance)
    tensors, rank_pattern, _ = adapter_tensors(cfg, params, scales, lora_cfg.rank)
    adapted = [m for m in modules(cfg) if any(_projection(k) in scales for k in m.kernels)]
    config = peft_config(cfg, lora_cfg, adapted, rank_pattern, base_name_or_path)
    with _staged(out_dir) as staging:
        save_file(tensors, os.fspath(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (staging / PROVENANCE).write_text(json.dumps(dict(provenance or {}), indent=2, default=str) + "\n")
    logging.info("Wrote a PEFT LoRA adapter (%d modules, r=%d) to %s", len(adapted), lora_cfg.rank, out_dir)
    return pathlib.Path(out_dir)


def _refuse_other_trained(provenance: Mapping[str, Any] | None) -> None:
    others = list((provenance or {}).get("other_trained", ()))
    if others:
        raise ValueError(
            f"the run also trained parameters that are not LoRA adapters ({others[:6]}); a PEFT adapter "
            "would leave them out. Export the merged model with --to_hf instead."
        )


def convert_workdir_to_peft(workdir: str | os.PathLike, out_dir: str | os.PathLike, *, step: int | None = None) -> int:
    """`--to_peft=OUT --workdir=DIR [--step=N]`: the adapters of a LoRA run's checkpoint."""
    from flan_jax.model import lora
    from flan_jax.train import checkpointing, trainable

    model, config, used = checkpointing.load_model(workdir, step)
    lora_cfg = lora.LoRAConfig.from_config(config.get("lora"))
    if lora_cfg is None:
        raise ValueError(f"{workdir} is not a LoRA run (config.lora.rank is 0): export it with --to_hf")
    trained = trainable.selection_of(config, model).trained
    others = sorted(trainable.path_str(p) for p in trained if not lora.is_adapter_path(p))
    init_from = str(config.checkpoint.get("init_from", "") or "")
    provenance = {
        "workdir": str(pathlib.Path(workdir).absolute()), "step": used, "base": init_from or f"seed {config.seed}",
        "other_trained": others,
    }
    write_peft(out_dir, model.cfg, model, lora_cfg, base_name_or_path=_hf_name(init_from), provenance=provenance)
    return used


def _hf_name(init_from: str) -> str | None:
    """The Hugging Face name the converted base came from, when its config recorded one."""
    if not init_from:
        return None
    source = pathlib.Path(init_from) / checkpoint_lib.HF_CONFIG
    if source.is_file():
        name = json.loads(source.read_text()).get("_name_or_path")
        if name:
            return str(name)
    return None


class _staged:
    """Writes into a hidden sibling folder renamed to `out` at the end (nothing half-written)."""

    def __init__(self, out: str | os.PathLike):
        self.out = pathlib.Path(out).absolute()

    def __enter__(self) -> pathlib.Path:
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise FileExistsError(f"{self.out} exists and is not empty; choose a new or empty --to_peft folder")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.staging = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self.staging.mkdir()
        return self.staging

    def __exit__(self, kind, error, traceback) -> None:
        import shutil

        if kind is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            return
        if self.out.exists():
            self.out.rmdir()
        os.rename(self.staging, self.out)


# ---------------------------------------------------------------------- import
def read_peft(peft_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(adapter_config, tensors) of a PEFT folder; anything but plain LoRA is refused by name."""
    from safetensors.numpy import load_file

    folder = pathlib.Path(peft_dir)
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: is {folder} a PEFT adapter folder (save_pretrained of a PeftModel)?")
    config = json.loads(config_file.read_text())
    kind = config.get("peft_type")
    if kind != "LORA":
        raise PeftFormatError(f"{config_file}: peft_type {kind!r} is not supported; flan_jax imports LORA adapters only")
    changed = {k: config[k] for k, default in _UNSUPPORTED.items() if config.get(k, default) not in (default, [], {}, False)}
    if changed:
        raise PeftFormatError(f"{config_file}: LoRA variants flan_jax does not implement: {changed}")
    if config.get("bias", "none") != "none":
        raise PeftFormatError(f"{config_file}: bias={config['bias']!r} (trained biases) is not supported; only bias='none'")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.glob("adapter_model.*"))
        hint = f" (found {pickles}: pickle files are never loaded; re-save with safe_serialization=True)" if pickles else ""
        raise FileNotFoundError(f"{weights} not found{hint}")
    return config, load_file(os.fspath(weights))


def _pattern_value(pattern: Mapping[str, Any], module_name: str, default):
    """peft's rank_pattern / alpha_pattern lookup: a key matches a module name suffix (or regex)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def adapter_arrays(peft_dir: str | os.PathLike, cfg: ModelConfig, lora_cfg, expected: Mapping[tuple, Any]) -> dict[tuple, np.ndarray]:
    """Our flat adapter arrays {(..., "lora_a"): A, ...} from a PEFT folder, checked against this run.

    `expected` is the run's flat {adapter path: abstract array}: the folder must adapt exactly the
    projections config.lora targets, with its rank, and its scale (alpha / r, or rsLoRA's); every
    tensor must have the base's shape. Errors name the tensor or the config fields to change.
    """
    config, tensors = read_peft(peft_dir)
    where = pathlib.Path(peft_dir) / ADAPTER_WEIGHTS
    rank, alpha, rslora = int(config["r"]), float(config["lora_alpha"]), bool(config.get("use_rslora", False))
    settings = {"rank": rank, "alpha": alpha, "rslora": rslora}
    ours = {"rank": lora_cfg.rank, "alpha": float(lora_cfg.alpha), "rslora": lora_cfg.rslora}
    if settings != ours:
        raise PeftFormatError(
            f"{pathlib.Path(peft_dir) / ADAPTER_CONFIG} describes LoRA {settings}, config.lora has {ours}; set "
            + ", ".join(f"config.lora.{k}={v!r}" for k, v in settings.items())
        )
    by_name = {m.name: m for m in modules(cfg)}
    found: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.(lora_A|lora_B)(?:\.default)?\.weight", key)
        if match is None or match[1] not in by_name:
            raise PeftFormatError(
                f"{where}: tensor {key} is not a LoRA weight of a projection of this {cfg.family} model "
                f"(expected names like {PREFIX}{next(iter(by_name))}.lora_A.weight): is the adapter for another base?"
            )
        found.setdefault(match[1], {})[match[2]] = value
    out: dict[tuple, np.ndarray] = {}
    for name, pair in found.items():
        module = by_name[name]
        if set(pair) != {"lora_A", "lora_B"}:
            raise PeftFormatError(f"{where}: module {name} has {sorted(pair)} but needs both lora_A and lora_B")
        out.update(_module_arrays(module, pair["lora_A"], pair["lora_B"], where, config, lora_cfg, expected))
    missing = sorted("/".join(map(str, p)) for p in expected if p not in out)
    extra = sorted("/".join(map(str, p)) for p in out if p not in expected)
    if missing or extra:
        raise PeftFormatError(
            f"{where} adapts other projections than config.lora.targets={list(lora_cfg.targets)}: "
            f"adapters the run has but the folder lacks: {missing[:8]}; in the folder but not targeted: {extra[:8]} "
            f"(the folder's target_modules: {config.get('target_modules')})"
        )
    for path, array in out.items():
        if tuple(array.shape) != tuple(expected[path].shape):
            raise PeftFormatError(f"{where}: {'/'.join(map(str, path))} gets shape {array.shape}, the run expects {expected[path].shape}")
    return out


def _module_arrays(module: Module, lora_a: np.ndarray, lora_b: np.ndarray, where, config, lora_cfg, expected) -> dict:
    key = f"{PREFIX}{module.name}"
    rank = int(_pattern_value(config.get("rank_pattern") or {}, module.name, config["r"]))
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module.name, config["lora_alpha"]))
    if lora_a.shape != (rank, module.in_size):
        raise PeftFormatError(
            f"{where}: tensor {key}.lora_A.weight has shape {lora_a.shape}, this base needs ({rank}, {module.in_size}) "
            "[rank, in_features]: is the adapter for another base?"
        )
    if lora_b.shape != (sum(module.out_sizes), rank):
        raise PeftFormatError(
            f"{where}: tensor {key}.lora_B.weight has shape {lora_b.shape}, this base needs ({sum(module.out_sizes)}, {rank}) "
            "[out_features, rank]: is the adapter for another base?"
        )
    root = math.sqrt if config.get("use_rslora") else (lambda x: x)
    scale = alpha / root(rank)
    if not math.isclose(scale, lora_cfg.scale, rel_tol=1e-6):
        raise PeftFormatError(f"{where}: module {module.name} has scale {scale} (alpha {alpha}, r {rank}), config.lora's is {lora_cfg.scale}")
    starts = np.cumsum((0, *module.out_sizes))
    targeted = [i for i, k in enumerate(module.kernels) if (*k[:-1], "lora_a") in expected]
    blocks = _split_fused(module, lora_a, lora_b, rank, lora_cfg.rank, targeted, starts, key, where)
    out = {}
    for i, (a, b) in blocks.items():
        proj = module.kernels[i][:-1]
        a_shape, b_shape = expected[(*proj, "lora_a")].shape, expected[(*proj, "lora_b")].shape
        out[(*proj, "lora_a")] = np.ascontiguousarray(a.T.reshape(a_shape))
        out[(*proj, "lora_b")] = np.ascontiguousarray(b.T.reshape(b_shape))
    return out


def _split_fused(module, lora_a, lora_b, rank, our_rank, targeted, starts, key, where) -> dict[int, tuple]:
    """{kernel index: (A [r, in], B [out_i, r])}: one pair, or a fused module's per-kernel pairs.

    A fused PEFT adapter (GPT-2 c_attn) of our rank gives each kernel the shared A and its rows of
    B; one of rank (our rank x kernels) with a block-diagonal B (our own export) splits exactly.
    """
    if len(module.kernels) == 1:
        return {0: (lora_a, lora_b)} if targeted else {}
    rows = [lora_b[starts[i]:starts[i + 1]] for i in range(len(module.kernels))]
    untargeted = [i for i in range(len(module.kernels)) if i not in targeted and np.any(rows[i])]
    if untargeted:
        raise PeftFormatError(f"{where}: {key}.lora_B.weight updates kernels the run does not adapt: {[module.kernels[i] for i in untargeted]}")
    if rank == our_rank:
        return {i: (lora_a, rows[i]) for i in targeted}
    if rank == our_rank * len(targeted):
        blocks = {}
        for j, i in enumerate(targeted):
            cols = slice(j * our_rank, (j + 1) * our_rank)
            others = np.delete(rows[i], np.arange(cols.start, cols.stop), axis=1)
            if np.any(others):
                break
            blocks[i] = (lora_a[cols], rows[i][:, cols])
        else:
            return blocks
    raise PeftFormatError(
        f"{where}: {key} has rank {rank}; a fused module imports with rank {our_rank} (a shared lora_A) or "
        f"{our_rank} x {len(targeted)} with a block-diagonal lora_B"
    )


def load_into(peft_dir: str | os.PathLike, params: Mapping, parts, model_cfg: ModelConfig, config) -> dict:
    """`params` (a full tree on the run's devices) with its LoRA adapters replaced by the folder's."""
    import jax
    from flax.nnx import traversals

    from flan_jax.model import lora
    from flan_jax.train import trainable

    lora_cfg = lora.LoRAConfig.from_config(config.lora)
    if lora_cfg is None:
        raise ValueError(f"config.lora.init_from={peft_dir} needs config.lora.rank > 0 (the adapter's r)")
    from flan_jax.model import layout

    adapters = trainable.adapter_paths(parts.abstract_params)
    flat_abstract = traversals.flatten_mapping(parts.abstract_params)
    # The folder is per layer; a scanned run's adapters are read unstacked and stacked after.
    per_layer = traversals.flatten_mapping(layout.unstack(trainable.only(parts.abstract_params, adapters)))
    arrays = adapter_arrays(peft_dir, model_cfg, lora_cfg, per_layer)
    if model_cfg.scanned:
        arrays = traversals.flatten_mapping(layout.stack(traversals.unflatten_mapping(arrays)))
    shardings = traversals.flatten_mapping(parts.param_shardings)
    placed = {p: jax.device_put(np.asarray(a, flat_abstract[p].dtype), shardings[p]) for p, a in arrays.items()}
    logging.info("LoRA adapters from %s (%d arrays)", peft_dir, len(placed))
    return trainable.join(trainable.without(params, adapters), traversals.unflatten_mapping(placed))


def check_against_base(peft_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike) -> tuple[Any, Any, dict]:
    """(base ModelConfig, LoRAConfig, our adapter arrays) of a PEFT folder read against a converted base."""
    from flax import nnx
    from flax.nnx import traversals

    from flan_jax.model import lora, registry

    cfg = checkpoint_lib.read_model_config(checkpoint_dir)
    config, _ = read_peft(peft_dir)
    lora_cfg = lora_config_of(config, cfg)
    model = nnx.eval_shape(lambda: registry.build_model(cfg.replace(scan_layers=False), rngs=nnx.Rngs(0), lora=lora_cfg))
    flat = traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    expected = {p: v for p, v in flat.items() if lora.is_adapter_path(p)}
    return cfg, lora_cfg, adapter_arrays(peft_dir, cfg, lora_cfg, expected)


def lora_config_of(config: Mapping[str, Any], cfg: ModelConfig):
    """Our LoRAConfig for a PEFT adapter_config (targets as the projection paths it adapts)."""
    from flan_jax.model import lora

    targets = config.get("target_modules") or ()
    every = modules(cfg)
    if isinstance(targets, str):  # peft: a string is a regex matched against the whole module name
        chosen_modules = [m for m in every if re.fullmatch(targets, m.name)]
    else:
        chosen_modules = [m for m in every if any(m.name == t or m.name.endswith("." + t) for t in targets)]
    if not chosen_modules:
        raise PeftFormatError(f"target_modules {targets} match no module of this {cfg.family} model")
    all_paths = [_projection(k) for m in every for k in m.kernels]
    chosen = [_projection(k) for m in chosen_modules for k in m.kernels]
    return lora.LoRAConfig(
        rank=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=float(config.get("lora_dropout", 0.0)),
        targets=lora.compact_targets(all_paths, chosen), rslora=bool(config.get("use_rslora", False)),
    )


def override_lines(peft_dir: str | os.PathLike, lora_cfg, checkpoint_dir: str | os.PathLike) -> list[str]:
    """The experiment-config lines that continue LoRA training from the adapter on its base."""
    return [
        f"config.checkpoint.init_from = {str(checkpoint_dir)!r}",
        f"config.lora.rank = {lora_cfg.rank}",
        f"config.lora.alpha = {lora_cfg.alpha}",
        f"config.lora.rslora = {lora_cfg.rslora}",
        f"config.lora.targets = {tuple(lora_cfg.targets)!r}",
        f"config.lora.init_from = {str(pathlib.Path(peft_dir).absolute())!r}",
    ]


def convert_from_peft(peft_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike | None,
                      *, dtype: str | None = None) -> list[str]:
    """`--from_peft=PEFT_DIR --checkpoint=BASE [--out=MERGED]`: checks the adapter against its converted
    base (every tensor's shape), optionally writes base + adapter merged as a converted checkpoint,
    and returns the config lines that continue LoRA training from the adapter."""
    from flan_jax.model import lora

    cfg, lora_cfg, arrays = check_against_base(peft_dir, checkpoint_dir)
    if out_dir:
        from flax.nnx import traversals

        base_cfg, base = checkpoint_lib.load_converted(checkpoint_dir, stacked=False)  # as `arrays`: per layer
        from flax import nnx

        params = traversals.flatten_mapping(nnx.to_pure_dict(base))
        params.update(arrays)
        scales = {"/".join(map(str, p[:-1])): lora_cfg.scale for p in arrays if p[-1] == "lora_a"}
        merged = lora.merged_params(traversals.unflatten_mapping(params), scales, dtype=dtype or base_cfg.param_dtype)
        checkpoint_lib.save_converted(out_dir, cfg, merged)
        for name in (checkpoint_lib.HF_CONFIG, *checkpoint_lib.TOKENIZER_FILES):
            source = pathlib.Path(checkpoint_dir) / name
            if source.is_file():
                import shutil

                shutil.copy2(source, pathlib.Path(out_dir) / name)
    return override_lines(peft_dir, lora_cfg, checkpoint_dir)
