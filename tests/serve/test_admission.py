"""Admission order of the continuous scheduler: highest response ratio next ((steps waited + 1) /
max_tokens) against its closed form, no starvation, fcfs, and the engine admitting in that order."""

import queue
import threading
import time

import pytest
import torch
from transformers import LlamaForCausalLM

import lorakit as lk
from lorakit.generate import SamplingParams
from lorakit.serve.admission import Waiting
from lorakit.serve.engine import Limits, ServeError, engine_from_spec
from lorakit.serve.rows import ClientRow as Row


def _row(max_tokens: int) -> Row:
    return Row([1, 2], None, SamplingParams(max_tokens=max_tokens, temperature=0), lambda e: None)


def _arrive(waiting: Waiting, rows: list[Row], step: int) -> None:
    source = queue.Queue()
    for row in rows:
        source.put(row)
    assert waiting.take(source, step, block=False) is False and source.empty()


def test_shortest_first_among_rows_that_arrive_together_ties_to_the_older():
    waiting = Waiting("shortest")
    rows = [_row(256), _row(4), _row(64), _row(4)]
    _arrive(waiting, rows, step=0)
    assert waiting.pick(1, 0) == [rows[1]]  # the older of the two 4-token rows
    assert waiting.pick(2, 0) == [rows[2], rows[3]]  # returned in arrival order: 4 then 64 by priority
    assert waiting.pick(5, 0) == [rows[0]] and len(waiting) == 0 and waiting.pick(1, 0) == []


@pytest.mark.parametrize("waited, expected", [(62, "short"), (63, "long"), (64, "long")])
def test_a_long_row_overtakes_a_newcomer_once_it_has_waited_its_ratio(waited, expected):
    """A 256-token row that arrived at step 0 against a 4-token row arriving now: (w + 1) / 256 against
    1 / 4, equal at w = 63 (the tie goes to the older row, the long one)."""
    waiting = Waiting("shortest")
    long, short = _row(256), _row(4)
    _arrive(waiting, [long], step=0)
    _arrive(waiting, [short], step=waited)
    assert waiting.pick(1, waited) == [long if expected == "long" else short]


def test_a_long_row_is_not_starved_by_a_stream_of_short_ones():
    """One admission per step, a new 4-token row every step: the 256-token row gets in at step 63
    ((63 + 1) / 256 = 1 / 4, older wins), where fcfs admits it first and shortest-only never would."""
    waiting = Waiting("shortest")
    long = _row(256)
    _arrive(waiting, [long], step=0)
    for step in range(200):
        _arrive(waiting, [_row(4)], step=step)
        if waiting.pick(1, step) == [long]:
            break
    assert step == 63


def test_fcfs_admits_oldest_first_and_cancelled_rows_leave():
    waiting = Waiting("fcfs")
    rows = [_row(256), _row(4), _row(64)]
    _arrive(waiting, rows, step=0)
    rows[1].cancelled.set()
    assert waiting.drop_cancelled() == [rows[1]]
    assert waiting.pick(1, 5) == [rows[0]] and waiting.pick(1, 5) == [rows[2]]


def test_shutdown_marker_stops_taking_and_leaves_later_rows_queued():
    waiting, source, rows = Waiting("shortest"), queue.Queue(), [_row(8), _row(9)]
    for item in (rows[0], None, rows[1]):
        source.put(item)
    assert waiting.take(source, 3, block=True) is True
    assert waiting.rows == [rows[0]] and rows[0].arrival_step == 3 and source.get_nowait() is rows[1]


def test_unknown_policy_is_refused_with_the_choices():
    with pytest.raises(ServeError, match=r"Limits.admission must be one of \('shortest', 'fcfs'\)"):
        Limits(admission="sjf")


@pytest.fixture(scope="module")
def root(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(300)
    lk.inject(model, lk.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False), "alpha")
    lk.save_adapter(model, folder / "alpha", "alpha")
    return folder


def _finish(events: queue.Queue) -> str:
    parts = [events.get(timeout=120)]
    while parts[-1].finish_reason is None:
        parts.append(events.get(timeout=120))
    return "".join(e.text for e in parts)


@pytest.mark.parametrize("policy", ["shortest", "fcfs"])
def test_engine_admits_a_waiting_short_request_before_an_older_long_one(tiny_model_dir, root, policy):
    """One row in flight at most. While the worker is held, a long request and then a short one queue
    behind a first: "shortest" admits the short one next, "fcfs" the long one; every text equals the
    request run alone, and the queued rows are counted as waiting."""
    limits = Limits(max_prompt_tokens=64, max_tokens=200, max_batch_size=1, admission=policy)
    with engine_from_spec(str(tiny_model_dir), {"alpha": root / "alpha"}, name="tiny", limits=limits) as engine:
        jobs = [("first", "alpha", 3), ("a long one", "tiny", 40), ("short", "alpha", 2)]
        refs = [engine.generate(p, m, max_tokens=n, temperature=0).text for p, m, n in jobs]
        sinks = [queue.Queue() for _ in jobs]

        def submit(i):
            prompt, model, n = jobs[i]
            params = SamplingParams(max_tokens=n, temperature=0)
            return engine.submit(engine.encode(prompt), model, params, sinks[i].put)

        with engine._model_lock:  # the worker takes the first row, then waits for the model
            rows = [submit(0)]
            deadline = time.monotonic() + 30
            while engine._queue.qsize() and time.monotonic() < deadline:
                time.sleep(0.001)
            rows += [submit(1), submit(2)]
            while engine.waiting() != 2 and time.monotonic() < deadline:  # the worker may be taking the first
                time.sleep(0.001)
            assert engine.waiting() == 2
        assert [_finish(s) for s in sinks] == refs
        first, long, short = rows
        assert first.admitted_at < min(long.admitted_at, short.admitted_at)
        assert (short.admitted_at < long.admitted_at) == (policy == "shortest")


def test_rows_still_waiting_at_shutdown_get_an_error_and_free_their_adapter(tiny_model_dir, root):
    """close() while rows wait behind a full batch: the running row finishes, the waiting ones (taken off
    the queue into the admission list, not admitted) end with an error naming the shutdown and no longer
    pin their adapter; none is left without a final event."""
    limits = Limits(max_prompt_tokens=64, max_tokens=200, max_batch_size=1)
    engine = engine_from_spec(str(tiny_model_dir), {"alpha": root / "alpha"}, name="tiny", limits=limits).start()
    sinks = [queue.Queue() for _ in range(3)]
    params = SamplingParams(max_tokens=3, temperature=0)
    reference = engine.generate("first", "tiny", max_tokens=3, temperature=0).text
    with engine._model_lock:  # the worker takes the first row, then waits for the model
        engine.submit(engine.encode("first"), "tiny", params, sinks[0].put)
        deadline = time.monotonic() + 30
        while engine._queue.qsize() and time.monotonic() < deadline:
            time.sleep(0.001)
        for sink in sinks[1:]:
            engine.submit(engine.encode("later"), "alpha", params, sink.put)
        assert engine._slots["alpha"].pending == 2
        closing = threading.Thread(target=engine.close)
        closing.start()  # the shutdown marker queues behind the two rows
    closing.join(60)
    assert not closing.is_alive()
    assert _finish(sinks[0]) == reference  # the row in flight finishes
    for sink in sinks[1:]:
        event = sink.get(timeout=5)
        assert (event.finish_reason, event.error) == ("error", "the server is shutting down")
        assert sink.empty()
    assert engine._slots["alpha"].pending == 0 and engine.waiting() == 0
