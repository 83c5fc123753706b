"""Multi-turn chat with cache reuse: every turn must equal a full prefill of the rendered conversation, whether
the cache is a prefix of it (only new tokens prefilled) or the template re-rendered history (rolled back)."""

import copy
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from generation_fixtures import full_logits, loaded, scripted_sampler
from zaya_mlx import ZayaError
from zaya_mlx.chat_session import ChatSession
from zaya_mlx.generation import load

IM_END, THINK, END_THINK = 106, 107, 108

# qwen3's convention: earlier assistant turns are rendered without their think block.
DROP_THINK_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- set content = message['content'] %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    return loaded(tmp_path_factory.getbasetemp() / "generation")


@pytest.fixture(scope="module")
def drop_think(gen, tmp_path_factory):
    _, _, folder = gen
    dst = tmp_path_factory.mktemp("drop-think") / "m"
    shutil.copytree(folder, dst)
    (dst / "chat_template.jinja").write_text(DROP_THINK_TEMPLATE)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config["chat_template"] = DROP_THINK_TEMPLATE
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return load(dst, dtype="float32")


def full_greedy(model, prompt, n):
    """Greedy tokens by no-cache forwards over the whole sequence, one step at a time (independent truth)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(full_logits(model, seq)[-1])))
    return seq[len(prompt):]


def turn(session, text, **kw):
    """Send a turn; return (its prompt ids as rendered before the turn, generated tokens)."""
    ids = session.prompt_ids(text, kw.get("enable_thinking"))
    tokens, last = [], None
    for r in session.send(text, **kw):
        if last is None or r.generation_tokens != last.generation_tokens:
            tokens.append(r.token)
        last = r
    return ids, tokens


def test_multi_turn_reuse_equals_full_prefill(gen):
    model, tokenizer, _ = gen
    session = ChatSession(model, tokenizer, system="Be brief.", max_tokens=8)
    for text in ["hello", "and the other one?", "ok then"]:
        ids, tokens = turn(session, text)
        assert tokens == full_greedy(model, ids, len(tokens))
        assert session.cache_tokens == ids + tokens
    # The cache after three turns gives the logits of a full forward over everything it holds.
    probe = 42
    cached = model(mx.array([[probe]]), cache=copy.deepcopy(session.cache))[0, -1]
    full = full_logits(model, session.cache_tokens + [probe])[-1]
    np.testing.assert_allclose(np.array(cached), full, atol=1e-4, rtol=1e-4)
    stats = session.stats
    assert stats.context_tokens == len(session.cache_tokens) and stats.context_limit == 512
    assert stats.kv_cache_bytes > 0 and stats.generation_tokens == 8


def test_new_turn_prefills_only_new_tokens(gen):
    model, tokenizer, _ = gen
    session = ChatSession(model, tokenizer, max_tokens=20)
    answer = tokenizer.encode("Four, of course.", add_special_tokens=False)
    ids1, tokens1 = turn(session, "2+2?", sampler=scripted_sampler(answer + [IM_END]))
    assert tokens1 == answer + [IM_END] and session.last_answer == "Four, of course."
    assert session.messages[-1] == {"role": "assistant", "content": "Four, of course."}
    held = len(ids1) + len(tokens1)
    ids2 = session.prompt_ids("and 3+3?")
    assert ids2[:held] == ids1 + tokens1  # the template re-renders this turn exactly as generated
    _, tokens2 = turn(session, "and 3+3?", max_tokens=6)
    assert session.stats.reused_tokens == held and session.stats.prompt_tokens == len(ids2) - held
    assert tokens2 == full_greedy(model, ids2, 6)


def test_template_that_drops_reasoning_rolls_back_exactly(drop_think):
    model, tokenizer = drop_think
    session = ChatSession(model, tokenizer, max_tokens=20)
    script = [THINK] + tokenizer.encode("hmm", add_special_tokens=False) + [END_THINK] + \
        tokenizer.encode("Four.", add_special_tokens=False) + [IM_END]
    ids1, _ = turn(session, "2+2?", sampler=scripted_sampler(script))
    assert session.last_reasoning == "hmm" and session.last_answer == "Four."
    assert session.messages[-1]["content"] == "<think>hmm</think>Four."
    ids2 = session.prompt_ids("and 3+3?")
    assert tokenizer.decode(ids2).count("hmm") == 0  # the template dropped the earlier reasoning
    _, tokens2 = turn(session, "and 3+3?", max_tokens=6)
    # The cache went back to the snapshot at the end of turn 1's prompt and prefilled from there.
    assert session.stats.reused_tokens == len(ids1) - 1
    assert tokens2 == full_greedy(model, ids2, 6)
    ids3, tokens3 = turn(session, "thanks", max_tokens=5)
    assert tokens3 == full_greedy(model, ids3, 5)


def test_stopping_early_keeps_the_partial_answer(gen):
    model, tokenizer, _ = gen
    session = ChatSession(model, tokenizer, max_tokens=30)
    pieces = []
    for i, r in enumerate(session.send("tell me a story")):
        pieces.append(r.text)
        if i == 3:
            break
    assert session.messages[-1]["role"] == "assistant"
    assert session.messages[-1]["content"] == "".join(pieces)
    assert len(session.messages) == 2
    ids, tokens = turn(session, "go on", max_tokens=5)
    assert tokens == full_greedy(model, ids, 5)

    stream = session.send("more")
    for i, r in enumerate(stream):
        if i == 1:
            session.interrupt()
    assert i == 1 and r.finish_reason is None and session.last_finish_reason == "interrupted"
    assert session.stats.generation_tokens == 2 and session.messages[-2]["content"] == "more"
    ids, tokens = turn(session, "and?", max_tokens=4)
    assert tokens == full_greedy(model, ids, 4)


def test_torn_forward_recovers(gen):
    """Ctrl-C inside a forward pass can leave some layers updated: the session goes back to a snapshot."""
    model, tokenizer, _ = gen

    class Flaky:
        args, layers = model.args, model.layers
        calls, fail_at = 0, None

        def make_cache(self, *a, **k):
            return model.make_cache(*a, **k)

        def __call__(self, tokens, cache=None):
            Flaky.calls += 1
            if Flaky.calls == Flaky.fail_at:
                model.layers[0](mx.zeros((1, tokens.shape[1], model.args.hidden_size)), None, None, cache[0], None)
                raise KeyboardInterrupt  # after touching layer 0's cache only
            return model(tokens, cache=cache)

    flaky = Flaky()
    session = ChatSession(flaky, tokenizer, max_tokens=6)
    turn(session, "hello")
    Flaky.fail_at = Flaky.calls + 4  # prefill, first token, then two decode steps
    with pytest.raises(KeyboardInterrupt):
        turn(session, "again")
    assert session.messages[-1]["role"] == "assistant" and len(session.messages) == 4
    Flaky.fail_at = None
    ids, tokens = turn(session, "once more", max_tokens=6)
    assert tokens == full_greedy(model, ids, 6)


def test_system_json_and_cache_files(gen, tmp_path):
    model, tokenizer, _ = gen
    session = ChatSession(model, tokenizer, system="Be brief.", max_tokens=5, temperature=0.0)
    turn(session, "hello")
    session.set_system("Be verbose.")
    ids, tokens = turn(session, "again")
    assert session.stats.reused_tokens == 0 and tokens == full_greedy(model, ids, 5)
    assert session.system == "Be verbose." and session.messages[0]["content"] == "Be verbose."

    saved = session.to_json()
    restored = ChatSession.from_json(model, tokenizer, saved)
    assert restored.messages == session.messages and restored.sampling["max_tokens"] == 5
    session.save_cache(tmp_path / "chat")
    restored.load_cache(tmp_path / "chat.safetensors")
    ids, tokens = turn(restored, "third")
    assert restored.stats.reused_tokens > 0 and tokens == full_greedy(model, ids, 5)

    restored.reset()
    assert restored.messages == [{"role": "system", "content": "Be verbose."}] and restored.cache_tokens == []
    with pytest.raises(ZayaError):
        ChatSession.from_json(model, tokenizer, "{not json")
    with pytest.raises(ZayaError, match="over the context limit of 512 tokens; shorten it"):
        session.send("x" * 600)  # one message alone over the context (a long max_tokens is not an error)
    with pytest.raises(ZayaError):
        session.send("x", top_p=0)
