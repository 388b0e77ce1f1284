"""Wan 2.1 weights in and out of vidit: a diffusers `WanTransformer3DModel` folder (config.json
and safetensors shards, local or gs://) <-> vidit's Wan DiT (vidit/models/wan.py), and an
`AutoencoderKLWan` folder <-> vidit's Wan VAE (vidit/models/wan_vae.py).

    cfg, params = load_transformer("Wan2.1-T2V-1.3B-Diffusers/transformer")
    export_transformer(cfg, params, "out/transformer")   # loads in diffusers again
    vae_cfg, vae_params = load_vae("Wan2.1-T2V-1.3B-Diffusers/vae")

Every tensor is mapped by name and its shape checked against the model the config builds;
tensors the mapping does not know, and parameters nothing filled, are reported by name. The
mapping is exact both ways (an import then an export gives the same tensors, bit for bit):
torch Linear weights [out, in] are transposed to vidit's [in, out] kernels, the Conv3d patch
embedding becomes a Dense over vidit's patch order, and q/k output channels are permuted per
head from Wan's interleaved RoPE pairs to vidit's half-split pairs (see vidit/models/wan.py).
"""
from __future__ import annotations

import json
from typing import Any

import ml_collections
import numpy as np

from vidit import storage
from vidit.errors import ConfigError, LoadError

CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
# diffusers config key -> vidit model key
CONFIG_KEYS = {"num_layers": "depth", "num_attention_heads": "heads", "ffn_dim": "ffn_dim",
               "in_channels": "channels", "text_dim": "text_width", "freq_dim": "freq_dim",
               "cross_attn_norm": "cross_attn_norm", "eps": "eps", "patch_size": "patch"}


def model_config(hf: dict, **overrides) -> ml_collections.ConfigDict:
    """vidit's model config (kind 'wan') for a diffusers WanTransformer3DModel config."""
    unsupported = {k: hf.get(k) for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
                   if hf.get(k) is not None}
    if unsupported:
        raise ConfigError(f"this Wan transformer is an image-to-video variant ({unsupported}); "
                          f"vidit imports the text-to-video models")
    if hf.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ConfigError(f"qk_norm={hf['qk_norm']!r}: vidit's Wan block normalises q and k "
                          f"across heads ('rms_norm_across_heads')")
    if hf.get("out_channels", hf["in_channels"]) != hf["in_channels"]:
        raise ConfigError("out_channels differs from in_channels: not a Wan T2V denoiser")
    cfg = ml_collections.ConfigDict(dict(
        kind="wan", width=hf["num_attention_heads"] * hf["attention_head_dim"],
        **{ours: hf[theirs] for theirs, ours in CONFIG_KEYS.items()},
        rope_theta=10000.0, time_scale=1000.0, dtype="float32", param_dtype="float32",
        rope_max_len=hf.get("rope_max_seq_len", 1024),  # diffusers' RoPE table; vidit's has none
        scan_layers=False, remat="none", attention="chunked", sequence_parallel="ulysses",
        cond="text"))
    cfg.patch = tuple(cfg.patch)
    cfg.update(overrides)
    return cfg


def hf_config(cfg: Any) -> dict:
    """The diffusers config.json of a vidit Wan model config."""
    out = {"_class_name": "WanTransformer3DModel",
           "attention_head_dim": cfg.width // cfg.heads, "out_channels": cfg.channels,
           "qk_norm": "rms_norm_across_heads", "image_dim": None, "added_kv_proj_dim": None,
           "rope_max_seq_len": cfg.get("rope_max_len", 1024), "pos_embed_seq_len": None}
    out.update({theirs: cfg[ours] for theirs, ours in CONFIG_KEYS.items()})
    out["patch_size"] = list(cfg.patch)
    return out


def rope_permutation(width: int, heads: int) -> np.ndarray:
    """Channel order that turns Wan's interleaved RoPE pairs (2i, 2i+1) of each head into
    vidit's half-split pairs (i, i + d/2): ours[c] = wan[perm[c]]."""
    d = width // heads
    per_head = np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])
    return (np.arange(heads)[:, None] * d + per_head[None]).reshape(-1)


def _linear(prefix: str, permute=None):
    """A torch Linear <-> a vidit Dense ([in, out] kernel), output channels optionally permuted."""
    return [(f"{prefix}.weight", "kernel", "linear", permute), (f"{prefix}.bias", "bias", "vector",
                                                                permute)]


def block_mapping(cfg) -> list:
    """(diffusers name, vidit path, kind, permutation) for one block's tensors."""
    perm = rope_permutation(cfg.width, cfg.heads)
    rows = []
    for theirs, ours, rotate in (("attn1", "self_attn", True), ("attn2", "cross_attn", False)):
        p = perm if rotate else None
        for name, sub in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "out")):
            keep = p if sub in ("q", "k") else None
            rows += [(t, f"{ours}/{sub}/{o}", kind, keep) for t, o, kind, _ in
                     _linear(f"{theirs}.{name}")]
        rows += [(f"{theirs}.norm_q.weight", f"{ours}/q_norm/scale", "vector", p),
                 (f"{theirs}.norm_k.weight", f"{ours}/k_norm/scale", "vector", p)]
    if cfg.cross_attn_norm:
        rows += [("norm2.weight", "cross_norm/scale", "vector", None),
                 ("norm2.bias", "cross_norm/bias", "vector", None)]
    rows += [(t, f"mlp/fc1/{o}", k, None) for t, o, k, _ in _linear("ffn.net.0.proj")]
    rows += [(t, f"mlp/fc2/{o}", k, None) for t, o, k, _ in _linear("ffn.net.2")]
    rows += [("scale_shift_table", "modulation", "table", None)]
    return rows


def top_mapping(cfg) -> list:
    ce = "condition_embedder"
    rows = [("patch_embedding.weight", "patch_embed/kernel", "conv", None),
            ("patch_embedding.bias", "patch_embed/bias", "vector", None),
            ("scale_shift_table", "out_modulation", "table", None)]
    for theirs, ours in ((f"{ce}.time_embedder.linear_1", "time_fc1"),
                         (f"{ce}.time_embedder.linear_2", "time_fc2"),
                         (f"{ce}.text_embedder.linear_1", "text_fc1"),
                         (f"{ce}.text_embedder.linear_2", "text_fc2"),
                         ("proj_out", "proj_out")):
        rows += [(t, f"{ours}/{o}", k, None) for t, o, k, _ in _linear(theirs)]
    rows += [(f"{ce}.time_proj.weight", "time_modulation/kernel", "linear6", None),
             (f"{ce}.time_proj.bias", "time_modulation/bias", "vector6", None)]
    return rows


def _to_vidit(x: np.ndarray, kind: str, perm, cfg) -> np.ndarray:
    if kind == "linear":
        x = x.T
        return x[:, perm] if perm is not None else x
    if kind == "vector":
        return x[perm] if perm is not None else x
    if kind == "conv":  # [width, C, pt, ph, pw] -> [(pt ph pw C), width], patchify's order
        return x.transpose(2, 3, 4, 1, 0).reshape(-1, x.shape[0])
    if kind == "linear6":  # [6 width, width] -> [width, 6, width]
        return x.T.reshape(x.shape[1], 6, -1)
    if kind == "vector6":
        return x.reshape(6, -1)
    if kind == "table":  # [1, n, width] -> [n, width]
        return x[0]
    raise ValueError(kind)


def _to_hf(x: np.ndarray, kind: str, perm, cfg) -> np.ndarray:
    inverse = np.argsort(perm) if perm is not None else None
    if kind == "linear":
        return (x[:, inverse] if inverse is not None else x).T
    if kind == "vector":
        return x[inverse] if inverse is not None else x
    if kind == "conv":
        pt, ph, pw = cfg.patch
        return x.reshape(pt, ph, pw, cfg.channels, -1).transpose(4, 3, 0, 1, 2)
    if kind == "linear6":
        return x.reshape(x.shape[0], -1).T
    if kind == "vector6":
        return x.reshape(-1)
    if kind == "table":
        return x[None]
    raise ValueError(kind)


def _rows(cfg):
    """Every (diffusers name, path in vidit's pure dict as a tuple, kind, permutation)."""
    rows = [(t, tuple(o.split("/")), k, p) for t, o, k, p in top_mapping(cfg)]
    for i in range(cfg.depth):
        rows += [(f"blocks.{i}.{t}", ("blocks", i, *o.split("/")), k, p)
                 for t, o, k, p in block_mapping(cfg)]
    return rows


def _check_names(tensors: dict, names: list[str]) -> None:
    """Tensors no row maps, and rows no tensor fills, named (the first 8 of each)."""
    unknown = sorted(set(tensors) - set(names))
    missing = sorted(t for t in names if t not in tensors)
    if unknown or missing:
        raise LoadError("the Wan weights do not match the config: "
                        + (f"not mapped: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}; "
                           if unknown else "")
                        + (f"missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}"
                           if missing else ""))


def _check_shapes(abstract: Any, params: Any) -> Any:
    """params cast to the model's dtypes, every shape checked against `abstract`."""
    import jax
    bad = []

    def check(path, a, p):
        if tuple(a.shape) != tuple(p.shape):
            bad.append(f"{'/'.join(str(getattr(k, 'key', k)) for k in path)}: "
                       f"model {tuple(a.shape)}, weights {tuple(p.shape)}")
        return np.asarray(p, a.dtype)

    params = jax.tree_util.tree_map_with_path(check, abstract, params)
    if bad:
        raise LoadError("Wan weight shapes differ from the model: " + "; ".join(bad[:8]))
    return params


def params_from_hf(tensors: dict, cfg, abstract: Any) -> Any:
    """vidit's pure-dict params from diffusers tensors; `abstract` is the model's pure dict of
    ShapeDtypeStructs (shapes checked, names reported)."""
    rows = _rows(cfg)
    _check_names(tensors, [t for t, *_ in rows])
    flat = {}
    for theirs, path, kind, perm in rows:
        flat[path] = _to_vidit(np.asarray(tensors[theirs]), kind, perm, cfg)
    return _check_shapes(abstract, _unflatten(flat, cfg))


def params_to_hf(params: Any, cfg) -> dict:
    """diffusers tensors from vidit's pure-dict params (the inverse of params_from_hf)."""
    flat = _flatten(params, cfg)
    return {theirs: np.ascontiguousarray(_to_hf(np.asarray(flat[path]), kind, perm, cfg))
            for theirs, path, kind, perm in _rows(cfg)}


def _unflatten(flat: dict, cfg) -> dict:
    """The nested pure dict of {path: array}; a scanned model's blocks stacked on a leading
    'layers' axis (the inverse of _flatten)."""
    from flax import traverse_util
    if cfg.scan_layers:
        blocks = {p[2:]: [] for p in flat if p[:2] == ("blocks", 0)}
        for sub, stack in blocks.items():
            stack.extend(flat[("blocks", i, *sub)] for i in range(cfg.depth))
        flat = {p: v for p, v in flat.items() if p[0] != "blocks"}
        flat.update({("blocks", *sub): np.stack(stack) for sub, stack in blocks.items()})
    return traverse_util.unflatten_dict(flat)


def _flatten(params: Any, cfg) -> dict:
    from flax import traverse_util
    flat = traverse_util.flatten_dict(params)
    if not cfg.scan_layers:
        return flat
    out = {k: v for k, v in flat.items() if k[0] != "blocks"}
    for k, v in flat.items():
        if k[0] == "blocks":
            for i in range(cfg.depth):
                out[("blocks", i, *k[1:])] = v[i]
    return out


# ------------------------------------------------------------------------------- folders
def read_tensors(folder) -> dict:
    """Every tensor of a diffusers model folder's safetensors file or shards (local or gs://)."""
    from safetensors.numpy import load_file
    folder = storage.path(folder)
    files = sorted(f for f in folder.glob("*.safetensors"))
    if not files:
        raise LoadError(f"{folder} has no *.safetensors file (a diffusers model folder holds "
                        f"{WEIGHTS} or its shards)")
    tensors = {}
    for file in files:
        with storage.local_copy(file) as local:
            tensors.update(load_file(local))
    return tensors


def read_hf_config(folder, class_name: str, part: str, default_class: bool = False) -> dict:
    """A diffusers model folder's config.json, refused unless it is a `class_name` (a config
    without _class_name passes when default_class); `part` names the folder in the error."""
    folder = storage.path(folder)
    if not (folder / CONFIG).exists():
        raise LoadError(f"{folder}/{CONFIG} not found: give the {part}/ folder of a diffusers "
                        f"Wan model")
    hf = json.loads((folder / CONFIG).read_text())
    found = hf.get("_class_name", class_name if default_class else None)
    if found != class_name:
        article = "an" if class_name[0] in "AEIOU" else "a"
        raise LoadError(f"{folder} holds a {found}, not {article} {class_name}")
    return hf


def load_transformer(folder, **overrides) -> tuple[ml_collections.ConfigDict, Any]:
    """(vidit model config, params) of a diffusers WanTransformer3DModel folder."""
    from flax import nnx

    from vidit.models import wan
    folder = storage.path(folder)
    hf = read_hf_config(folder, "WanTransformer3DModel", "transformer", default_class=True)
    cfg = model_config(hf, **overrides)
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: wan.build(cfg)), nnx.Param))
    return cfg, params_from_hf(read_tensors(folder), cfg, abstract)


def load_for(model_cfg: Any, folder) -> Any:
    """Params of a diffusers Wan folder for a run whose config.model is `model_cfg` (its
    layout: scan_layers, dtypes); the folder's architecture must be the config's."""
    folder = storage.path(folder)
    if not (folder / CONFIG).exists():
        raise LoadError(f"config.model.init_from: {folder}/{CONFIG} not found")
    hf_cfg = model_config(json.loads((folder / CONFIG).read_text()))
    differ = [f"{k}: weights {hf_cfg[k]!r}, config {model_cfg[k]!r}"
              for k in ("depth", "width", "heads", "ffn_dim", "text_width", "freq_dim",
                        "channels", "cross_attn_norm")
              if hf_cfg[k] != model_cfg[k]] + (
        [f"patch: weights {tuple(hf_cfg.patch)}, config {tuple(model_cfg.patch)}"]
        if tuple(hf_cfg.patch) != tuple(model_cfg.patch) else [])
    if differ:
        raise ConfigError(f"config.model.init_from={folder} is another Wan architecture than "
                          f"config.model: " + "; ".join(differ))
    _, params = load_transformer(folder, scan_layers=model_cfg.scan_layers,
                                 param_dtype=model_cfg.param_dtype)
    return params


def export_transformer(cfg: Any, params: Any, folder) -> None:
    """Writes params as a diffusers WanTransformer3DModel folder (config.json + safetensors)."""
    import jax
    from safetensors.numpy import save
    folder = storage.path(folder)
    tensors = params_to_hf(jax.device_get(params), cfg)
    storage.write_atomic(folder / WEIGHTS, save(tensors, metadata={"format": "pt"}))
    storage.write_atomic(folder / CONFIG, json.dumps(hf_config(cfg), indent=2))



# ------------------------------------------------------------------------------- the VAE
VAE_KEYS = ("base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks",
            "attn_scales", "temperal_downsample", "in_channels", "out_channels",
            "latents_mean", "latents_std")


def vae_config(hf: dict, **overrides) -> ml_collections.ConfigDict:
    """vidit's Wan VAE config for a diffusers AutoencoderKLWan config.json."""
    if hf.get("is_residual") or hf.get("patch_size") is not None:
        raise ConfigError("this AutoencoderKLWan is Wan 2.2's (is_residual / patch_size); vidit "
                          "imports the Wan 2.1 VAE")
    from vidit.models import wan_vae
    cfg = wan_vae.default_config()
    cfg.update({k: hf[k] for k in VAE_KEYS if k in hf})
    cfg.decoder_base_dim = cfg.decoder_base_dim or cfg.base_dim
    for k in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
        cfg[k] = tuple(cfg[k])
    cfg.update(overrides)
    return cfg


def hf_vae_config(cfg: Any) -> dict:
    """The diffusers config.json of a vidit Wan VAE config."""
    st, s = 2 ** sum(bool(d) for d in cfg.temperal_downsample), 2 ** (len(cfg.dim_mult) - 1)
    out = {"_class_name": "AutoencoderKLWan", "dropout": 0.0, "is_residual": False,
           "patch_size": None, "scale_factor_temporal": st, "scale_factor_spatial": s}
    out.update({k: list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k] for k in VAE_KEYS})
    if out["decoder_base_dim"] == out["base_dim"]:
        out["decoder_base_dim"] = None  # diffusers' way of saying "the same"
    return out


def vae_rows(model) -> list:
    """(diffusers name, vidit path, to_vidit, to_hf) for every tensor of a WanVAE, found by
    walking its modules; module paths are diffusers' (the resamplers' conv is 'resample.1')."""
    from flax import nnx

    from vidit.models import wan_vae as wv
    rows = []
    for path, node in nnx.iter_graph(model):
        prefix = ".".join(str(p) for p in path)
        if isinstance(node, wv.CausalConv):  # [O, I, kt, kh, kw] <-> [kt, kh, kw, I, O]
            kernel = (lambda x: x.transpose(2, 3, 4, 1, 0), lambda x: x.transpose(4, 3, 0, 1, 2))
        elif isinstance(node, wv.Conv2d):  # [O, I, kh, kw] <-> [kh, kw, I, O]
            prefix = prefix[:-len("resample")] + "resample.1"
            kernel = (lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))
        elif isinstance(node, wv.Pointwise):  # [O, I, 1, 1] <-> [I, O]
            kernel = (lambda x: x[:, :, 0, 0].T, lambda x: x.T[:, :, None, None])
        elif isinstance(node, wv.RMSNorm):  # [C, 1, 1(, 1)] <-> [C]
            ones = (1, 1) if node.images else (1, 1, 1)
            rows.append((f"{prefix}.gamma", (*path, "gamma"), lambda x: x.reshape(-1),
                         lambda x, ones=ones: x.reshape(x.shape + ones)))
            continue
        else:
            continue
        rows.append((f"{prefix}.weight", (*path, "kernel"), *kernel))
        rows.append((f"{prefix}.bias", (*path, "bias"), lambda x: x, lambda x: x))
    return rows


def is_vae_folder(folder) -> bool:
    """Whether `folder` holds a diffusers AutoencoderKLWan (its config.json says so)."""
    file = storage.path(folder) / CONFIG
    if not file.exists():
        return False
    try:
        return json.loads(file.read_text()).get("_class_name") == "AutoencoderKLWan"
    except (json.JSONDecodeError, AttributeError):
        return False


def _abstract_vae(cfg):
    from flax import nnx

    from vidit.models import wan_vae
    return nnx.eval_shape(lambda: wan_vae.build(cfg))


def load_vae(folder, **overrides) -> tuple[ml_collections.ConfigDict, Any]:
    """(vidit Wan VAE config, params) of a diffusers AutoencoderKLWan folder."""
    from flax import nnx, traverse_util
    folder = storage.path(folder)
    cfg = vae_config(read_hf_config(folder, "AutoencoderKLWan", "vae"), **overrides)
    model = _abstract_vae(cfg)
    rows, tensors = vae_rows(model), read_tensors(folder)
    _check_names(tensors, [t for t, *_ in rows])
    flat = {path: to_vidit(np.asarray(tensors[theirs])) for theirs, path, to_vidit, _ in rows}
    abstract = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return cfg, _check_shapes(abstract, traverse_util.unflatten_dict(flat))


def export_vae(cfg: Any, params: Any, folder) -> None:
    """Writes a vidit Wan VAE's params as a diffusers AutoencoderKLWan folder."""
    import jax
    from flax import traverse_util
    from safetensors.numpy import save
    folder = storage.path(folder)
    flat = traverse_util.flatten_dict(jax.device_get(params))
    tensors = {theirs: np.ascontiguousarray(to_hf(np.asarray(flat[path])))
               for theirs, path, _, to_hf in vae_rows(_abstract_vae(cfg))}
    storage.write_atomic(folder / WEIGHTS, save(tensors, metadata={"format": "pt"}))
    storage.write_atomic(folder / CONFIG, json.dumps(hf_vae_config(cfg), indent=2))
