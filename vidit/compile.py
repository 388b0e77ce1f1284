"""Will this config fit a TPU slice? Compile its real train step for one, on this machine.

    python -m vidit.compile --config configs/dit_8b.py --topology v5p:8x8x8
    python -m vidit.compile --config configs/dit_30b.py --topology v5p:16x16x16 --json
    python -m vidit.compile --config configs/dit_1b.py --topology v5p:4x4x4 --config.mesh.fsdp=16
    python -m vidit.compile --config configs/dit_1b.py --topology v5p:4x4x4 --num_slices 2 \
        --config.mesh.dcn_data=2        # two v5p-128 slices joined over DCN (multi-slice)
    python -m vidit.compile --config configs/dit_8b.py --topology v5p:8x8x8 \
        --text_encoder t5-v1_1-xxl      # also the frozen caption encoder, on the same mesh
    python -m vidit.compile --config configs/dit_8b.py --topology v5p:8x8x8 --search

Needs libtpu (`pip install -e ".[tpu]"`), not a TPU: `jax.experimental.topologies` describes
the slice's chips, the mesh is built over them from config.mesh, and the same jitted train step
`vidit.train` runs is lowered with abstract (never allocated) parameters, optimizer state and
batch, then compiled by the TPU compiler. The report gives per-chip memory (parameters,
optimizer state and EMA from their shardings; XLA's argument, temporary and total figures),
whether it fits the chip's HBM, compiled FLOPs per step, and the step time and tokens/s that
the chip's peak gives at a stated MFU. Exit status 2 if it does not fit.

It also reads the compiled program itself (vidit/hlo_cost.py): per chip, the FLOPs and HBM bytes
with every loop body counted at its trip count (XLA's cost analysis counts a scanned block
once), and the bytes each collective kind sends over ICI and DCN; from those and the chip table
(CHIPS), a roofline step time, max(compute, HBM) + collectives, and the MFU it implies.
`--search` compiles every tensor x sequence split of the slice, then the best two under other
remat policies and batch sizes, and names the layout with the best estimated MFU.

`--num_slices K` describes K copies of the slice joined over the data-centre network (DCN): the
devices then carry `slice_index`, config.mesh.dcn_* must multiply to K, and the mesh is built
per slice (ICI) x across slices (DCN) as on a real multi-slice job; the report shows both.

`--text_encoder NAME|FOLDER` (t5-v1_1-xxl, umt5-xxl, or a Hugging Face folder's config.json)
also compiles the frozen T5 encoder's forward pass over one global batch of captions, in bf16,
its parameters laid out by the same logical rules on the same mesh: what encode_text runs per
batch on the slice, or what config.model.text_encoder.online adds to each step.
"""
from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

import jax
import numpy as np

from vidit import batches, checks, cli, diffusion, flops, hlo_cost, sharding, steps, text_encoders
from vidit.errors import ConfigError
from vidit.train_state import Setup

# Per chip, from the Google Cloud TPU documentation's system-architecture pages (v4, v5e, v5p,
# v6e): dense bf16 peak, HBM capacity and bandwidth, bidirectional ICI bandwidth, ICI torus
# dimensions, and DCN bandwidth where the page gives one per chip (v5p: 50 Gbps; v5e: 6.4 Tbps
# per 256-chip pod). None: not published per chip; the roofline then leaves that term out and
# says so.
CHIPS = {
    "v4": {"peak_tflops": 275, "hbm_gib": 32, "hbm_gbps": 1200, "ici_gbps": None,
           "torus_dims": 3, "dcn_gbps": None},
    "v5e": {"peak_tflops": 197, "hbm_gib": 16, "hbm_gbps": 819, "ici_gbps": 400,
            "torus_dims": 2, "dcn_gbps": 25},
    "v5litepod": {"peak_tflops": 197, "hbm_gib": 16, "hbm_gbps": 819, "ici_gbps": 400,
                  "torus_dims": 2, "dcn_gbps": 25},
    "v5p": {"peak_tflops": 459, "hbm_gib": 95, "hbm_gbps": 2765, "ici_gbps": 1200,
            "torus_dims": 3, "dcn_gbps": 50},
    "v6e": {"peak_tflops": 918, "hbm_gib": 32, "hbm_gbps": 1638, "ici_gbps": 800,
            "torus_dims": 2, "dcn_gbps": None},
}
GIB = 2**30


def topology_devices(name: str, num_slices: int = 1) -> list:
    """The abstract TPU devices of a slice such as 'v5p:8x8x8' (libtpu needed, no TPU); with
    num_slices > 1, of that many such slices (each device has a `slice_index`)."""
    chip = name.split(":")[0]
    if chip not in CHIPS:
        raise ConfigError(f"--topology '{name}': chip '{chip}' is not one of {sorted(CHIPS)}")
    if num_slices < 1:
        raise ConfigError(f"--num_slices={num_slices} must be at least 1")
    extra = {"num_slices": num_slices} if num_slices > 1 else {}
    try:
        from jax.experimental import topologies
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name,
                                                 **extra).devices)
    except (ImportError, RuntimeError, ValueError) as e:
        hint = "is libtpu installed? pip install -e '.[tpu]'"
        if "lockfile" in str(e):  # libtpu admits one process per machine unless told otherwise
            hint = ("another process on this machine has libtpu loaded; on a machine without "
                    "TPUs in use, ALLOW_MULTIPLE_LIBTPU_LOAD=1 lets several compile at once")
        raise RuntimeError(f"cannot describe TPU topology '{name}' ({e}); {hint}") from e


def _shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def compile_step(config: Any, topology: str, num_slices: int = 1):
    """(compiled train step, setup) for the slice(s), from abstract state and batch."""
    devices = topology_devices(topology, num_slices)
    mesh = sharding.make_mesh(config.mesh, devices)
    objective = diffusion.make_objective(config.objective)
    if config.data.get("autoencoder"):
        raise ConfigError("vidit.compile compiles a step on cached latents: set "
                          "config.data.autoencoder='' and config.data.channels to the latent's")
    te = config.model.get("text_encoder", {})
    if text_encoders.is_frozen(config.model) and te.get("online"):
        raise ConfigError("vidit.compile compiles a step on cached caption embeddings: set "
                          "config.model.text_encoder.online=False")
    checks.validate(config, mesh, objective)  # the same start-up checks as a real run
    setup = Setup(config, mesh)
    # A distillation step also takes the frozen teacher, laid out like the params.
    frozen = {"teacher": setup.abstract.params} if objective.needs.target == "teacher" else {}
    if text_encoders.is_frozen(config.model):  # the empty caption's cached embedding
        repl = sharding.replicated(mesh)
        frozen["null_text"] = {
            "text_embedding": jax.ShapeDtypeStruct(
                (1, config.model.text_len, config.model.text_width), jax.numpy.float32,
                sharding=repl),
            "text_mask": jax.ShapeDtypeStruct((1, config.model.text_len), jax.numpy.bool_,
                                              sharding=repl)}
    with sharding.use(mesh, config.sharding_rules):
        lowered = steps.jit_train_step(setup, objective).lower(
            setup.abstract, batches.abstract_batch(config, mesh), frozen)
    return lowered.compile(), setup


def compile_report(config: Any, topology: str, mfu: float = 0.4, num_slices: int = 1) -> dict:
    chip = CHIPS[topology.split(":")[0]]
    start = time.perf_counter()
    compiled, setup = compile_step(config, topology, num_slices)
    compile_s = time.perf_counter() - start
    state, mesh = setup.abstract, setup.mesh

    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    args, temp = memory.argument_size_in_bytes, memory.temp_size_in_bytes
    out, alias = memory.output_size_in_bytes, memory.alias_size_in_bytes
    total = args + out - alias + temp + memory.generated_code_size_in_bytes
    d = config.data
    fwd = flops.forward_flops(config.model, d.num_frames, d.height, d.width)
    model_flops = flops.train_flops_per_step(config.model, d)
    chips = mesh.devices.size
    slices = len(sharding.device_slices(list(mesh.devices.flat), config.mesh.get("num_slices", 0)))
    ici, dcn = sharding.hybrid_mesh_shape(config.mesh, chips, slices)
    step_s = model_flops / (chips * chip["peak_tflops"] * 1e12 * mfu)
    # The HLO's device ids index the mesh's devices in order; their slice decides ICI or DCN.
    device_slices = [getattr(dev, "slice_index", 0) or 0 for dev in mesh.devices.flat]
    hlo = hlo_cost.analyze(compiled.as_text(), device_slices)
    return {
        "topology": topology, "chips": chips, "mesh": dict(mesh.shape),
        "num_slices": slices, "mesh_ici": ici, "mesh_dcn": dcn,
        "params": setup.num_params(), "tokens_per_clip": fwd["tokens"],
        "global_batch": d.batch_size, "attention": config.model.attention,
        "sequence_parallel": config.model.get("sequence_parallel", "ulysses"),
        "remat": config.model.remat, "dtype": config.model.dtype,
        "per_chip_gib": {
            "params": _shard_bytes(state.params) / GIB,
            "ema": _shard_bytes(state.ema_params) / GIB,
            "optimizer": _shard_bytes(state.opt_state) / GIB,
            "arguments": args / GIB,
            "temp": temp / GIB,
            "total": total / GIB,
        },
        "hbm_gib": chip["hbm_gib"],
        "fits": total <= chip["hbm_gib"] * GIB,
        # XLA's cost analysis counts a loop body once: with scan_layers, about one layer.
        "compiled_flops_per_chip": float(cost.get("flops", float("nan"))),
        "model_flops_per_step": model_flops,
        # What each chip runs, every loop at its trip count (vidit.hlo_cost), and the step
        # time that implies for this chip.
        "hlo": hlo.as_dict(),
        "roofline": roofline(hlo, chip, model_flops / chips),
        "assumed_mfu": mfu,
        "step_time_s": step_s,
        "tokens_per_s": fwd["tokens"] * d.batch_size / step_s,
        "compile_s": round(compile_s, 1),
        # The caption path: cross-attention to the text tokens (and the byte encoder when
        # trained), its share of the model FLOPs, and the text input's bytes per chip.
        "text": _text_cost(config, fwd, mesh),
    }


def bucket_reports(config: Any, topology: str, mfu: float = 0.4, num_slices: int = 1) -> dict:
    """{bucket: its step's memory and roofline} for a config with several shape buckets
    (config.data.buckets): each bucket's step compiled as the trainer compiles it."""
    out = {}
    for b in checks.buckets(config):
        c = config.copy_and_resolve_references()
        with c.unlocked():
            c.data.num_frames, c.data.height, c.data.width = b.shape
            c.data.batch_size, c.data.buckets = b.batch_size, ""
        r = compile_report(c, topology, mfu, num_slices)
        out[b.name] = {"batch": b.batch_size, "tokens_per_clip": r["tokens_per_clip"],
                       "fits": r["fits"], "per_chip_gib": r["per_chip_gib"]["total"],
                       "roofline_step_s": r["roofline"]["step_s"],
                       "roofline_mfu": r["roofline"]["mfu"], "compile_s": r["compile_s"]}
    return out


def roofline(hlo: hlo_cost.HloCost, chip: dict, model_flops_per_chip: float) -> dict:
    """Step time from the compiled program on one chip: max(FLOPs at peak, HBM bytes at HBM
    bandwidth) plus the collectives at link bandwidth (no overlap assumed: an upper bound; the
    overlapped bound, max of all terms, is reported beside it), and the MFU that implies.

    A collective over one mesh axis is taken to use the ICI links of one torus dimension (both
    directions): the chip's bidirectional ICI bandwidth / torus dimensions / 2 per byte sent;
    groups spanning several dimensions get more, so this errs slow."""
    compute_s = hlo.flops / (chip["peak_tflops"] * 1e12)
    memory_s = hlo.hbm_bytes / (chip["hbm_gbps"] * 1e9)
    ici_rate = (chip["ici_gbps"] * 1e9 / chip["torus_dims"] / 2) if chip["ici_gbps"] else None
    dcn_rate = chip["dcn_gbps"] * 1e9 / 8 if chip["dcn_gbps"] else None
    ici_s = hlo.ici_bytes / ici_rate if ici_rate else (0.0 if not hlo.ici_bytes else None)
    dcn_s = hlo.dcn_bytes / dcn_rate if dcn_rate else (0.0 if not hlo.dcn_bytes else None)
    known = [t for t in (ici_s, dcn_s) if t is not None]
    step_s = max(compute_s, memory_s) + sum(known)
    overlapped_s = max([compute_s, memory_s] + known)
    terms = {"compute": compute_s, "hbm": memory_s, "ici": ici_s or 0.0, "dcn": dcn_s or 0.0}
    return {
        "compute_s": compute_s, "hbm_s": memory_s, "ici_s": ici_s, "dcn_s": dcn_s,
        "step_s": step_s, "step_s_overlapped": overlapped_s,
        "mfu": model_flops_per_chip / (step_s * chip["peak_tflops"] * 1e12),
        "mfu_overlapped": model_flops_per_chip / (overlapped_s * chip["peak_tflops"] * 1e12),
        "bound": max(terms, key=terms.get),
        "top_collective": max(hlo.collective_bytes, key=hlo.collective_bytes.get)
        if hlo.collective_bytes else None,
        "unpriced": [k for k, t in (("ici", ici_s), ("dcn", dcn_s)) if t is None],
        "hardware_flops_ratio": hlo.flops / model_flops_per_chip if model_flops_per_chip else None,
        "opaque_kernels": hlo.custom_calls,
    }


def compile_text_encoder(config: Any, topology: str, encoder: str, mfu: float = 0.4,
                         num_slices: int = 1) -> dict:
    """Compiles the frozen T5 encoder `encoder` (a name in t5.HF_CONFIGS or a Hugging Face
    folder) over one global batch of config.model.text_len tokens, in bf16, on the slice."""
    from flax import nnx
    from vidit import storage
    from vidit.models import t5
    if encoder in t5.HF_CONFIGS:
        hf = t5.HF_CONFIGS[encoder]
    else:
        folder = storage.path(encoder)
        if not (folder / "config.json").exists():
            raise ConfigError(f"--text_encoder={encoder!r} is neither one of "
                              f"{sorted(t5.HF_CONFIGS)} nor a folder with a config.json")
        hf = json.loads((folder / "config.json").read_text())
    cfg = t5.T5Config.from_hf(hf, dtype="bfloat16", param_dtype="bfloat16")
    if cfg.d_model != config.model.text_width:
        raise ConfigError(f"--text_encoder={encoder!r} is {cfg.d_model} wide; the config's DiT "
                          f"reads config.model.text_width={config.model.text_width}")
    chip = CHIPS[topology.split(":")[0]]
    mesh = sharding.make_mesh(config.mesh, topology_devices(topology, num_slices))
    rules = config.sharding_rules
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: t5.T5Encoder(cfg, rngs=nnx.Rngs(0))),
                                   nnx.Param)
    names = sharding.logical_names(abstract)
    abstract = nnx.to_pure_dict(abstract)
    shardings = sharding.tree_shardings(abstract, names, mesh, rules)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    b, length = config.data.batch_size, config.model.text_len
    ids = jax.ShapeDtypeStruct((b, length), jax.numpy.int32,
                               sharding=sharding.batch_sharding(mesh, 2))
    mask = jax.ShapeDtypeStruct((b, length), jax.numpy.bool_,
                                sharding=sharding.batch_sharding(mesh, 2))
    start = time.perf_counter()
    with sharding.use(mesh, rules):
        compiled = jax.jit(lambda p, i, m: nnx.merge(graphdef, p)(i, m)).lower(
            params, ids, mask).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes + memory.temp_size_in_bytes
             + memory.generated_code_size_in_bytes)
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
    embed = cfg.vocab_size * cfg.d_model  # a lookup, no FLOPs
    # 2 FLOPs per weight per token, plus QK^T and AV: 4 * L^2 * heads * d_kv per layer and clip
    model_flops = b * (2 * (num_params - embed) * length
                       + cfg.num_layers * 4 * length**2 * cfg.num_heads * cfg.d_kv)
    chips = mesh.devices.size
    # What each chip executes (the encoder has no scanned loop, so XLA counts all of it): more
    # than model_flops / chips where mesh axes that do not split the caption batch (sequence,
    # tensor) repeat the same captions' work.
    per_chip = float(cost.get("flops", float("nan")))
    encode_s = per_chip / (chip["peak_tflops"] * 1e12 * mfu)
    return {"encoder": encoder, "params": num_params, "dtype": "bfloat16",
            "batch": b, "tokens": length,
            "params_gib_per_chip": _shard_bytes(params) / GIB,
            "total_gib_per_chip": total / GIB, "fits": total <= chip["hbm_gib"] * GIB,
            "model_flops_per_batch": model_flops, "compiled_flops_per_chip": per_chip,
            "replication": per_chip * chips / model_flops,
            "encode_s_per_batch": encode_s, "compile_s": round(compile_s, 1)}


def _text_cost(config: Any, fwd: dict, mesh) -> dict | None:
    if config.model.cond != "text":
        return None
    batch = batches.abstract_batch(config, mesh)
    per_chip = sum(_shard_bytes(batch[k]) for k in ("text", "text_embedding", "text_mask")
                   if k in batch)
    return {"encoder": config.model.get("text_encoder", {}).get("kind", "byte"),
            "tokens": int(config.model.text_len), "width": int(config.model.text_width),
            "flops_fraction": fwd["text"] / fwd["total"], "input_gib_per_chip": per_chip / GIB}


def format_report(r: dict) -> str:
    m = r["per_chip_gib"]
    lines = [
        f"{r['topology']}: {r['chips']} chips, mesh {r['mesh']}" + (
            f" = ICI {r['mesh_ici']} per slice x DCN {r['mesh_dcn']} over {r['num_slices']} "
            f"slices" if r.get("num_slices", 1) > 1 else ""),
        f"model: {r['params'] / 1e9:.2f}B parameters, {r['tokens_per_clip']} tokens/clip, "
        f"global batch {r['global_batch']}, attention {r['attention']} "
        f"({r['sequence_parallel']}), remat {r['remat']}, {r['dtype']}",
        f"per chip: params {m['params']:.2f} GiB, EMA {m['ema']:.2f}, optimizer "
        f"{m['optimizer']:.2f}, temporaries {m['temp']:.2f}; total {m['total']:.2f} of "
        f"{r['hbm_gib']} GiB HBM -> {'FITS' if r['fits'] else 'DOES NOT FIT'}",
        f"model FLOPs per step: {r['model_flops_per_step']:.3e} "
        f"({r['model_flops_per_step'] / r['chips']:.3e} per chip); XLA's cost analysis: "
        f"{r['compiled_flops_per_chip']:.3e} per chip (loop bodies counted once)",
        f"at {r['assumed_mfu']:.0%} MFU: {r['step_time_s']:.2f} s/step, "
        f"{r['tokens_per_s']:.3g} tokens/s (compiled in {r['compile_s']} s)",
    ]
    if r.get("roofline"):
        h, f = r["hlo"], r["roofline"]
        coll = ", ".join(f"{k} {v / GIB:.2f}" for k, v in sorted(h["collective_bytes"].items()))
        lines += [
            f"per chip, loops at their trip counts: {h['flops']:.3e} FLOPs "
            f"({f['hardware_flops_ratio']:.2f}x the model FLOPs: remat recomputation and "
            f"element-wise work), {h['hbm_bytes'] / GIB:.1f} GiB HBM traffic; sent over ICI "
            f"{h['ici_bytes'] / GIB:.2f} GiB, DCN {h['dcn_bytes'] / GIB:.2f} GiB "
            f"({coll or 'no collectives'})",
            f"roofline: compute {f['compute_s']:.2f} s, HBM {f['hbm_s']:.2f} s, ICI "
            f"{_seconds(f['ici_s'])}, DCN {_seconds(f['dcn_s'])} -> {f['step_s']:.2f} s/step "
            f"serial ({f['mfu']:.0%} MFU), {f['step_s_overlapped']:.2f} s overlapped "
            f"({f['mfu_overlapped']:.0%} MFU); bound by {f['bound']}"
            + (f"; {f['opaque_kernels']} Pallas kernel calls not counted" if
               f["opaque_kernels"] else "")
            + (f"; no published {'/'.join(f['unpriced'])} bandwidth for this chip" if
               f["unpriced"] else ""),
        ]
    for name, b in r.get("buckets", {}).items():
        lines.append(f"bucket {name} (batch {b['batch']}, {b['tokens_per_clip']} tokens/clip): "
                     f"{b['per_chip_gib']:.2f} GiB per chip -> "
                     f"{'fits' if b['fits'] else 'DOES NOT FIT'}, roofline "
                     f"{b['roofline_step_s']:.2f} s/step ({b['roofline_mfu']:.0%} MFU)")
    if r.get("text"):
        t = r["text"]
        lines.append(f"text: {t['encoder']} encoder, {t['tokens']} tokens x {t['width']}; "
                     f"{t['flops_fraction']:.1%} of the model FLOPs; text input "
                     f"{t['input_gib_per_chip'] * 1024:.1f} MiB per chip")
    if r.get("text_encoder"):
        e = r["text_encoder"]
        lines.append(
            f"text encoder {e['encoder']}: {e['params'] / 1e9:.2f}B parameters ({e['dtype']}), "
            f"{e['params_gib_per_chip']:.2f} GiB per chip, total {e['total_gib_per_chip']:.2f} "
            f"GiB -> {'FITS' if e['fits'] else 'DOES NOT FIT'}; one global batch of "
            f"{e['batch']} x {e['tokens']} tokens: {e['model_flops_per_batch']:.3e} FLOPs, "
            f"{e['replication']:.1f}x that compiled over the chips, "
            f"{e['encode_s_per_batch']:.3f} s at {r['assumed_mfu']:.0%} MFU "
            f"({e['encode_s_per_batch'] / r['step_time_s']:.1%} of a train step)")
    return "\n".join(lines)


def _seconds(t):
    return "n/a" if t is None else f"{t:.2f} s"


def search_layouts(config: Any, topology: str, num_slices: int = 1,
                   remats=("full", "dots_saveable", "none"), batch_scales=(1, 2),
                   max_split: int = 8, log=print) -> list[dict]:
    """Compiles the config under each (tensor, sequence) split of the slice (fsdp takes the
    rest; the global batch grows to one clip per batch shard where needed), then the best two
    under other remat policies and with their batch scaled by batch_scales, halving a batch
    that does not fit until it does; returns one row per layout, best estimated (serial
    roofline) MFU first among those that fit."""
    import copy
    chips = len(topology_devices(topology, num_slices))

    def attempt(tensor, sequence, remat, batch):
        c = copy.deepcopy(config)
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.sequence = 1, -1, tensor, sequence
        c.model.remat = remat
        # The batch splits over data x fsdp (the chips left after tensor and sequence): at
        # least one clip per batch shard.
        shards = chips // (tensor * sequence)
        c.data.batch_size = -(-max(batch, shards) // shards) * shards
        row = {"tensor": tensor, "sequence": sequence, "remat": remat,
               "global_batch": c.data.batch_size}
        try:
            r = compile_report(c, topology, num_slices=num_slices)
        except (ConfigError, ValueError) as e:  # a split the model or the checks refuse
            return row | {"error": str(e).splitlines()[0][:160]}
        except Exception as e:  # noqa: BLE001 - the compiler's own refusal (e.g. out of memory)
            return row | {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        f = r["roofline"]
        return row | {"mesh": r["mesh"], "fits": r["fits"],
                      "total_gib": r["per_chip_gib"]["total"], "step_s": f["step_s"],
                      "mfu": f["mfu"], "mfu_overlapped": f["mfu_overlapped"],
                      "bound": f["bound"], "compute_s": f["compute_s"], "hbm_s": f["hbm_s"],
                      "ici_s": f["ici_s"], "dcn_s": f["dcn_s"],
                      "top_collective": f["top_collective"],
                      "tokens_per_s": r["tokens_per_clip"] * c.data.batch_size / f["step_s"]}

    def key(row):
        return row.get("mfu", -1) if row.get("fits") else -1

    splits = [2**i for i in range(int(math.log2(max_split)) + 1)]
    rows = []
    for tensor in splits:
        for sequence in splits:
            rows.append(attempt(tensor, sequence, config.model.remat, config.data.batch_size))
            log(_search_line(rows[-1]))
    best = sorted(rows, key=key, reverse=True)[:2]
    for b in best:
        if "error" in b:
            continue
        shards = chips // (b["tensor"] * b["sequence"])
        for remat in remats:
            for scale in batch_scales:
                if (remat, scale) == (config.model.remat, 1):
                    continue
                batch = int(b["global_batch"] * scale)
                while True:  # halve the batch until it fits (or one clip per batch shard)
                    rows.append(attempt(b["tensor"], b["sequence"], remat, batch))
                    log(_search_line(rows[-1]))
                    if rows[-1].get("fits") or batch // 2 < shards or not (
                            "fits" in rows[-1] or "RESOURCE_EXHAUSTED" in rows[-1]["error"]):
                        break
                    batch //= 2
                if scale > 1 and not rows[-1].get("fits"):
                    break  # a larger batch will not fit either
    return sorted(rows, key=key, reverse=True)


def _search_line(row: dict) -> str:
    head = (f"tensor {row['tensor']} x sequence {row['sequence']}, remat {row['remat']}, "
            f"batch {row['global_batch']}: ")
    if "error" in row:
        return head + "refused: " + row["error"]
    return head + (f"{row['total_gib']:.1f} GiB/chip {'fits' if row['fits'] else 'DOES NOT FIT'}"
                   f", {row['step_s']:.2f} s/step, MFU {row['mfu']:.0%} serial / "
                   f"{row['mfu_overlapped']:.0%} overlapped, bound by {row['bound']}")


def main(argv):
    from absl import flags
    del argv
    cli.setup(compilation_cache=False, multi_host=False)
    f = flags.FLAGS
    if f.search:
        rows = search_layouts(f.config, f.topology, f.num_slices, log=lambda line: print(
            line, file=sys.stderr, flush=True))
        best = next((r for r in rows if r.get("fits")), None)
        if f.json:
            print(json.dumps({"topology": f.topology, "best": best, "layouts": rows}, indent=2))
        elif best:
            print("best layout: " + _search_line(best))
        if best is None:
            print("no layout fits", file=sys.stderr)
            sys.exit(2)
        return
    report = compile_report(f.config, f.topology, f.mfu, f.num_slices)
    if len(checks.buckets(f.config)) > 1:  # every bucket's step must fit too
        report["buckets"] = bucket_reports(f.config, f.topology, f.mfu, f.num_slices)
        report["fits"] = report["fits"] and all(b["fits"] for b in report["buckets"].values())
    if f.text_encoder:
        report["text_encoder"] = compile_text_encoder(f.config, f.topology, f.text_encoder,
                                                       f.mfu, f.num_slices)
    print(json.dumps(report, indent=2) if f.json else format_report(report))
    if not report["fits"] or not report.get("text_encoder", {"fits": True})["fits"]:
        sys.exit(2)


def define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:variant]).",
                                    lock_config=True)
    flags.DEFINE_string("topology", "v5p:4x4x4", "TPU slice, e.g. v5p:8x8x8, v5e:4x4, v6e:16x16")
    flags.DEFINE_integer("num_slices", 1, "slices of --topology joined over DCN (multi-slice); "
                         "config.mesh.dcn_* must multiply to it")
    flags.DEFINE_float("mfu", 0.4, "MFU assumed for the step-time estimate")
    flags.DEFINE_bool("json", False, "print the report as JSON")
    flags.DEFINE_bool("search", False, "compile every tensor x sequence split of the slice "
                      "(fsdp takes the rest), then the best two with other remat policies and "
                      "twice the batch; name the layout with the best roofline MFU")
    flags.DEFINE_string("text_encoder", None, "also compile this frozen T5 encoder on the mesh: "
                        "t5-v1_1-xxl, umt5-xxl, or a Hugging Face folder")
    flags.mark_flags_as_required(["config"])


def entry_point():
    cli.run(main, define_flags)


if __name__ == "__main__":
    entry_point()
