"""RSA over several hosts (zaya_mlx/rsa/distributed.py): 2 and 3 local processes started by `mlx.launch` with
MLX's ring back end on 127.0.0.1, each running `zaya rsa` on the tiny model (tests/rsa_host.py), against the same
run in one process: the answer and every round's rollouts (tokens, parents, candidates) are the same. A host
with another model is refused on every host before any work; a host that dies mid-round leaves host 0's run
folder resumable (even when the launcher's SIGTERM comes while host 0 saves), and it resumes, alone, to the
one-process result. Every launch is bounded by a timeout.
In one process, threads stand in for hosts (a barrier for the collectives) to check the schedule on a scripted
backend: hosts of different slot counts, in every schedule, and a cancel on one host."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import copy_with_context

from zaya_mlx.rsa.distributed import Hosts

HOST = Path(__file__).parent / "rsa_host.py"
LAUNCH = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
ARGS = ["What is 2+3?", "--dtype", "float32", "--preset", "quick", "--n", "4", "--k", "2", "--t", "2",
        "--short-resp-len", "10", "--max-tokens", "12", "--tail-window-len", "6", "--temp", "30", "--seed", "3"]

pytestmark = pytest.mark.skipif(not Path(LAUNCH).exists(), reason="mlx.launch is not installed")


@pytest.fixture(scope="module")
def long_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny checkpoint with a 4K context, so that Zyphra's prompt fits (as in test_rsa.py)."""
    return copy_with_context(tiny_model_dir, tmp_path_factory.mktemp("zaya-long") / "m", 4096)


@pytest.fixture(scope="module")
def alone(long_model_dir, tmp_path_factory):
    """The run in one process (this one), without a launcher."""
    from zaya_mlx.cli import main

    run = tmp_path_factory.mktemp("alone") / "run"
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as done:
        patch.setattr(sys, "argv", ["zaya", "rsa", *ARGS, "--max-batch", "2", "--model", str(long_model_dir),
                                    "--run", str(run)])
        main()
    assert done.value.code == 0
    return json.loads((run / "result.json").read_text())


def free_port(hosts: int) -> int:
    """A port with the next `hosts` - 1 free too, for the ring's listeners."""
    for _ in range(20):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for p in range(port, port + hosts):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free ports")


def launch(hosts: int, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    """`mlx.launch --backend ring -n HOSTS` of tests/rsa_host.py with `args` (its options, then the CLI's)."""
    cmd = [LAUNCH, "--backend", "ring", "-n", str(hosts), "--starting-port", str(free_port(hosts)),
           "--python", sys.executable, "--", str(HOST), *map(str, args)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                          start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the launcher and every host it started
            raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def rounds_of(result: dict) -> list:
    return [[(ro["tokens"], ro["parents"], ro["candidate"], ro["finish_reason"]) for ro in rd["rollouts"]]
            for rd in result["rounds"]]


@pytest.mark.parametrize("hosts", [2, 3])
def test_hosts_give_the_one_process_result(hosts, long_model_dir, alone, tmp_path):
    done = launch(hosts, "rsa", *ARGS, "--max-batch", "2", "--model", long_model_dir, "--run", tmp_path / "run")
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["answer"] == alone["answer"] and result["texts"] == alone["texts"]
    assert rounds_of(result) == rounds_of(alone)
    assert len({tuple(ro["tokens"]) for ro in result["rounds"][0]["rollouts"]}) > 1  # the rollouts differ
    assert result["metadata"]["rsa_max_concurrency"] == 2 * hosts  # each host's 2 slots
    assert done.stdout.count("run folder:") == 1 and "2 rounds · 4 rollouts" not in done.stderr  # host 0's view only
    assert not [p for p in tmp_path.iterdir() if p.name != "run"]


def test_a_host_with_another_model_is_refused_on_every_host(long_model_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(long_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6) * 2
    (other / "config.json").write_text(json.dumps(config))
    done = launch(2, "--model-on", f"1={other}", "rsa", *ARGS, "--model", long_model_dir, "--run", tmp_path / "run")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and len(set(errors)) == 1, done.stderr  # the same line from both hosts
    assert f"host 1 loads the model at {other}" in errors[0] and "give every host the same model" in errors[0]
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()  # before any work


def test_a_host_lost_mid_round_leaves_a_run_that_resumes_alone_to_the_same_result(long_model_dir, alone, tmp_path,
                                                                                  run_zaya):
    run = tmp_path / "run"  # one slot a host: rollouts finish two by two, and host 1 dies after the 6th (round 1)
    done = launch(2, "--die", "1:6", "--term-saving", "0", "rsa", *ARGS, "--max-batch", "1", "--model",
                  long_model_dir, "--run", run)
    assert f"resume with: zaya rsa --resume {run}" in done.stderr and "Traceback" not in done.stderr, done.stderr
    saved = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert [(r["round"], r["index"]) for r in saved][:4] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert len(saved) == 6 and not (run / "result.json").exists()  # round 1 half done
    code, stdout, stderr = run_zaya("rsa", "--resume", run)
    assert code == 0, stderr
    assert "resumed: 6 finished rollouts" in stdout
    result = json.loads((run / "result.json").read_text())
    assert result["texts"] == alone["texts"] and rounds_of(result) == rounds_of(alone)


# --- the schedule over hosts, in one process: threads as hosts, a board as the collectives --------------------------


class Board:
    """What MLX's all_gather does between processes, between threads: each puts its value, all read them all."""

    def __init__(self, size: int):
        import threading

        self.values, self.barrier = [None] * size, threading.Barrier(size, timeout=10)

    def exchange(self, rank: int, value) -> list:
        self.values[rank] = value
        self.barrier.wait()
        out = list(self.values)
        self.barrier.wait()
        return out


class ThreadHosts(Hosts):
    """`Hosts` whose two collectives go through a Board (no MLX group)."""

    def __init__(self, rank: int, board: Board):
        self.rank, self.size, self.board = rank, len(board.values), board
        self.name, self.saved_in, self.timeout = f"thread{rank}", None, 10

    def gather(self, value) -> list:
        return self.board.exchange(self.rank, json.loads(json.dumps(value)))

    def gather_ints(self, values: list[int], width: int) -> list[list[int]]:
        return self.board.exchange(self.rank, values + [0] * (width - len(values)))


def run_on_threads(slots: list[int], run_one) -> list:
    """`run_one(hosts, max_batch)` on one thread a host (each with its own slot count); what each returned or
    raised."""
    import threading

    board, out = Board(len(slots)), [None] * len(slots)

    def host(rank):
        try:
            out[rank] = run_one(ThreadHosts(rank, board), slots[rank])
        except Exception as e:  # noqa: BLE001 - handed to the test (a host that fails breaks the others' barrier)
            out[rank] = e

    threads = [threading.Thread(target=host, args=(rank,)) for rank in range(len(slots))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from zaya_mlx.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


@pytest.mark.parametrize("schedule", ["stream", "rounds", "batches"])
def test_hosts_of_different_slot_counts_give_the_one_host_result_in_every_schedule(tok, schedule):
    from test_rsa import IM_END, PROBLEM, Scripted

    from zaya_mlx import rsa

    params = rsa.RSAParams(rsa_n=6, rsa_k=3, rsa_t=2, tail_window_len=40, short_resp_len=60, max_tokens=80,
                           rsa_final_n=2)
    alone = rsa.run(PROBLEM, params, tokenizer=tok, backend=Scripted(tok), seed=5, stop_ids=[IM_END], max_batch=2)
    backends = {}

    def one(hosts, max_batch):
        backends[hosts.rank] = Scripted(tok)
        return rsa.run(PROBLEM, params, tokenizer=tok, backend=backends[hosts.rank], seed=5, stop_ids=[IM_END],
                       max_batch=max_batch, schedule=schedule, group=hosts)

    results = run_on_threads([1, 2, 3], one)
    for result in results:
        assert not isinstance(result, Exception), result
        assert [[(ro.tokens, ro.parents, ro.candidate) for ro in rd.rollouts] for rd in result.rounds] == \
            [[(ro.tokens, ro.parents, ro.candidate) for ro in rd.rollouts] for rd in alone.rounds]
        assert result.texts == alone.texts and result.metadata["rsa_max_concurrency"] == 6
    started = [len(b.starts) for b in backends.values()]
    assert sum(started) == 6 + 6 + 2 and all(started)  # each rollout decoded once, on some host, every host used
    for rank, cap in enumerate([1, 2, 3]):
        assert max(s["running_beside"] for s in backends[rank].starts.values()) < cap  # within the host's own slots


def test_a_cancel_on_one_host_stops_every_host(tok):
    from test_rsa import IM_END, PROBLEM, Scripted

    from zaya_mlx import rsa

    params = rsa.RSAParams(rsa_n=4, rsa_k=2, rsa_t=1, tail_window_len=40, short_resp_len=60, max_tokens=80)

    def one(hosts, max_batch):
        steps = []
        return rsa.run(PROBLEM, params, tokenizer=tok, backend=Scripted(tok), stop_ids=[IM_END], max_batch=max_batch,
                       group=hosts, cancel=lambda: hosts.rank == 1 and len(steps.append(0) or steps) > 3)

    results = run_on_threads([2, 2], one)
    assert all(isinstance(r, rsa.Cancelled) and "on host 1" in str(r) for r in results), results


def test_a_host_that_stops_answering_ends_the_wait_with_one_line(tmp_path):
    """The watchdog: a collective that never returns (a peer asleep, a link down) ends the process after the
    timeout with one line naming the folder that holds what finished."""
    script = tmp_path / "silent.py"
    script.write_text(
        "import time, mlx.core as mx\n"
        "from zaya_mlx.rsa.distributed import Hosts\n"
        "class Group:\n"
        "    def rank(self): return 0\n"
        "    def size(self): return 2\n"
        "mx.distributed.all_gather = lambda x, group: time.sleep(60)\n"
        "hosts = Hosts(Group(), timeout=1)\n"
        "hosts.saved_in = '/runs/r1'\n"
        "hosts.gather_ints([1], 1)\n"
        "print('returned')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=50)
    assert done.returncode == 1 and "returned" not in done.stdout
    assert done.stderr.strip().splitlines() == [
        f"error: host 0 ({socket.gethostname()}) heard nothing from the other hosts for 1 s (a host stopped or a link "
        "is down); what finished is saved in /runs/r1"]
