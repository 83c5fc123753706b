"""A minimal multi-turn chat on the Python API: the KV cache is reused between turns, Ctrl-C keeps a partial
answer, /save and /load keep the conversation.

    python examples/chat.py                       # Zyphra/ZAYA1-8B
    python examples/chat.py --model ./my-folder   # any folder the loader reads, quantized or not

`zaya chat` is the full terminal UI built on the same ChatSession.
"""

import argparse
import sys
from pathlib import Path

import zaya_mlx
from zaya_mlx.chat_session import ChatSession


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Zyphra/ZAYA1-8B", help="hub repo id or local folder")
    parser.add_argument("--system", default=None)
    parser.add_argument("--no-think", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=4096)
    args = parser.parse_args()

    model, tokenizer = zaya_mlx.load(args.model)
    session = ChatSession(model, tokenizer, system=args.system, enable_thinking=not args.no_think,
                          temperature=0.6, top_p=0.95, max_tokens=args.max_tokens)
    print("Type a message; /reset, /save FILE, /load FILE, /exit.")
    while True:
        try:
            text = input("\n> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            continue
        if text.startswith("/save "):
            Path(text[6:].strip()).write_text(session.to_json())
            continue
        if text.startswith("/load "):
            session = ChatSession.from_json(model, tokenizer, Path(text[6:].strip()).read_text())
            continue
        if not text:
            continue
        try:
            stream = session.send(text)
        except zaya_mlx.ZayaError as e:  # e.g. the conversation no longer fits the context
            print(f"error: {e}")
            continue
        channel = None
        try:
            for r in stream:
                if r.channel != channel:
                    print("\n(thinking) " if r.channel == "reasoning" else "\n", end="")
                    channel = r.channel
                print(r.text, end="", flush=True)
        except KeyboardInterrupt:
            stream.close()  # keeps the partial answer in the history
            print(" [stopped]")
        s = session.stats
        print(f"\n[{s.prompt_tokens} new prompt tokens ({s.reused_tokens} reused) at {s.prompt_tps:.0f} tok/s, "
              f"{s.generation_tokens} generated at {s.generation_tps:.1f} tok/s, {s.context_tokens}/{s.context_limit} "
              f"tokens, KV cache {s.kv_cache_bytes / 1e6:.1f} MB]")


if __name__ == "__main__":
    try:
        main()
    except zaya_mlx.ZayaError as e:
        sys.exit(f"error: {e}")
