"""Several generations on one engine, their steps run together: rows of several sequences in one step.

    batch = Batch(engine)                        # an engine built with max_seqs >= the sequences in flight
    a = batch.add(0, adadecode_steps, prompt_a, 64, heads=heads, context=True)
    b = batch.add(1, vanilla_steps, prompt_b, 32)
    while batch.busy:
        for job in batch.step():                 # the jobs that ended in this step
            print(job.seq, job.generation.tokens if job.error is None else job.error)

Every decoding method is a schedule (decoding/common.py): a generator that yields the engine calls it needs and is
sent their results. A Batch holds one schedule per sequence, each on the engine's view of its own sequence
(EngineContract.sequence), and advances them together: in a step every schedule runs its cheap calls (embed,
truncate, head, a prefill piece) at once and then waits at its next run_layers or final; the run_layers of every
sequence go to the engine as one `run_batch` (the rows of all sequences in one pass over the weights, layer by layer),
the schedules that ran go on to their next call (a vanilla step's final, so every sequence's final of the step is in
it whatever the phase it joined in), and the finals go as one `final_batch`. Each sequence's schedule makes exactly the calls it makes alone, in the same
order, and the engines compute each row's bits independently of the other rows of a call (batch invariance): so
every sequence's tokens are those it gets alone, whatever joins or leaves the batch, and at whatever step.

A long prompt is prefilled in pieces of `prefill_piece` tokens, one piece per step, so it never holds the others
up for long; a piece is a whole number of the engine's own prefill chunks, so the prefill's bits are those of one
call (engines with no chunk of their own, TorchEngine, take the prompt in one piece).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from .common import Generation, Schedule

BATCHED = ("run_layers", "final")


@dataclasses.dataclass(eq=False)
class Job:
    """One sequence's generation in a Batch."""

    seq: int
    steps: Schedule
    view: object
    call: tuple | None = None  # the call it waits at (batched, or a prefill in pieces), None when it can go on
    result: object = None  # what to send it next
    started: bool = False
    prefilled: int = 0  # tokens of its prefill done, when its prefill goes in pieces
    generation: Generation | None = None  # when it ended
    error: BaseException | None = None  # when it failed (its engine call, its callback, a cancel)

    @property
    def done(self) -> bool:
        return self.generation is not None or self.error is not None

    def _send(self):
        value, self.result = self.result, None
        if not self.started:
            self.started = True
            return next(self.steps)
        return self.steps.send(value)

    def advance(self, piece: int | None) -> None:
        """Run its calls until it waits at a batched call or a prefill piece, or ends."""
        try:
            while self.call is None:
                call = self._send()
                name, args, kwargs = call
                if name in BATCHED or (name == "prefill" and piece and len(args[0]) > piece):
                    self.call = call
                else:
                    self.result = getattr(self.view, name)(*args, **kwargs)
        except StopIteration as end:
            self.generation, self.call = end.value, None
        except BaseException as e:  # noqa: BLE001 (the job's own failure, reported with it)
            self.error, self.call = e, None


class Batch:
    """The schedules of several sequences on one engine, advanced together (the module docstring)."""

    def __init__(self, engine, prefill_piece: int | None = None):
        self.engine = engine
        chunk = getattr(engine, "prefill_chunk", None)
        if prefill_piece is None:
            prefill_piece = None if chunk is None else chunk * max(1, 256 // chunk)
        elif chunk is not None and prefill_piece % chunk:
            raise ValueError(f"prefill_piece={prefill_piece} must be a multiple of the engine's prefill chunk {chunk}")
        self.piece = prefill_piece
        self.jobs: dict[int, Job] = {}
        self.steps = 0

    @property
    def busy(self) -> bool:
        return bool(self.jobs)

    def free_seqs(self) -> list[int]:
        return [s for s in range(self.engine.max_seqs) if s not in self.jobs]

    def add(self, seq: int, steps_fn: Callable, *args, **kwargs) -> Job:
        """Start steps_fn(view of sequence seq, *args, **kwargs) (a method's steps function: decoding/common.py) on
        a free sequence; its checks run now (a bad request raises here, before it joins)."""
        if seq in self.jobs:
            raise ValueError(f"sequence {seq} is in use")
        view = self.engine.sequence(seq)
        job = Job(seq, steps_fn(view, *args, **kwargs), view)
        self.jobs[seq] = job
        return job

    def cancel(self, seq: int) -> None:
        """Stop the job on `seq` between steps; its sequence is free at once (its cache entries are dead)."""
        job = self.jobs.pop(seq, None)
        if job is not None:
            job.steps.close()
            job.view.truncate(0)

    def step(self) -> list[Job]:
        """One step of every job; the jobs that ended (a Generation or an error), which leave the batch."""
        self.steps += 1
        for job in list(self.jobs.values()):
            job.advance(self.piece)
        runs, finals = [], []
        for job in self.jobs.values():
            if job.call is None:
                continue
            name, args, kwargs = job.call
            if name == "run_layers":
                runs.append(job)
            elif name == "final":
                finals.append(job)
            else:  # a prefill in pieces: the next piece, alone (the others wait one piece, not the whole prompt)
                self._prefill_piece(job)
        if runs:
            try:  # every segment is checked before any runs: a failure here is the engine's, and every job's
                self.engine.run_batch([(j.seq, *j.call[1]) for j in runs])
            except Exception as e:  # noqa: BLE001
                for j in runs:
                    j.error = e
            for j in runs:
                j.call = None
                if j.error is None:  # on to its next call: a final joins this step's, anything else waits a step
                    j.advance(self.piece)
                    if j.call is not None and j.call[0] == "final":
                        finals.append(j)
        if finals:
            self._finals(finals)
        ended = [j for j in self.jobs.values() if j.done]
        for j in ended:
            del self.jobs[j.seq]
            if j.error is not None:
                j.view.truncate(0)
        return ended

    def _finals(self, jobs: list[Job]) -> None:
        """The jobs' finals as one engine call; should it fail, one by one (a final changes no state), so that the
        failure goes to the job whose rows it is (a non-finite row of one sequence must not end the others)."""
        try:
            results = self.engine.final_batch([(j.seq, *j.call[1], j.call[2].get("sampling")) for j in jobs])
        except Exception:  # noqa: BLE001
            results = None
        for i, j in enumerate(jobs):
            if results is not None:
                j.result = results[i]
            else:
                try:
                    j.result = j.view.final(*j.call[1], **j.call[2])
                except Exception as e:  # noqa: BLE001
                    j.error = e
            j.call = None

    def _prefill_piece(self, job: Job) -> None:
        tokens = job.call[1][0]
        a = job.prefilled
        b = min(len(tokens), a + self.piece)
        try:
            job.view.prefill(tokens[a:b], start=a)
        except Exception as e:  # noqa: BLE001
            job.error, job.call = e, None
            return
        job.prefilled = b
        if b == len(tokens):
            job.call, job.prefilled = None, 0

    def run(self) -> list[Job]:
        """Step until every job has ended; the jobs in the order they ended."""
        out = []
        while self.jobs:
            out += self.step()
        return out
