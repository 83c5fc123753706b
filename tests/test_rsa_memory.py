"""The RSA memory plan is an upper bound of what a real batched round allocates: several rollouts prefilled
together from a shared prefix and decoded by the real ModelBackend, measured by MLX's own peak counter."""

import mlx.core as mx
import pytest
from mlx.utils import tree_map

from zaya_mlx import rsa
from zaya_mlx.config import ZayaConfig
from zaya_mlx.errors import ZayaError
from zaya_mlx.model import Model
from zaya_mlx.rsa.memory import model_layer_bytes, model_weight_bytes

HEAD, REST, DECODE, SLOTS, STEP = 64, 320, 4, 4, 128


def small_model() -> Model:
    """The 8B's attention shapes (8 query, 2 KV heads of 128) with a narrow residual stream and experts, so the
    cache and attention, not the weights, make the peak."""
    args = ZayaConfig(num_hidden_layers=2, hidden_size=64, moe_intermediate_size=64, vocab_size=512,
                      router_hidden_size=32, num_experts=4)
    model = Model(args)
    model.update(tree_map(lambda p: p.astype(mx.bfloat16) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_the_plan_covers_the_peak_of_a_batched_round(kv_bits):
    model = small_model()
    head = mx.random.randint(3, 512, (HEAD,), key=mx.random.key(0)).tolist()
    rests = mx.random.randint(3, 512, (SLOTS, REST), key=mx.random.key(1)).tolist()
    params = rsa.RSAParams(rsa_n=SLOTS, rsa_k=2, rsa_t=1, tail_window_len=REST // 2, tail_unit="tokens",
                           short_resp_len=DECODE, max_tokens=DECODE, rsa_final_n=0, kv_bits=kv_bits)
    plan = rsa.plan_memory(model.args, params, prompt_tokens=HEAD, aggregate_tokens=HEAD + REST, head_tokens=HEAD,
                           weights_bytes=model_weight_bytes(model), layer_bytes=model_layer_bytes(model),
                           budget_bytes=1 << 40, prefill_step_size=STEP)
    assert plan.slots == SLOTS

    mx.synchronize()
    before = mx.get_active_memory()  # the weights and whatever else is alive
    mx.reset_peak_memory()
    backend = rsa.ModelBackend(model, slots=SLOTS, stop_ids=(), prefill_step_size=STEP, kv_bits=kv_bits)
    for i in range(SLOTS):
        backend.start((0, i), head + rests[i], max_tokens=DECODE, sampling={"temperature": 1.0, "top_p": 1.0,
                      "top_k": 0, "min_p": 0.0}, seed=i, prefix=head)
    finished = 0
    while finished < SLOTS:
        finished += sum(reason is not None for _, _, reason in backend.step())
    mx.synchronize()
    added = mx.get_peak_memory() - before
    backend.close()
    assert added > SLOTS * (HEAD + REST) * plan.kv_bytes_per_token  # the measurement saw the caches
    assert plan.peak_bytes - plan.weights_bytes - plan.host_bytes >= added


@pytest.mark.parametrize("t,short,longest", [(1, 100, (900, 300)), (2, 400, (900, 400)), (0, 100, (64, 300))])
def test_a_sequence_over_the_context_names_its_prompt_and_new_tokens(t, short, longest):
    """The longest sequence of a run: round 0's prompt and its budget (short_resp_len, or max_tokens without
    aggregation rounds), an aggregation prompt and short_resp_len (a middle round), or one and max_tokens (the last);
    the refusal splits it into the two, so the reader sees which to lower."""
    args = ZayaConfig(num_hidden_layers=2, hidden_size=64, moe_intermediate_size=64, vocab_size=512,
                      router_hidden_size=32, num_experts=4, max_position_embeddings=256)
    params = rsa.RSAParams(rsa_n=2, rsa_k=2, rsa_t=t, tail_window_len=100, tail_unit="tokens", short_resp_len=short,
                           max_tokens=300, rsa_final_n=0)
    prompt, new = longest
    with pytest.raises(ZayaError, match=rf"an RSA sequence may hold {prompt + new:,} tokens \({prompt:,} of "
                                            rf"prompt, then {new} new\), over the model's context of 256; lower "):
        rsa.plan_memory(args, params, prompt_tokens=64, aggregate_tokens=900, budget_bytes=1 << 40)
