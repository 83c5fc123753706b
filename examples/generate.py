"""Text generation with the Python API: one chat prompt streamed (reasoning and answer apart), then a batch.

    python examples/generate.py                                   # Zyphra/ZAYA1-8B from the hub (or its cache)
    python examples/generate.py --model ZAYA1-8B-mxfp4 "Why is the sky blue?"   # a quantized copy

Same as `zaya generate -p "..."`, written out so each step shows.
"""

import argparse
import sys

import zaya_mlx
from zaya_mlx.sampling import make_sampler
from zaya_mlx.tokenizer import apply_chat_template


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="What is the sum of the first 10 odd numbers?")
    parser.add_argument("--model", default="Zyphra/ZAYA1-8B", help="hub repo id or local folder")
    parser.add_argument("--max-tokens", type=int, default=1024)
    args = parser.parse_args()

    model, tokenizer = zaya_mlx.load(args.model)

    # 1. Stream one answer. The chat template decides how the turn starts; the stream says which channel each
    #    piece belongs to ("reasoning" inside <think>...</think>, then "answer").
    ids = apply_chat_template(tokenizer, [{"role": "user", "content": args.prompt}], enable_thinking=True)
    channel = None
    for r in zaya_mlx.stream_generate(model, tokenizer, ids, max_tokens=args.max_tokens, temperature=0.6,
                                      top_p=0.95, seed=0):
        if r.channel != channel:
            print(f"\n[{r.channel}]", flush=True)
            channel = r.channel
        print(r.text, end="", flush=True)
    print(f"\n\n{r.prompt_tokens} prompt tokens at {r.prompt_tps:.1f} tok/s, {r.generation_tokens} generated at "
          f"{r.generation_tps:.1f} tok/s, peak memory {r.peak_memory_gb:.2f} GB, finished by {r.finish_reason}")

    # 2. The same, collected: reasoning and answer as strings, token ids, why it stopped.
    result = zaya_mlx.generate(model, tokenizer, ids, max_tokens=64, stop=["\n\n"])
    print(f"\nfirst 64 tokens, greedy, stopped by {result.finish_reason}: {result.reasoning!r} / {result.answer!r}")

    # 3. Several prompts decoded together, one forward a step for all (what the RSA engine runs on).
    questions = ["Name a prime number.", "Name a colour.", "Name a planet."]
    prompts = [apply_chat_template(tokenizer, [{"role": "user", "content": q}], enable_thinking=False)
               for q in questions]
    outputs = zaya_mlx.batch_generate(model, prompts, max_tokens=32, sampler=make_sampler(0.6, top_p=0.95, seed=0),
                                      stop_ids=sorted(tokenizer.eos_token_ids))
    for q, out in zip(questions, outputs):
        print(f"{q} -> {tokenizer.decode([t for t in out if t not in tokenizer.eos_token_ids]).strip()!r}")


if __name__ == "__main__":
    try:
        main()
    except zaya_mlx.ZayaError as e:
        sys.exit(f"error: {e}")
