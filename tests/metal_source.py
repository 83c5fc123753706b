"""The Metal kernels' sources as mx.fast.metal_kernel compiles them, checked by clang on a machine without Metal.

MLX builds a custom Metal kernel's source from what it is given and how it is called (MLX's
mlx/backend/common/metal_kernel.cpp, ``write_signature`` and ``metal_kernel``): the header; a ``template <...>``
line for the template arguments; ``[[kernel]] void NAME(`` with one ``[[buffer(i)]]`` argument an input (``const
device T*``, or ``const constant T*`` for an input of fewer than 8 elements, ``const constant T&`` for a scalar) and
an output (``device T*``), then one argument per Metal attribute (``uint3 thread_position_in_threadgroup
[[thread_position_in_threadgroup]]``, ...) that the source (not the header) names; the source; and an explicit
instantiation named after the template arguments and the arrays' dtypes. ``metal_source`` writes the same text.

``recorded_launches`` captures what zaya_mlx's launchers pass mx.fast.metal_kernel and each kernel call (the
arrays' dtypes and sizes, the template arguments), without a GPU. ``check`` compiles a source with clang against
tests/metal_stdlib/metal_stdlib, our declaration of what Metal provides, and rejects what clang accepts but Metal
does not: a C-style cast between address spaces. What this proves and what it cannot: README, "The Metal kernels'
source check".
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import typing
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx

from zaya_mlx import kernels
from zaya_mlx.decode import DecodeOptions
from zaya_mlx.kernels import _build, attention

CLANG = shutil.which("clang++") or shutil.which("clang")
MOCK_INCLUDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metal_stdlib")

# MLX: inputs with fewer elements are passed in the constant address space
MAX_CONSTANT_ARRAY_SIZE = 8

# MLX adds an argument for each of these that the kernel's source names, in this order (name, type)
ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"), ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"), ("grid_origin", "uint3"), ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"), ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"), ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"), ("thread_index_in_quadgroup", "uint"), ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"), ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"), ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"), ("threads_per_grid", "uint3"), ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]

TYPE_NAMES = {mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.bool_: "bool",
              mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t", mx.int64: "int64_t", mx.uint8: "uint8_t",
              mx.uint16: "uint16_t", mx.uint32: "uint32_t", mx.uint64: "uint64_t"}


class Argument(typing.NamedTuple):
    dtype: mx.Dtype
    size: int
    ndim: int


class Launch(typing.NamedTuple):
    """One call of a custom Metal kernel: what mx.fast.metal_kernel was given, and what the call passed."""
    name: str
    input_names: tuple
    output_names: tuple
    source: str
    header: str
    inputs: tuple  # Argument for each input
    output_dtypes: tuple
    template: tuple  # (name, int, bool or mx.Dtype) pairs

    def key(self) -> str:
        """MLX's name for the compiled variant (one source each)."""
        name = "custom_kernel_" + self.name
        if self.template:
            name += "_" + _template_hash(_template_text(self.template))
        for a in self.inputs:
            name += "_" + TYPE_NAMES[a.dtype] + ("s" if a.ndim == 0 else "c" if a.size < MAX_CONSTANT_ARRAY_SIZE else "")
        return name + "".join("_" + TYPE_NAMES[d] for d in self.output_dtypes)


def _template_text(template) -> str:
    def value(v):
        if isinstance(v, mx.Dtype):
            return TYPE_NAMES[v]
        return str(int(v))  # MLX streams a bool as 1 or 0
    return "<" + ", ".join(value(v) for _, v in template) + ">"


def _template_hash(text: str) -> str:
    return text.replace(", ", "_").replace("<", "_").replace(">", "_")[:-1]


def metal_source(launch: Launch, attributes=ATTRIBUTES) -> str:
    """The text MLX compiles for a launch (after its own header, which tests/metal_stdlib stands for)."""
    name = launch.key()
    out = launch.header
    if launch.template:
        kinds = ["typename" if isinstance(v, mx.Dtype) else "bool" if isinstance(v, bool) else "int"
                 for _, v in launch.template]
        out += "template <" + ", ".join(f"{k} {n}" for k, (n, _) in zip(kinds, launch.template)) + ">\n"
    args = []
    for n, a in zip(launch.input_names, launch.inputs):
        space = "constant" if a.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        args.append(f"  const {space} {TYPE_NAMES[a.dtype]}{'&' if a.ndim == 0 else '*'} {n} [[buffer({len(args)})]]")
        if a.ndim > 0:
            for suffix, t in (("_shape", "const constant int*"), ("_strides", "const constant int64_t*"),
                              ("_ndim", "const constant int&")):
                if n + suffix in launch.source:
                    args.append(f"  {t} {n}{suffix} [[buffer({len(args)})]]")
    for n, d in zip(launch.output_names, launch.output_dtypes):
        args.append(f"  device {TYPE_NAMES[d]}* {n} [[buffer({len(args)})]]")
    args += [f"  {t} {a} [[{a}]]" for a, t in attributes if a in launch.source]
    out += f"[[kernel]] void {name}(\n" + ",\n".join(args) + ") {\n" + launch.source + "\n}\n"
    if launch.template:
        instance = name + _template_text(launch.template)
        out += f'\ntemplate [[host_name("{name}")]] [[kernel]] decltype({instance}) {instance};\n'
    return out


@contextlib.contextmanager
def recorded_launches():
    """Inside, the kernel launchers run for Metal (whatever the machine) and each mx.fast.metal_kernel call is
    recorded into the yielded list instead of run: its outputs are zeros. Not under mx.compile."""
    launches = []

    def metal_kernel(name, input_names, output_names, source, header="", **_):
        def call(*, inputs, output_shapes, output_dtypes, template=(), **_):
            launches.append(Launch(name, tuple(input_names), tuple(output_names), source, header,
                                   tuple(Argument(a.dtype, a.size, a.ndim) for a in inputs), tuple(output_dtypes),
                                   tuple(template)))
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
        return call

    saved = mx.fast.metal_kernel
    _build.get_kernel.cache_clear()
    mx.fast.metal_kernel = metal_kernel
    try:
        with kernels.kernels_from(None, "metal"):
            yield launches
    finally:
        mx.fast.metal_kernel = saved
        _build.get_kernel.cache_clear()


_CONVERSION = re.compile(r"CStyleCastExpr .*<AddressSpaceConversion>")
_THREADGROUP_DECLARATION = re.compile(r"((?:^|[;{}])\s*)(__attribute__\(\(address_space\(3\)\)\))", re.M)
_INSTANTIATION_ATTRIBUTES = re.compile(r'^template \[\[host_name\("\w+"\)\]\] \[\[kernel\]\] ', re.M)


def check(source: str, folder: str) -> tuple[bool, str]:
    """Compile one kernel's source as Metal would see it: (ok, clang's errors or the casts it rejects).

    Two steps, because clang and Metal differ in three places: clang forbids an automatic variable in an address
    space, which Metal allows for threadgroup memory in a kernel, so after preprocessing each declaration that
    starts with the threadgroup address space becomes static; clang takes no attributes in an explicit
    instantiation, so MLX's ``template [[host_name(...)]] [[kernel]]`` loses them; and clang allows a C-style cast
    between address spaces, which Metal does not, so every such cast in clang's syntax tree is an error here."""
    path = os.path.join(folder, "kernel.metal.cpp")
    with open(path, "w") as f:
        f.write(source)
    flags = ["--target=aarch64-linux-gnu", "-std=c++17", "-I", MOCK_INCLUDE, "-Wno-unknown-attributes", "-ferror-limit=5"]
    pre = subprocess.run([CLANG, "-x", "c++", *flags, "-E", "-P", path], capture_output=True, text=True)
    if pre.returncode != 0:
        return False, pre.stderr
    with open(path, "w") as f:
        f.write(_INSTANTIATION_ATTRIBUTES.sub("template ", _THREADGROUP_DECLARATION.sub(r"\1static \2", pre.stdout)))
    r = subprocess.run([CLANG, "-x", "c++", *flags, "-fsyntax-only", "-Xclang", "-ast-dump", "-fno-color-diagnostics",
                        path], capture_output=True, text=True)
    if r.returncode != 0:
        return False, _source_lines(r.stderr, path)
    casts = [line.strip(" |`-") for line in r.stdout.splitlines() if _CONVERSION.search(line)]
    if casts:
        return False, "a cast between address spaces (Metal has none):\n" + "\n".join(casts[:5])
    return True, ""


def _source_lines(errors: str, path: str) -> str:
    return errors.replace(path, "kernel")


def check_all(launches: typing.Iterable[Launch], attributes=ATTRIBUTES) -> list[tuple[str, str]]:
    """(variant, errors) for each distinct variant that does not compile."""
    sources = {}
    for launch in launches:
        sources.setdefault(launch.key(), metal_source(launch, attributes))

    def one(item):
        with tempfile.TemporaryDirectory() as folder:
            return item[0], check(item[1], folder)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return [(key, errors) for key, (ok, errors) in pool.map(one, sources.items()) if not ok]


class Step(typing.NamedTuple):
    """A fused decode step of the small test model, as a Mac would run it."""
    quant: str | None  # a built-in recipe (quantize/*.json) or None: dense
    dtype: mx.Dtype
    router: str  # "apart": the small model's router, in its own kernel; "inside": ZAYA's 256-wide one, inside the
                 # expert kernel; "mxfp4": quantized, through its plain ops
    cca_inside: bool = True  # the CCA step inside attention's launch, or in its own (shapes that launch lacks)
    split: bool = False  # attention over a buffer in chunks, then a combine launch (long contexts)
    full: bool = False  # ZAYA1-8B's widths and vocabulary (two layers, weights never computed), not the small model's
    grouped: bool = False  # the experts grouped by expert (DecodeOptions.group_experts_from=1), the router apart
    kv_bits: int = 0  # a quantized KV cache's bits, or 0


def _lazy_zaya(step: Step):
    """ZAYA1-8B's shapes in two layers, its weights in the step's format but never evaluated: the launches are only
    recorded, so nothing is computed or allocated."""
    from mlx.utils import tree_map_with_path

    from zaya_mlx.benchmark import full_config, quantize_as_recipe
    from zaya_mlx.model import Model

    model = Model(full_config(num_hidden_layers=2, layer_types=["hybrid"] * 2))
    model.update(tree_map_with_path(
        lambda k, v: v if "balancing_biases" in k or not mx.issubdtype(v.dtype, mx.floating) else v.astype(step.dtype),
        model.parameters()))
    quantize_as_recipe(model, step.quant, lazy=True)
    return model


def step_launches(step: Step) -> list[Launch]:
    """The Metal launches of two decode steps of the small model (after a prompt through the plain ops), or of
    ZAYA1-8B's shapes (from an empty cache)."""
    import dataclasses

    import mlx.nn as nn

    from zaya_mlx.benchmark import build_zaya, small_config

    cfg = small_config()
    if step.router == "inside":
        cfg = dataclasses.replace(cfg, router_hidden_size=256)
    model = _lazy_zaya(step) if step.full else build_zaya(cfg, step.quant, seed=0, dtype=step.dtype)
    if step.router == "mxfp4":
        nn.quantize(model, group_size=32, bits=4, mode="mxfp4",
                    class_predicate=lambda path, m: ".router_mlp.fc" in path and isinstance(m, nn.Linear))
    cache = model.make_cache(kv_bits=step.kv_bits or None)
    real_supported, real_single = attention.cca_kernel_supported, attention.SINGLE_PASS_MAX
    try:
        model.decode_options = DecodeOptions(fused=False, compile=False)
        if not step.full:
            model.decode_options = DecodeOptions(fused=False)
            mx.eval(model(mx.array([[3, 1, 4, 1, 5]], dtype=mx.int32), cache))
        model.decode_options = DecodeOptions(fused=True, compile=False, group_experts_from=1 if step.grouped else None)
        if not step.cca_inside:
            attention.cca_kernel_supported = lambda *a, **k: False
        if step.split:
            attention.SINGLE_PASS_MAX = 0
        with recorded_launches() as launches:
            for _ in range(2):
                model(mx.array([[9]], dtype=mx.int32), cache)
    finally:
        attention.cca_kernel_supported, attention.SINGLE_PASS_MAX = real_supported, real_single
    return launches
