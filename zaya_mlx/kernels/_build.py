"""Assemble the GPU kernels from metal/: a prelude for the back end, the shared helpers, one body.

Each kernel body in metal/ (``*.h``) is written once in the subset of C++ that Metal and CUDA share;
``prelude.metal`` and ``prelude.cu`` map its few back-end names. This module glues them into an
``mx.fast.metal_kernel`` or ``mx.fast.cuda_kernel`` (built once per body and back end, then cached; MLX
itself caches one compiled variant per template instantiation) and says which back end a call runs on.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import struct
import zlib
from importlib import resources
from pathlib import Path

import mlx.core as mx

_MARKER = "// ---- body prologue ----"


def backend() -> str:
    """'metal', 'cuda' or 'cpu': where the next op on the default device runs."""
    if mx.default_device().type != mx.gpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return "cpu"


@functools.cache
def _source(name: str) -> str:
    try:
        return resources.files("zaya_mlx.metal").joinpath(name).read_text()
    except (ModuleNotFoundError, FileNotFoundError):  # a plain checkout on PYTHONPATH, not installed
        return (Path(__file__).resolve().parents[2] / "metal" / name).read_text()


def _prelude(back: str) -> tuple[str, str]:
    text = _source("prelude.metal" if back == "metal" else "prelude.cu")
    header, prologue = text.split(_MARKER)
    return header, prologue


def declarations(absent: tuple[str, ...] = (), views: tuple[tuple[str, int], ...] = (),
                 inplace: tuple[str, ...] = ()) -> str:
    """The body's arguments that are not the kernel's own: null pointers for those a variant does not take
    (ZK_ABSENT), float32 pointers into the packed input zk_pack (ZK_VIEW), and outputs written into an input's
    buffer (ZK_INPLACE: output name from the input zk_into_<name>). See launch."""
    return ("".join(f"ZK_ABSENT({name})\n" for name in absent)
            + "".join(f"ZK_VIEW({name}, zk_pack, {offset})\n" for name, offset in views)
            + "".join(f"ZK_INPLACE({name}, {INPLACE_PREFIX}{name})\n" for name in inplace))


INPLACE_PREFIX = "zk_into_"


def kernel_source(body: str, back: str, absent: tuple[str, ...] = (), views: tuple[tuple[str, int], ...] = (),
                  inplace: tuple[str, ...] = ()) -> tuple[str, str]:
    """(header, source) for a body file on a back end: what mx.fast.*_kernel receives, as short as it can be.

    MLX-CUDA hashes a custom kernel's whole source at every launch (its compiled-module cache is keyed by name and
    source hash): with every helper and comment in it, ~25 KB a kernel and over a quarter of a decode step's host
    time. So the text goes without comments or indentation, the header holds only the helpers the body reaches, and on CUDA, where NVRTC reads includes from disk, the header and the body
    each go as an include of a saved file (MLX-CUDA does not look into the body: no body names an input's
    ``_shape``, ``_strides`` or ``_ndim``, which it would have to see). absent, views, inplace: see launch."""
    header, prologue = _prelude(back)
    source = compact(prologue + "\n" + declarations(absent, views, inplace) + _source(body))
    header = helpers(source, header)
    if back == "cuda":
        return included(header), included(source)
    return header, source


def included(text: str) -> str:
    """An include line for the text saved as a file (``saved_file``), or the text itself where it cannot be saved;
    either ends in a line break: MLX-CUDA writes its own code right after the header, on the same line."""
    path = saved_file(text)
    return (text if path is None else f'#include "{path}"') + "\n"


def saved_file(text: str) -> str | None:
    """C++ text saved once under a name made of its checksum, so a changed text is another file (and another
    include line, so MLX-CUDA's caches, keyed by the source, see the change); None where it cannot be saved."""
    cache = os.path.abspath(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"))
    folder = os.path.join(cache, "zaya-mlx", "kernels")
    path = os.path.join(folder, hashlib.sha256(text.encode()).hexdigest()[:24] + ".cuh")
    if '"' in path or "\n" in path:  # it could not stand in an include line
        return None
    try:
        with open(path) as f:
            if f.read() == text:
                return path
    except OSError:
        pass
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        return None
    return path


_COMMENT_OR_STRING = re.compile(r'"(?:\\.|[^"\\\n])*"|/\*.*?\*/|//[^\n]*', re.S)
_HELPER_NAME = re.compile(r"\bzk_\w+")


def compact(text: str) -> str:
    """C++ text without comments, indentation or blank lines (string literals and line structure kept, so
    preprocessor lines and their continuations stay as they were)."""
    text = _COMMENT_OR_STRING.sub(lambda m: m.group(0) if m.group(0).startswith('"') else " ", text)
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def _definitions(text: str) -> list[tuple[str | None, str]]:
    """Compacted C++ text cut into its top-level pieces, each with the zk_ name it defines (the last zk_ name
    before its first parenthesis or brace) or None (a preprocessor line, a using declaration: always kept)."""
    pieces, lines, depth = [], [], 0
    for line in text.splitlines():
        lines.append(line)
        depth += line.count("{") - line.count("}")
        if depth == 0 and not line.endswith("\\") and (line.endswith(("}", ";")) or lines[0].startswith("#")):
            piece = "\n".join(lines)
            names = [] if piece.startswith("#") else _HELPER_NAME.findall(re.split(r"[({]", piece, maxsplit=1)[0])
            pieces.append((names[-1] if names else None, piece))
            lines = []
    if lines:
        pieces.append((None, "\n".join(lines)))
    return pieces


def helpers(used: str, prelude: str = "") -> str:
    """The prelude's header and common.h, compacted, with only the definitions that ``used`` (a kernel's source)
    reaches, directly or through other definitions; pieces that define no zk_ name are all kept."""
    pieces = _definitions(compact(prelude + "\n" + _source("common.h")))
    by_name = {}
    for name, piece in pieces:
        by_name.setdefault(name, []).append(piece)
    wanted = set(_HELPER_NAME.findall("\n".join([used, *by_name.get(None, [])])))
    todo = list(wanted)
    while todo:
        for piece in by_name.get(todo.pop(), ()):
            new = set(_HELPER_NAME.findall(piece)) - wanted
            wanted |= new
            todo.extend(new)
    return "\n".join(piece for name, piece in pieces if name is None or name in wanted)


@functools.cache
def get_kernel(body: str, back: str, inputs: tuple[str, ...], outputs: tuple[str, ...], absent: tuple[str, ...] = (),
               views: tuple[tuple[str, int], ...] = (), inplace: tuple[str, ...] = ()):
    """The MLX custom kernel for ``body`` (a file in metal/) on ``back`` ('metal' or 'cuda'), keyed by dtypes."""
    header, source = kernel_source(body, back, absent, views, inplace)
    name = kernel_name(body, header, source)
    if back == "metal":
        kernel = mx.fast.metal_kernel(
            name=name, input_names=list(inputs), output_names=list(outputs), source=source, header=header
        )
    elif back == "cuda":
        kernel = mx.fast.cuda_kernel(
            name=name, input_names=list(inputs), output_names=list(outputs), source=source, header=header
        )
    else:
        raise ValueError(f"no GPU kernels for back end {back!r}")
    return functools.partial(_call_keyed_by_dtypes, kernel)


def launch(body: str, back: str, inputs: list, outputs: list, *, pack: tuple[str, ...] = (), **kwargs) -> list:
    """Run a kernel body with only the arguments this call uses.

    Every argument costs host time each step (on MLX-CUDA ~0.6 us an input and ~4 us an output to build and encode
    a node; docs/PERFORMANCE.md), and batch 1 is bound by the host, so a call passes as few arrays as it can.
    inputs: (name, array or None) pairs; outputs: (name, shape or None or array, dtype) triples, in the body's order.
    A None leaves that argument out: the body sees a null pointer (ZK_ABSENT), which its template arguments must keep
    it from touching. An array in place of a shape is written in place (ZK_INPLACE): it travels as one more input,
    and comes back as that output, at ~4 us less a step than a new output; the caller must own it (no other array
    may share its memory) and see that the launches which read and write it are ordered by the arrays they take
    (MLX orders them by nothing else). pack: names of inputs that are weights (the same arrays every call) which the
    body reads one scalar at a time through static_cast<float>: they travel as one float32 input
    (``packed``), and the body sees each as a float32 pointer into it (ZK_VIEW); a name the call does not pass is
    skipped.
    kwargs: the rest of the MLX kernel call (template, grid, threadgroup, init_value). Returns the outputs in
    order, None where left out."""
    views = ()
    named = dict(inputs)
    pack = tuple(n for n in pack if named.get(n) is not None)
    if pack:
        arrays = [named[n] for n in pack]
        offsets = [0]
        for a in arrays[:-1]:
            offsets.append(offsets[-1] + a.size)
        views = tuple(zip(pack, offsets))
        inputs = [(n, a) for n, a in inputs if n not in pack] + [("zk_pack", packed(tuple(arrays)))]
    into = [(n, a) for n, a, _ in outputs if isinstance(a, mx.array)]
    for n, a, d in outputs:
        if isinstance(a, mx.array) and a.dtype != d:
            raise ValueError(f"{body}: {n} is {d}, not the {a.dtype} of the array it would be written into")
    new = [(n, s, d) for n, s, d in outputs if s is not None and not isinstance(s, mx.array)]
    inputs = inputs + [(INPLACE_PREFIX + n, a) for n, a in into]
    absent = tuple(n for n, a in inputs if a is None) + tuple(n for n, s, _ in outputs if s is None)
    kern = get_kernel(body, back, tuple(n for n, a in inputs if a is not None), tuple(n for n, _, _ in new), absent,
                      views, tuple(n for n, _ in into))
    made = dict(into)
    made.update(zip([n for n, _, _ in new], kern(inputs=[a for _, a in inputs if a is not None],
                                                  output_shapes=[s for _, s, _ in new],
                                                  output_dtypes=[d for _, _, d in new], **kwargs)))
    return [made.get(n) for n, _, _ in outputs]


def packed(arrays: tuple) -> mx.array:
    """The arrays flattened into one evaluated float32 array, end to end, so a step has one input where it had many.

    A compiled step (the decoder's default) closes over the weights as constants and builds their pack once, when
    it is traced; an uncompiled call packs them again each time."""
    pack = mx.concatenate([a.reshape(-1).astype(mx.float32) for a in arrays])
    mx.eval(pack)
    return pack


def kernel_name(body: str, header: str, source: str) -> str:
    """The name MLX gets for a body: its file's stem and a checksum of the source it compiles.

    MLX caches a compiled variant by the kernel's name and template arguments for the process (MLX-CUDA keeps no
    custom kernel in its on-disk cache: each process compiles the variants it launches). Without the checksum, a
    kernel edited since would run the old compiled code, and so would the emptied bodies timed for the host's floor
    (dev/lab.py)."""
    return f"zaya_{body.split('.')[0]}_{zlib.crc32((header + source).encode()):08x}"


def _call_keyed_by_dtypes(kernel, *, inputs, template, output_dtypes, **kwargs):
    """Call an MLX custom kernel with one more template argument, ZK_DTYPES, naming its arguments' dtypes.

    MLX-CUDA names a compiled variant by the kernel's name and template arguments alone, and reuses the first
    variant compiled under a name (kept for the process), while the generated
    source types each buffer by its array's dtype. A call whose inputs differ in dtype but not in template
    arguments (float32 residual scales with bfloat16 activations, say) would run code that reads its buffers
    as the wrong types, and return wrong numbers without an error. Metal names variants by dtype already."""
    in_dtypes = tuple([a.dtype for a in inputs])  # from a list: ~0.5 us less a call than from a generator
    key = dtype_key(in_dtypes, tuple(output_dtypes))
    return kernel(inputs=inputs, template=[*template, ("ZK_DTYPES", key)], output_dtypes=output_dtypes, **kwargs)


@functools.lru_cache(maxsize=256)
def dtype_key(input_dtypes: tuple, output_dtypes: tuple) -> int:
    """A stable, non-negative 31-bit number for a kernel call's input and output dtypes (the same in every
    process, unlike hash())."""
    text = ",".join(str(d) for d in input_dtypes) + "->" + ",".join(str(d) for d in output_dtypes)
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def use_kernel(impl: str, back: str, supported, what: str) -> bool:
    """Whether an op runs its kernel rather than its reference. impl 'auto' or 'kernel': on a Metal or CUDA
    GPU where ``supported()`` says the kernel covers the call ('kernel' raises, naming ``what``, where it
    cannot); 'reference': never."""
    if impl in ("auto", "kernel") and back != "cpu" and supported():
        return True
    if impl == "kernel":
        raise RuntimeError(f"{what} cannot run here (back end {back!r})")
    return False


@functools.lru_cache(maxsize=256)
def constant(values: tuple, dtype=mx.float32) -> mx.array:
    """A small evaluated array of fixed values (a kernel's scalar parameters): built once, then reused
    with no graph primitive a call."""
    a = mx.array(values, dtype=dtype)
    mx.eval(a)
    return a


def float_bits(x: float) -> int:
    """A positive float32 as a template argument: its bits, which a body reads back with ZK_U2F. A scalar that
    never changes between calls (an eps, a softmax scale) costs no input array this way."""
    bits = struct.unpack("<i", struct.pack("<f", x))[0]
    if not (x > 0 and 0 < bits < 0x7F800000):
        raise ValueError(f"a template float must be positive and finite, got {x}")
    return bits


def shape_or_into(shape, into):
    """An output's shape, or the array ``launch`` writes it into (which must have that shape)."""
    if into is not None and into.shape != tuple(shape):
        raise ValueError(f"an output of shape {tuple(shape)} cannot be written into an array of shape {into.shape}")
    return tuple(shape) if into is None else into


def dummy(dtype=mx.float32) -> mx.array:
    """A small array for a kernel input that a variant never uses, or loads one 16-byte chunk of and drops. Eight
    elements: at least 16 bytes, and on Metal in device memory like the weights it stands for (MLX passes an input
    of fewer than 8 elements in the constant address space, which a device pointer cannot point into)."""
    return constant((0,) * 8, dtype)


def filled_array(filled) -> mx.array:
    """The cache positions held after a step's write, as the kernels read it: int32 [1]. An int becomes a
    constant; an array (one a step, shared by every layer) is used as it is."""
    if isinstance(filled, mx.array):
        return filled if filled.dtype == mx.int32 else filled.astype(mx.int32)
    return constant((int(filled),), mx.int32)
