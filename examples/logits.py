"""The model API directly: logits for a prompt, prefilled in chunks into a cache, then one decode step.

    python examples/logits.py                         # Zyphra/ZAYA1-8B from the hub (or its cache)
    python examples/logits.py --model ./zaya-mxfp4 "The capital of France is"
    python examples/logits.py --dtype float32         # exact comparison: in bf16 the two differ by its rounding
"""

import argparse
import sys

import mlx.core as mx

import zaya_mlx
from zaya_mlx.sizes import kv_bytes_per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", nargs="?", default="The capital of France is")
    parser.add_argument("--model", default="Zyphra/ZAYA1-8B", help="hub repo id or local folder")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default), float16 or float32")
    parser.add_argument("--chunk", type=int, default=4, help="prefill chunk size, to show the cache at work")
    args = parser.parse_args()

    model, tokenizer = zaya_mlx.load(args.model, dtype=args.dtype)
    ids = tokenizer.encode(args.text)

    # Prefill in chunks: the cache carries keys/values, the conv inputs and the delayed value between calls.
    cache = model.make_cache()
    for i in range(0, len(ids), args.chunk):
        logits = model(mx.array([ids[i : i + args.chunk]], dtype=mx.int32), cache=cache)
    probs = mx.softmax(logits[0, -1])
    top = mx.argsort(-probs)[:5].tolist()
    print("next token:", ", ".join(f"{tokenizer.decode([t])!r} {probs[t].item():.3f}" for t in top))

    # One decode step with the most likely token; the result equals running the whole sequence at once.
    step = model(mx.array([[top[0]]], dtype=mx.int32), cache=cache)
    full = model(mx.array([ids + [top[0]]], dtype=mx.int32))
    diff = mx.abs(step[0, -1] - full[0, -1]).max().item()
    print(f"decode step vs full prefill, max |difference|: {diff:.2e} "
          f"(largest logit {mx.abs(full[0, -1]).max().item():.2f})")
    kv = cache[0][0]
    per_token = kv_bytes_per_token(model.args, kv.keys.dtype.size)
    print(f"KV cache: {per_token} bytes per token ({kv.offset} tokens held)")


if __name__ == "__main__":
    try:
        main()
    except zaya_mlx.ZayaError as e:  # bad input: one line, as the `zaya` command prints it
        sys.exit(f"error: {e}")
