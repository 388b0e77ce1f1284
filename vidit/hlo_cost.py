"""What one chip executes in a compiled XLA program: FLOPs, HBM bytes and collective bytes, read
from the compiled HLO text with every loop body counted as many times as the loop runs.

XLA's own `cost_analysis()` counts a while-loop body once, so a model whose blocks run under
`scan` (config.model.scan_layers) reports about one block's work. Here each computation gets a
multiplicity (how often one step runs it: a loop body's trip count, read from its condition,
times its caller's multiplicity) and each instruction's cost is weighted by it:

- FLOPs: 2 per multiply-add of a `dot` or `convolution` (TPU lowers matmuls to convolutions;
  padded window positions do no work and are not counted), one per element of element-wise
  arithmetic and per input element of a reduction, as XLA's HloCostAnalysis counts them.
  Transcendentals (exp, log, tanh, ...) are counted apart, as XLA does. Pallas kernels are
  custom calls XLA cannot see into: splash attention's are counted from their operand shapes
  (ATTENTION_KERNELS); any other is counted in `custom_calls` and adds no FLOPs.
- HBM bytes: each top-level instruction (a fusion, a copy, a collective: not the ops inside a
  fusion, which stay on chip) reads its operands and writes its result once. Custom calls are
  left out (buffer allocations, and Pallas kernels whose own traffic is not visible here).
- Collectives: per kind, the bytes each chip sends, for ring algorithms over a group of g chips:
  all-gather (g-1)/g of the result, reduce-scatter (g-1)/g of the operand, all-reduce twice
  that of its operand, all-to-all (g-1)/g, collective-permute all of it; split into ICI and DCN
  by whether a group spans slices.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

import numpy as np

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
               "s4": 0.5, "u4": 0.5, "s2": 0.25, "u2": 0.25, "token": 0}
ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "negate", "abs",
               "compare", "select", "clamp", "and", "or", "xor", "not", "remainder", "sign",
               "floor", "ceil", "round-nearest-afz", "round-nearest-even", "convert",
               "shift-left", "shift-right-logical", "shift-right-arithmetic", "is-finite"}
TRANSCENDENTAL = {"exponential", "exponential-minus-one", "log", "log-plus-one", "tanh",
                  "logistic", "sqrt", "rsqrt", "cbrt", "power", "sine", "cosine", "tan",
                  "atan2", "erf"}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Bookkeeping instructions that move no data through HBM by themselves.
FREE = {"parameter", "tuple", "get-tuple-element", "constant", "bitcast", "while", "call",
        "conditional", "after-all", "partition-id", "replica-id", "iota", "custom-call",
        "add-dependency", "opt-barrier", "domain", "copy-done", "send-done", "recv-done",
        "all-gather-done", "all-reduce-done", "collective-permute-done", "async-done",
        "async-update"}

_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\](\{[^}]*\})?")
_NAME = re.compile(r"%([\w.\-]+)")


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list
    attrs: str
    args: str = ""  # the raw text between the opcode's parentheses (a constant's value)
    root: bool = False


@dataclasses.dataclass
class HloCost:
    """Per-chip totals of one run of the program (every loop at its trip count)."""
    flops: float = 0.0
    transcendentals: float = 0.0
    hbm_bytes: float = 0.0
    custom_calls: int = 0
    collective_bytes: dict = dataclasses.field(default_factory=lambda: defaultdict(float))
    ici_bytes: float = 0.0
    dcn_bytes: float = 0.0
    loops: list = dataclasses.field(default_factory=list)  # (body, trip count, caller)

    def as_dict(self) -> dict:
        return {"flops": self.flops, "transcendentals": self.transcendentals,
                # loops whose trip count could not be read (counted once, as XLA would)
                "unknown_trip_counts": sum(trips is None for _, trips, _ in self.loops),
                "hbm_bytes": self.hbm_bytes, "custom_calls": self.custom_calls,
                "collective_bytes": dict(self.collective_bytes), "ici_bytes": self.ici_bytes,
                "dcn_bytes": self.dcn_bytes}


def shape_arrays(shape: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(dtype, dims, layout) of each array in an HLO shape string (a tuple has several)."""
    return [(d, tuple(int(x) for x in dims.split(",") if x), layout or "")
            for d, dims, layout in _ARRAY.findall(shape) if d in DTYPE_BYTES]


def shape_bytes(shape: str) -> float:
    return sum(math.prod(dims) * DTYPE_BYTES[d] for d, dims, _ in shape_arrays(shape))


def shape_elements(shape: str) -> int:
    return sum(math.prod(dims) for _, dims, _ in shape_arrays(shape))


def _matching(text: str, start: int) -> int:
    """Index just past the bracket that closes the one at text[start]."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    depth, closer = 0, pairs[text[start]]
    for i in range(start, len(text)):
        if text[i] == text[start]:
            depth += 1
        elif text[i] == closer:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced HLO text near {text[start:start + 80]!r}")


def _parse_instr(line: str) -> Instr | None:
    body = line.strip()
    root = body.startswith("ROOT ")
    if root:
        body = body[5:]
    m = re.match(r"%?([\w.\-]+)\s*=\s*", body)
    if not m:
        return None
    rest = body[m.end():]
    if rest.startswith("("):
        end = _matching(rest, 0)
    else:
        end = rest.index(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    close = _matching(rest, op.end() - 1)
    args = rest[op.end():close - 1]
    return Instr(m.group(1), shape, op.group(1), _NAME.findall(args), rest[close:], args, root)


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str]:
    """({computation name: its instructions}, the entry computation's name). An instruction may
    span lines (a Pallas kernel's backend_config holds newlines); a computation ends at a line
    that is only "}"."""
    comps, entry, current, pending = {}, None, None, []

    def flush():
        if pending and current is not None:
            instr = _parse_instr(" ".join(pending))
            if instr:
                current.append(instr)
        pending.clear()

    for line in text.splitlines():
        header = _COMP_HEADER.match(line) if not line.startswith(" ") else None
        if header:
            flush()
            current = comps.setdefault(header.group(2), [])
            if header.group(1):
                entry = header.group(2)
        elif line.strip() == "}" and not line.startswith("  "):
            flush()
            current = None
        elif current is not None:
            if re.match(r"\s+(ROOT\s+)?%", line):
                flush()
            pending.append(line)
    flush()
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _attr(attrs: str, key: str) -> str | None:
    i = attrs.find(key + "=")
    if i < 0:
        return None
    j = i + len(key) + 1
    if attrs[j] in "{[":
        end = _matching(attrs, j)
        if attrs[j] == "[" and attrs[end:end + 2] == "<=":  # iota replica groups [G,S]<=[..]T(..)
            m = re.match(r"<=\[[\d,]*\](T\([\d,]*\))?", attrs[end:])
            end += m.end()
        return attrs[j:end]
    m = re.match(r"[^,\s]+", attrs[j:])
    return m.group(0)


def _ints(text: str | None) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text or "")]


def _trip_count(comps, cond: str, while_instr: Instr, defs: dict) -> int | None:
    """Trip count of a `while` from its condition: `counter < N` (or <=), counter starting at the
    constant the loop's input tuple holds (0 when that is not a constant)."""
    instrs = list(comps.get(cond, []))
    alias = {}  # a fused compare's parameters stand for the fusion's operands
    for ins in comps.get(cond, []):
        callee = _attr(ins.attrs, "calls") if ins.opcode == "fusion" else None
        if callee:
            inner = comps.get(callee.lstrip("%"), [])
            instrs += inner
            for p in inner:
                if p.opcode == "parameter" and int(p.args) < len(ins.operands):
                    alias[p.name] = ins.operands[int(p.args)]
    by_name = {i.name: i for i in instrs}
    for ins in instrs:
        if ins.opcode != "compare" or len(ins.operands) != 2:
            continue
        direction = _attr(ins.attrs, "direction")
        a, b = (by_name.get(alias.get(n, n)) for n in ins.operands)
        if direction in ("GT", "GE"):
            a, b = b, a
            direction = {"GT": "LT", "GE": "LE"}[direction]
        if not (a and b and b.opcode == "constant" and direction in ("LT", "LE")):
            continue
        if not re.fullmatch(r"-?\d+", b.args.strip()):
            continue
        limit = int(b.args)
        start = 0
        if a.opcode == "get-tuple-element" and while_instr.operands:
            index = int(_attr(a.attrs, "index") or 0)
            tup = defs.get(while_instr.operands[0])
            if tup is not None and tup.opcode == "tuple" and index < len(tup.operands):
                init = defs.get(tup.operands[index])
                if init is not None and init.opcode == "constant" and re.fullmatch(
                        r"-?\d+", init.args.strip()):
                    start = int(init.args)
        return max(limit - start + (direction == "LE"), 0)
    return None


def _conv_flops(ins: Instr, defs: dict) -> float:
    labels = _attr(ins.attrs, "dim_labels")
    lhs, rhs = (defs.get(n) for n in ins.operands[:2])
    if not labels or lhs is None or rhs is None:
        return 0.0
    lhs_l, rest = labels.split("_", 1)
    rhs_l, out_l = rest.split("->")
    (_, lhs_dims, _), (_, rhs_dims, _), (_, out_dims, _) = (
        shape_arrays(lhs.shape)[0], shape_arrays(rhs.shape)[0], shape_arrays(ins.shape)[0])
    window = _attr(ins.attrs, "window") or "{}"
    spatial = [c for c in lhs_l if c.isdigit()]
    sizes = _ints(re.search(r"size=([\dx]+)", window).group(1)) if "size=" in window else []
    def window_field(key, default):
        m = re.search(key + r"=([\d_x]+)", window)
        if not m:
            return [default] * len(spatial)
        return [tuple(int(v) for v in p.split("_")) if "_" in p else int(p)
                for p in m.group(1).split("x")]
    pads, strides = window_field("pad", (0, 0)), window_field("stride", 1)
    lhs_dil, rhs_dil = window_field("lhs_dilate", 1), window_field("rhs_dilate", 1)
    valid = 1
    for k, d in enumerate(spatial):
        size_in = lhs_dims[lhs_l.index(d)]
        size_k = rhs_dims[rhs_l.index(d)] if not sizes else sizes[k]
        size_out = out_dims[out_l.index(d)]
        lo = pads[k][0]
        span = (size_in - 1) * lhs_dil[k]
        o = np.arange(size_out)[:, None] * strides[k]
        w = np.arange(size_k)[None, :] * rhs_dil[k]
        pos = o + w - lo
        valid *= int(np.sum((pos >= 0) & (pos <= span) & (pos % lhs_dil[k] == 0)))
    out_nonspatial = math.prod(n for c, n in zip(out_l, out_dims) if not c.isdigit())
    return 2.0 * out_nonspatial * rhs_dims[rhs_l.index("i")] * valid


def _dot_flops(ins: Instr, defs: dict) -> float:
    lhs = defs.get(ins.operands[0]) if ins.operands else None
    if lhs is None:
        return 0.0
    dims = shape_arrays(lhs.shape)[0][1]
    contract = math.prod(dims[i] for i in _ints(_attr(ins.attrs, "lhs_contracting_dims")))
    return 2.0 * shape_elements(ins.shape) * contract


# Splash attention's Pallas kernels (jax.experimental.pallas.ops.tpu.splash_attention), by the
# name XLA gives their custom call: matmuls of q [.., Nq, D] against Nk keys, 2 FLOPs per MAC.
# Forward: QK^T and PV (4 Nq Nk D). dq kernel: QK^T again, dO V^T, dS K (6). dkv kernel: QK^T,
# dO V^T, P^T dO, dS^T Q (8). Full (unmasked) attention: vidit's video tokens attend to all.
ATTENTION_KERNELS = {"splash_mha_fwd": 4, "splash_mha_dq": 6, "splash_mha_dkv": 8}


def _attention_kernel_flops(ins: Instr, defs: dict) -> float:
    factor = next((f for k, f in ATTENTION_KERNELS.items() if ins.name.startswith(k)), None)
    arrays = [shape_arrays(defs[n].shape)[0] for n in ins.operands
              if n in defs and shape_arrays(defs[n].shape)]
    qk = [dims for dtype, dims, _ in arrays if len(dims) >= 3 and dtype in ("bf16", "f32", "f16")]
    if factor is None or len(qk) < 2:
        return 0.0
    q, k = qk[0], qk[1]
    return factor * math.prod(q) * k[-2]


def replica_groups(attrs: str, num_devices: int) -> list[list[int]]:
    """The device groups of a collective, from any of XLA's three spellings: explicit
    {{0,1},{2,3}}, iota [G,S]<=[dims]T(perm), or mesh['a'=2,'b'=2] {'a'}."""
    m = re.search(r"replica_groups=(mesh\[[^\]]*\]\s*\{[^}]*\})", attrs)
    text = m.group(1) if m else _attr(attrs, "replica_groups")
    if text is None:
        pairs = _attr(attrs, "source_target_pairs")
        if pairs:
            return [list(p) for p in zip(*[iter(_ints(pairs))] * 2)]
        return [list(range(num_devices))]
    if text.startswith("mesh["):
        axes = re.findall(r"'([^']+)'=(\d+)", text)
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        chosen = re.findall(r"'([^']+)'", text[text.index("]"):])
        ids = np.arange(math.prod(sizes)).reshape(sizes)
        keep = [names.index(a) for a in chosen]
        order = [i for i in range(len(names)) if i not in keep] + keep
        group = math.prod(sizes[i] for i in keep)
        return ids.transpose(order).reshape(-1, group).tolist()
    if text.startswith("["):
        shape = _ints(text[:text.index("]")])
        m = re.search(r"<=\[([\d,]*)\](?:T\(([\d,]*)\))?", text)
        dims = _ints(m.group(1))
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(2):
            ids = ids.transpose(_ints(m.group(2)))
        return ids.reshape(shape).tolist()
    groups = [_ints(g) for g in re.findall(r"\{([\d,\s]*)\}", text[1:-1])]
    return [g for g in groups if g] or [list(range(num_devices))]


def _collective_bytes(kind: str, ins: Instr, defs: dict, group: int) -> float:
    if group <= 1:
        return 0.0
    operand = sum(shape_bytes(defs[n].shape) for n in ins.operands if n in defs)
    result = shape_bytes(ins.shape)
    arrays = shape_arrays(ins.shape)
    if ins.opcode == "all-gather-start" and arrays:  # returns (operand, result)
        dtype, dims, _ = arrays[-1]
        result = math.prod(dims) * DTYPE_BYTES[dtype]
    frac = (group - 1) / group
    if kind.startswith("all-gather"):
        return frac * result
    if kind.startswith("reduce-scatter"):
        return frac * operand
    if kind.startswith("all-reduce"):
        return 2 * frac * operand
    if kind.startswith("all-to-all"):
        return frac * operand
    return operand  # collective-permute: every byte goes to the neighbour


def analyze(text: str, device_slices: list[int] | None = None) -> HloCost:
    """Per-chip cost of one execution of a compiled HLO module (`compiled.as_text()`).
    device_slices[i] is the slice of device id i (multi-slice runs), for the ICI/DCN split."""
    comps, entry = parse_module(text)
    defs = {i.name: i for instrs in comps.values() for i in instrs}
    # Computations one step runs, how often, and which are fused (on-chip) or reducers.
    edges: dict[str, list[tuple[str, int]]] = defaultdict(list)
    fused, reducers, conditions = set(), set(), set()
    cost = HloCost()
    for caller, instrs in comps.items():
        for ins in instrs:
            if ins.opcode == "while":
                body = _attr(ins.attrs, "body").lstrip("%")
                cond = _attr(ins.attrs, "condition").lstrip("%")
                trips = _trip_count(comps, cond, ins, defs)
                cost.loops.append((body, trips, caller))
                edges[body].append((caller, trips if trips is not None else 1))
                edges[cond].append((caller, (trips or 0) + 1))
                conditions.add(cond)
                continue
            for key in ("calls", "to_apply", "branch_computations"):
                value = _attr(ins.attrs, key)
                for callee in _NAME.findall(value or "") or ([value] if value else []):
                    callee = callee.lstrip("%")
                    edges[callee].append((caller, 1))
                    if key == "to_apply":
                        reducers.add(callee)
                    elif ins.opcode == "fusion":
                        fused.add(callee)
    memo: dict[str, float] = {entry: 1.0}

    def mult(name: str, seen=()) -> float:
        if name not in memo:
            memo[name] = 0.0 if name in seen else sum(
                mult(c, seen + (name,)) * k for c, k in edges.get(name, []))
        return memo[name]

    num_devices = len(device_slices) if device_slices else 1
    for name, instrs in comps.items():
        m = mult(name)
        if m == 0 or name in reducers or name in conditions:
            continue
        for ins in instrs:
            op = ins.opcode
            if op == "convolution":
                cost.flops += m * _conv_flops(ins, defs)
            elif op == "dot":
                cost.flops += m * _dot_flops(ins, defs)
            elif op in ELEMENTWISE:
                cost.flops += m * shape_elements(ins.shape)
            elif op in TRANSCENDENTAL:
                cost.transcendentals += m * shape_elements(ins.shape)
            elif op in ("reduce", "reduce-window") and ins.operands:
                first = defs.get(ins.operands[0])
                cost.flops += m * (shape_elements(first.shape) if first else 0)
            elif op == "custom-call" and "tpu_custom_call" in ins.attrs:
                kernel = _attention_kernel_flops(ins, defs)
                if kernel:
                    cost.flops += m * kernel
                else:
                    cost.custom_calls += int(m)
            kind = next((k for k in COLLECTIVES if op in (k, k + "-start")), None)
            if kind:
                groups = replica_groups(ins.attrs, num_devices)
                size = 2 if kind == "collective-permute" else len(groups[0])
                sent = m * _collective_bytes(kind, ins, defs, size)
                cost.collective_bytes[kind] += sent
                crosses = device_slices is not None and any(
                    len({device_slices[d] for d in g if d < len(device_slices)}) > 1
                    for g in groups)
                if crosses:
                    cost.dcn_bytes += sent
                else:
                    cost.ici_bytes += sent
            if name not in fused and op not in FREE and not op.endswith("-done"):
                cost.hbm_bytes += m * _hbm_bytes(ins, comps, defs)
    return cost


def _hbm_bytes(ins: Instr, comps: dict, defs: dict) -> float:
    """Bytes a top-level instruction reads and writes. Slices read only what they take and
    in-place updates write only the update, also inside (nested) fusions: a scanned layer reads
    its weights out of the stacked array and writes its activations into one."""
    def size(n):
        return shape_bytes(defs[n].shape) if n in defs else 0.0
    if ins.opcode == "dynamic-slice":
        return 2 * shape_bytes(ins.shape)
    if ins.opcode == "dynamic-update-slice":
        return 2 * size(ins.operands[1])
    body = _callee(ins, comps)
    if body is None:
        return shape_bytes(ins.shape) + sum(size(n) for n in ins.operands)
    written, in_place = _written(body, comps, defs)
    read = sum(size(n) if i in in_place else _param_read(body, i, comps, defs, size(n))
               for i, n in enumerate(ins.operands))
    return read - sum(size(ins.operands[i]) for i in in_place
                      if i < len(ins.operands)) + written


def _callee(ins: Instr, comps: dict) -> list | None:
    name = _attr(ins.attrs, "calls") if ins.opcode == "fusion" else None
    return comps.get(name.lstrip("%")) if name else None


def _param_read(body: list, index: int, comps: dict, defs: dict, full: float) -> float:
    """Bytes a fused computation reads of its parameter `index`: what its slices take when every
    use is a slice (through bitcasts and nested fusions), else all of it."""
    param = next((i for i in body if i.opcode == "parameter" and i.args.strip() == str(index)),
                 None)
    if param is None:
        return full
    users = defaultdict(list)
    for inner in body:
        for n in inner.operands:
            users[n].append(inner)

    def reads(name: str, depth: int = 0) -> float:
        total = 0.0
        for u in users.get(name, []):
            if u.opcode in ("dynamic-slice", "slice") and u.operands[0] == name:
                total += shape_bytes(u.shape)
            elif u.opcode == "bitcast" and depth < 8:
                total += reads(u.name, depth + 1)
            elif u.opcode == "fusion" and _callee(u, comps):
                total += sum(_param_read(_callee(u, comps), k, comps, defs, full)
                             for k, n in enumerate(u.operands) if n == name)
            elif u.opcode == "dynamic-update-slice" and u.operands[0] == name:
                continue  # the buffer updated in place: not read
            else:
                return full
        return total

    return min(reads(param.name), full)


def _written(body: list, comps: dict, defs: dict) -> tuple[float, set]:
    """(bytes a fused computation writes, indices of parameters it updates in place)."""
    by_name = {i.name: i for i in body}
    params = {i.name: int(i.args) for i in body if i.opcode == "parameter"}
    in_place = set()

    def out(ins) -> float:
        if ins is None:
            return 0.0
        if ins.opcode == "tuple":
            return sum(out(by_name.get(n)) for n in ins.operands)
        if ins.opcode == "bitcast":
            return out(by_name.get(ins.operands[0])) if ins.operands else 0.0
        if ins.opcode == "dynamic-update-slice":
            buffer = ins.operands[0]
            while buffer in by_name and by_name[buffer].opcode == "bitcast":
                buffer = by_name[buffer].operands[0]
            if buffer in params:
                in_place.add(params[buffer])
                return shape_bytes(by_name[ins.operands[1]].shape) if ins.operands[1] in by_name \
                    else shape_bytes(ins.shape)
        return shape_bytes(ins.shape)

    root = next((i for i in body if i.root), body[-1])
    return out(root), in_place
