"""What the ReSET rule adds to a decode step, counted in XLA's compiled HLO on CPU.

The decode loop (``reset_jax.decode``) runs, once per token inside a
``lax.while_loop``: ``sampling.step`` -> ``jax.random.fold_in`` ->
``sampling.sample(top_p, top_k)`` -> ``sampling.observe``. Both rules measure
the token entropy (the loop records it), so everything that reads the
``[B, V]`` logits is shared; what ReSET adds is per-row bookkeeping on ``[B]``
numbers. On a GPU every separate kernel costs a launch (2-4 us even inside a
CUDA graph), so the test pins the structure, not a timing:

- ReSET adds no op that touches a ``V``-element array, no reduction, no sort
  and no scatter (in the compiled program and in the lowered one);
- inside the loop body ReSET adds at most ``_MAX_EXTRA_KERNELS`` kernels
  (fusions and copies) over the fixed temperature. Measured with jax 0.10.2:
  5 at B = 1 and B = 8 (the rule's ``[B]`` arithmetic and the temperature, the
  float view of the ring, the one packed state's update and its one loop-carry
  copy, net of the fixed rule's two); 6 while the state was a float32 and an
  int32 array and a flag, 25 when every state field was its own array and
  membership tests and the window sum were reductions.

Counted: instructions of the computations that run every iteration (the entry
and, through ``while``/``conditional``/``call``, the computations they run;
fusion bodies and reducers are looked into, not counted), excluding
bookkeeping opcodes (parameters, constants, tuples, bitcasts, control flow).
The HLO text format these regexes read has been stable across XLA releases.
"""

from __future__ import annotations

import collections
import math
import re

import jax
import jax.numpy as jnp
import pytest

from reset_jax import sampling as S

V = 151_936  # Qwen3's vocabulary
_MAX_EXTRA_KERNELS = 7  # 5 measured with jax 0.10.2; see the module docstring

_NOT_KERNELS = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "while",
    "conditional",
    "call",
    "after-all",
    "opt-barrier",
}
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_ARRAY = re.compile(r"\b(?:pred|[suf]\d+|bf16|f8\w*|c\d+)\[([\d,]*)\]")


def _split_shape(rest: str) -> tuple[str, str]:
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    shape, _, tail = rest.partition(" ")
    return shape, tail


def _parse(text: str):
    """Computations of an HLO module: name -> [(name, shape, opcode, operands, attrs)]."""
    comps: dict[str, list] = {}
    entry = cur = None
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m and not line[:1].isspace():
            cur = m.group(2)
            comps[cur] = []
            entry = cur if m.group(1) else entry
            continue
        if line.strip() == "}":
            cur = None
            continue
        m = re.match(r"^\s+(?:ROOT )?%?([\w.\-]+) = (.*)$", line)
        if cur is None or not m:
            continue
        shape, rest = _split_shape(m.group(2))
        op = re.match(r"([a-z][\w\-]*)\((.*)$", rest)
        if not op:
            continue
        depth, args = 1, op.group(2)
        for i, ch in enumerate(args):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                operands, attrs = args[:i], args[i + 1 :]
                break
        else:
            operands, attrs = args, ""
        comps[cur].append(
            (m.group(1), shape, op.group(1), re.findall(r"%?([\w.\-]+)", operands), attrs)
        )
    return comps, entry


def _called(attrs: str, keys: tuple[str, ...]) -> list[str]:
    out = []
    for key in keys:
        for m in re.finditer(rf"\b{key}=(\{{[^}}]*\}}|%?[\w.\-]+)", attrs):
            out += re.findall(r"%?([\w.\-]+)", m.group(1))
    return out


_CONTROL = ("body", "condition", "branch_computations", "true_computation", "false_computation")


def _elements(shape: str) -> list[int]:
    return [math.prod(int(d) for d in m.group(1).split(",") if d) for m in _ARRAY.finditer(shape)]


def _inner_ops(comps, names) -> collections.Counter:
    ops = collections.Counter()
    for name in names:
        for _, _, op, _, attrs in comps.get(name, []):
            ops[op] += 1
            if op == "fusion":
                ops += _inner_ops(comps, _called(attrs, ("calls",)))
    return ops


def _count(comps, roots) -> collections.Counter:
    """Kernels of ``roots`` and the control flow they run, by category."""
    seen, todo, out = set(), list(roots), collections.Counter()
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        shapes = {ins[0]: ins[1] for ins in comps[name]}
        for _, shape, op, operands, attrs in comps[name]:
            if op in ("while", "conditional"):
                todo += _called(attrs, _CONTROL)
            if op == "call":
                todo += _called(attrs, ("to_apply",))
            if op in _NOT_KERNELS:
                continue
            inner = _inner_ops(comps, _called(attrs, ("calls",))) if op == "fusion" else {op: 1}
            sizes = _elements(shape) + [n for o in operands for n in _elements(shapes.get(o, ""))]
            out["kernels"] += 1
            out["touch_V"] += max(sizes, default=0) >= V
            out["reductions"] += bool(inner.get("reduce", 0) + inner.get("reduce-window", 0))
            out["sorts"] += bool(inner.get("sort", 0))
            out["scatters"] += bool(inner.get("scatter", 0))
    return out


def _decode_like(rule, b: int):
    """The decode loop's per-token sampler calls (``decode._advance``) in a while loop."""

    def run(rule, logits, key, top_p, top_k):
        def body(carry):
            i, state, tokens = carry
            z = jax.lax.dynamic_index_in_dim(logits, i, keepdims=False)  # fresh logits per step
            state, temperature, entropy = S.step(rule, state, z)
            token = S.sample(jax.random.fold_in(key, i), z, temperature, top_p=top_p, top_k=top_k)
            state = S.observe(rule, state, token)
            return i + 1, state, tokens + token + (temperature + entropy).astype(jnp.int32)

        init = (0, S.init_state(rule, b), jnp.zeros((b,), jnp.int32))
        return jax.lax.while_loop(lambda c: c[0] < logits.shape[0], body, init)

    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        sharding = jax.sharding.SingleDeviceSharding(cpu)
        args = (
            rule,
            jax.ShapeDtypeStruct((4, b, V), jnp.float32, sharding=sharding),
            jax.random.key(0),
            jnp.full((b,), 0.95, jnp.float32),
            jnp.zeros((b,), jnp.int32),
        )
        lowered = jax.jit(run).lower(*args)
        return lowered.as_text(), lowered.compile().as_text()


def _rules():
    return {
        "fixed": S.FixedTemperature.create(0.6),
        "reset": S.ReSETConfig.create(
            t_high=1.0, t_low=0.1, tau0=0.55, nl_ids=[198], dnl_ids=[271, 382]
        ),
    }


@pytest.mark.parametrize("b", [1, 8])
def test_reset_adds_no_pass_over_the_logits_and_few_kernels(b):
    counts, body_kernels, lowered_v = {}, {}, {}
    for name, rule in _rules().items():
        lowered, compiled = _decode_like(rule, b)
        # Lowered StableHLO: ops with a V-sized operand or result (one op a line).
        lowered_v[name] = sum(f"x{V}x" in line or f"<{V}x" in line for line in lowered.splitlines())
        comps, entry = _parse(compiled)
        counts[name] = _count(comps, [entry])
        loops = [ins for ins in comps[entry] if ins[2] == "while"]
        bodies = [_called(loop[4], ("body",))[0] for loop in loops]
        # The decode loop is the while whose body reads the [4, B, V] logits.
        (body,) = [c for c in bodies if any(f"[4,{b},{V}]" in ins[1] for ins in comps[c])]
        body_kernels[name] = sum(ins[2] not in _NOT_KERNELS for ins in comps[body])
    fixed, reset = counts["fixed"], counts["reset"]
    report = f"B={b} fixed {dict(fixed)} reset {dict(reset)} loop body {body_kernels}"
    assert fixed["touch_V"] > 5, report  # the parser did find the logits passes
    assert reset["touch_V"] <= fixed["touch_V"], report
    assert lowered_v["reset"] <= lowered_v["fixed"], f"{report} lowered {lowered_v}"
    assert reset["reductions"] <= fixed["reductions"], report
    assert reset["sorts"] <= fixed["sorts"], report
    assert reset["scatters"] <= fixed["scatters"], report
    extra = body_kernels["reset"] - body_kernels["fixed"]
    assert extra <= _MAX_EXTRA_KERNELS, report
