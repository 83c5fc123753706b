"""Run the real server (`zaya_mlx.server.Server`) on a tiny checkpoint whose model can be told what to write.

    python tests/serve_scripted.py FOLDER PORT [MAX_QUEUE MAX_BODY]

A random tiny model never writes a tool call or a think block by itself. `ScriptedModel` is the checkpoint's
model, except when the prompt holds text between two `~` marks (the last such pair): then it writes exactly
that text, token by token, and then `<|im_end|>`. So a test puts the model's answer in its own message (or in
a tool's result) and checks what the server makes of it. Prompts without marks get the real model's output.
"""

import sys

import mlx.core as mx

from zaya_mlx.generation import cache_length
from zaya_mlx.server import Server


class ScriptedModel:
    def __init__(self, model, mark: int, turn_start: int, newline: int, end: int):
        self.model, self.mark, self.turn_start, self.newline, self.end = model, mark, turn_start, newline, end
        self.history: list[int] = []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def _forced(self):
        """The token the script says comes next, or None without a script."""
        h = self.history
        marks = [i for i, t in enumerate(h) if t == self.mark]
        if len(marks) < 2 or self.turn_start not in h:
            return None
        script = h[marks[-2] + 1 : marks[-1]] + [self.end]
        header = len(h) - 1 - h[::-1].index(self.turn_start)  # the generation prompt's `<|im_start|>assistant\n`
        if self.newline not in h[header:]:
            return None  # still inside the prompt
        start = h.index(self.newline, header) + 1
        return script[min(len(h) - start, len(script) - 1)]

    def __call__(self, inputs, cache=None, **kwargs):
        if cache_length(cache) == 0:
            self.history = []
        logits = self.model(inputs, cache=cache, **kwargs)
        self.history += inputs.reshape(-1).tolist()
        forced = self._forced()
        if forced is None:
            return logits
        boost = mx.zeros((logits.shape[-1],), dtype=logits.dtype).at[forced].add(1e4)
        return logits + boost


def main(folder: str, port: str, max_queue: str = "8", max_body: str = str(4 << 20)) -> None:
    server = Server("127.0.0.1", int(port), max_queue=int(max_queue), max_body=int(max_body), temperature=0.0,
                    heartbeat=0.001)  # a beat with every event after 1 ms: the tests see beats at any speed
    server.load(folder, dtype="float32")
    vocab = server.tokenizer.get_vocab()
    newline = server.tokenizer.encode("\n", add_special_tokens=False)[0]
    server.model = ScriptedModel(server.model, vocab["~"], vocab["<|im_start|>"], newline, vocab["<|im_end|>"])
    server.run()


if __name__ == "__main__":
    main(*sys.argv[1:])
