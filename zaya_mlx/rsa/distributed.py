"""RSA over several hosts: `mlx.launch` starts one process a host, MLX's collectives keep them in step.

Every host holds the whole state of the run (the draws, what has finished, what runs where) and takes the same
decisions from it: which ready rollout starts, and on which host (the one with the most free slots; each host's
slots come from its own memory plan). A host decodes the rollouts placed on it; after every decode step one
all_gather carries what each host did (the tokens it produced, how many rollouts it finished, a cancel), and
when some finished a second one carries those rollouts (tokens, text, candidate, answer) to every host, in rank
order. So every host builds every prompt from the same candidates, and since a rollout's tokens depend only on
its prompt and its seed (derived from the run's seed, its round and index), the run ends as it would on one host.
Host 0 keeps the run folder, shows the view and returns the answer; the others decode.

A host that dies closes its sockets: the others' next collective fails and they stop with `HostLost` (what
finished is already in host 0's folder, which resumes on the hosts that remain, or on one). A host that stops
answering without closing them (asleep, a link down) is caught by a watchdog: a collective that has not
returned in `timeout` seconds ends the process (nothing is lost: every finished rollout was appended durably).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import sys
import threading
from typing import Callable, Optional

from ..errors import ZayaError
from .engine import Cancelled, Engine, Rollout

PEER_TIMEOUT = 1800.0  # seconds a collective may wait: over the longest decode step (a step may prefill 8 chunks)


class HostLost(ZayaError):
    """Another host of the run stopped (its process ended, or the connection to it broke)."""


def launched_group():
    """The group a launcher started this process in (mlx.launch sets MLX_RANK, mpirun OMPI_COMM_WORLD_SIZE), or
    None when it runs alone. Joined strictly: a host that cannot reach the others is an error, never a run alone."""
    import mlx.core as mx

    if "MLX_RANK" not in os.environ and "OMPI_COMM_WORLD_SIZE" not in os.environ:
        return None
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and os.path.isfile(hostfile) and not open(hostfile).read().strip():
        return None  # mlx.launch of one host
    try:
        group = mx.distributed.init(strict=True)
    except RuntimeError as e:
        raise ZayaError(f"this host was launched as one of several but could not join them: {e}") from None
    return group if group.size() > 1 else None


def as_hosts(group) -> Optional["Hosts"]:
    """`Hosts` over an `mx.distributed.Group` (None for a group of one); a `Hosts` is returned as it is."""
    if isinstance(group, Hosts):
        return group if group.size > 1 else None
    return Hosts(group) if group.size() > 1 else None


class Hosts:
    """The hosts of a run and the two collectives it needs: a gather of small int rows and one of JSON values.
    `saved_in` (a folder) is named when the watchdog ends the process."""

    def __init__(self, group, *, timeout: float = PEER_TIMEOUT):
        self.group, self.rank, self.size, self.timeout = group, group.rank(), group.size(), timeout
        self.name = socket.gethostname()
        self.saved_in: Optional[str] = None

    def _all_gather(self, x):
        import mlx.core as mx

        timer = threading.Timer(self.timeout, self._silent)
        timer.daemon = True
        timer.start()
        try:
            out = mx.distributed.all_gather(x, group=self.group)
            mx.eval(out)
            return out
        except RuntimeError as e:
            raise HostLost(f"host {self.rank} ({self.name}) lost another host of the run: {e}") from None
        finally:
            timer.cancel()

    def _silent(self) -> None:
        saved = f"; what finished is saved in {self.saved_in}" if self.saved_in else ""
        sys.stderr.write(f"error: host {self.rank} ({self.name}) heard nothing from the other hosts for "
                         f"{self.timeout:.0f} s (a host stopped or a link is down){saved}\n")
        sys.stderr.flush()
        os._exit(1)

    def gather_ints(self, values: list[int], width: int) -> list[list[int]]:
        """Each host's `values` (at most `width` of them; int32), zero-padded to `width`, in rank order."""
        import mlx.core as mx

        if len(values) > width:
            raise ValueError(f"{len(values)} values for a row of {width}")
        out = self._all_gather(mx.array(values + [0] * (width - len(values)), dtype=mx.int32))
        return out.reshape(self.size, width).tolist()

    def gather(self, value) -> list:
        """Each host's JSON value, in rank order: the lengths, then the bytes padded to the longest."""
        import mlx.core as mx
        import numpy as np

        data = json.dumps(value, ensure_ascii=False).encode()
        lengths = [row[0] for row in self.gather_ints([len(data)], 1)]
        width = max(lengths)
        buf = np.zeros(width, dtype=np.uint8)
        buf[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        rows = np.array(self._all_gather(mx.array(buf))).reshape(self.size, width)
        return [json.loads(rows[h, : lengths[h]].tobytes()) for h in range(self.size)]

    def each(self, fn: Callable, share: Callable = lambda value: value):
        """Run `fn` on every host: `(this host's value, [share(value) of every host])`. A ZayaError on any host is
        raised on every host, as one line naming the host, so that no host waits for one that gave up."""
        value, error = None, None
        try:
            value = fn()
            shared = share(value)
        except ZayaError as e:
            shared, error = None, str(e)
        rows = self.gather({"value": shared, "error": error, "host": self.name})
        for rank, row in enumerate(rows):
            if row["error"] is not None:
                raise ZayaError(f"host {rank} ({row['host']}): {row['error']}")
        return value, [row["value"] for row in rows]


def share_run(hosts: Hosts, define: Callable, model: Optional[str], dtype: Optional[str]) -> tuple:
    """Host 0's run on every host: `define()` (on host 0 only) gives `(folder, params, seed, messages, model,
    dtype)` from the arguments or the folder it resumes; the others take all but the folder, keeping their own
    `model` and `dtype` where given (their paths may differ; `check_same_model` compares what they hold)."""
    from .params import RSAParams

    mine = None

    def lead():
        nonlocal mine
        mine = define()
        _, params, seed, messages, model_, dtype_ = mine
        return {"params": params.to_dict(), "seed": seed, "messages": messages, "model": model_, "dtype": dtype_}

    _, shared = hosts.each(lead if hosts.rank == 0 else lambda: None)
    if hosts.rank == 0:
        return mine
    run = shared[0]
    return None, RSAParams.from_dict(run["params"]), run["seed"], run["messages"], model or run["model"], \
        dtype or run["dtype"]


def check_same_model(hosts: Hosts, identify: Callable[[], dict]) -> dict:
    """Every host's model identity (`identify()`: `runfolder.model_identity`, a hash of the config, the index and
    the weight files' sizes, and the dtype) is host 0's; else the same one-line ZayaError on every host, before
    any work. Returns this host's."""
    mine, ids = hosts.each(identify)
    first = ids[0]
    for rank, other in enumerate(ids):
        if (other["hash"], other.get("dtype")) != (first["hash"], first.get("dtype")):
            raise ZayaError(f"host {rank} loads the model at {other['path']} (hash {other['hash']}, dtype "
                            f"{other.get('dtype')}), host 0 the one at {first['path']} (hash {first['hash']}, dtype "
                            f"{first.get('dtype')}): give every host the same model")
    return mine


def run_fingerprint(params, seed: int, messages, stop_ids, schedule: str, model) -> str:
    """What every host must agree on for the run to be one run: parameters, seed, messages, stops, schedule,
    the model's configuration."""
    args = getattr(model, "args", None)
    config = vars(args) if args is not None and hasattr(args, "__dict__") else None
    blob = json.dumps([params.to_dict(), seed, messages, sorted(stop_ids), schedule, config], sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class DistributedEngine(Engine):
    """The engine on one host of several: the same state on every host, the rollouts spread by free slots,
    every decode step followed by an exchange (see the module's doc)."""

    def __init__(self, hosts: Hosts, params, *, messages, model=None, journal=None, **kwargs):
        super().__init__(params, journal=journal, **kwargs)
        self.hosts, self.host = hosts, hosts.rank
        self.local_cancel, self.cancel = self.cancel, None  # agreed on in each exchange instead
        hosts.saved_in = str(journal.path) if journal is not None else None
        mine = run_fingerprint(params, self.seed, messages, self.stops, self.schedule, model)

        def agree() -> dict:
            if journal is not None and hosts.rank != 0:
                raise ZayaError("was given a run folder: only host 0 keeps one")
            return {"run": mine, "slots": self.plan.slots}

        _, rows = hosts.each(agree)
        for rank, row in enumerate(rows):
            if row["run"] != rows[0]["run"]:
                raise ZayaError(f"host {rank} was given another run than host 0 (parameters, seed, problem or model "
                                "configuration differ): start every host with the same command")
        self.host_slots = [row["slots"] for row in rows]
        self.width = 3 + 3 * max(self.host_slots)  # cancel, finished, tokens; then (round, index, token) each

    @property
    def total_slots(self) -> int:
        return sum(self.host_slots)

    def free_slots(self) -> list[int]:
        busy = [0] * self.hosts.size
        for live in self.running.values():
            busy[live.host] += 1
        return [0 if self.schedule == "batches" and busy[h] else self.host_slots[h] - busy[h]
                for h in range(self.hosts.size)]

    def resume(self, rollouts) -> None:
        """Host 0's finished rollouts (read back from its run folder), on every host."""
        _, shared = self.hosts.each(lambda: [dataclasses.asdict(r) for r in rollouts] if self.host == 0 else None)
        super().resume([Rollout.from_dict(d) for d in shared[0]])

    def advance(self) -> list[Rollout]:
        here = any(live.host == self.host for live in self.running.values())
        produced, finished = self.decode_step() if here else ([], [])
        cancel = bool(self.local_cancel is not None and self.local_cancel())
        flat = [x for (r, i), token in produced for x in (r, i, token)]
        rows = self.hosts.gather_ints([int(cancel), len(finished), len(produced), *flat], self.width)
        stopped = [h for h, row in enumerate(rows) if row[0]]
        if stopped:
            raise Cancelled(f"the RSA run was cancelled (on host {stopped[0]})")
        for h, row in enumerate(rows):  # every host counts every token, in rank order
            for j in range(row[2]):
                r, i, token = row[3 + 3 * j : 6 + 3 * j]
                if h != self.host:
                    self.running[r, i].tokens.append(token)
                self.count_token((r, i), token)
        if not any(row[1] for row in rows):
            return []
        shared = self.hosts.gather([dataclasses.asdict(r) for r in finished])
        return [Rollout.from_dict(d) for host_rollouts in shared for d in host_rollouts]
