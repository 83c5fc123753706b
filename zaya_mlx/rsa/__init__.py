"""Markovian RSA: ZAYA1's bounded-context test-time compute, as Zyphra runs it (ZAYA1-8B report, arXiv
2605.05365; RSA, arXiv 2509.26626; Zyphra's vLLM fork, examples/markovian_rsa/rsa_proxy_server.py).

    from zaya_mlx import rsa
    params = rsa.RSAParams.preset("laptop", rsa_n=8)          # or rsa.RSAParams() for Zyphra's recipe
    result = rsa.run("Find x ...", params, model=model, tokenizer=tokenizer, seed=0, on_event=print)
    result.text, result.answer, result.metadata                # the final response, its answer, rsa_metadata

Modules: params (RSAParams, presets), prompts (Zyphra's aggregation prompts), tails (what a candidate carries),
answers (extraction, equivalence, the vote), memory (the plan), backends (decoding), engine (the run, events),
runfolder (the durable record a run resumes from), distributed (one run over several hosts under mlx.launch).
docs/rsa.md says which parts follow Zyphra's code and which are ours.
"""

from .answers import Vote, answer_key, equivalent, extract_answer, normalize_answer, vote
from .backends import Backend, ModelBackend
from .engine import EVENT_KINDS, SCHEDULES, Cancelled, ContextBoundError, Rollout, RoundRecord, RSAEvent, RSAResult, \
    all_draws, derived_seed, draw_candidates, plan_run, run
from .memory import MemoryPlan, default_memory_budget, kv_bytes_per_token, machine_memory, plan_memory, \
    state_bytes_per_sequence
from .params import DEFAULT_PRESET, PRESETS, TAIL_SOURCES, TAIL_UNITS, RSAParams
from .runfolder import RunFolder, default_runs_root, estimate_line, measured_rate, model_identity, new_run_path
from .prompts import PromptBuilder, aggregation_text, question_of
from .tails import candidate_text, served_split, token_tail, word_tail

__all__ = [
    "DEFAULT_PRESET", "EVENT_KINDS", "PRESETS", "SCHEDULES", "TAIL_SOURCES", "TAIL_UNITS", "Backend", "Cancelled",
    "ContextBoundError", "MemoryPlan", "ModelBackend", "PromptBuilder", "RSAEvent", "RSAParams", "RSAResult",
    "Rollout", "RoundRecord", "RunFolder", "Vote", "aggregation_text", "all_draws", "answer_key", "candidate_text",
    "default_memory_budget", "default_runs_root", "derived_seed", "draw_candidates", "equivalent", "estimate_line",
    "extract_answer", "kv_bytes_per_token", "machine_memory", "measured_rate", "model_identity", "new_run_path",
    "normalize_answer", "plan_memory", "plan_run", "question_of", "run", "served_split", "state_bytes_per_sequence",
    "token_tail", "vote", "word_tail",
]
