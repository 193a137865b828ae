"""Continuous batching: rows that join and leave mid-generation get exactly what they get alone; a short
request behind a long one is not held back; cancelled rows leave at the next step; the slotted cache."""

import queue
import time

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM, MistralConfig

import lorakit as lk
from lorakit.generate import Row, SamplingParams
from lorakit.generate.continuous import Running
from lorakit.generate.kvcache import SlotCache, kv_bytes_per_token, splice_error
from lorakit.serve.engine import Limits, ServeError, engine_from_spec

LIMITS = dict(max_prompt_tokens=64, max_tokens=200, max_adapters=4, max_batch_size=4)


@pytest.fixture(scope="module")
def root(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    for i, (name, r, targets) in enumerate([("alpha", 2, "all-linear"), ("beta", 4, ["q_proj", "v_proj"])]):
        model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
        torch.manual_seed(200 + i)
        lk.inject(model, lk.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False), name)
        lk.save_adapter(model, folder / name, name)
    return folder


def _engine(model_dir, root, **limits):
    return engine_from_spec(str(model_dir), {"alpha": root / "alpha", "beta": root / "beta"}, name="tiny",
                            limits=Limits(**{**LIMITS, **limits}))


@pytest.fixture(scope="module")
def engine(tiny_model_dir, root):
    with _engine(tiny_model_dir, root) as eng:
        yield eng


# (prompt, adapter, params): greedy and seeded sampling, a stop string, different lengths and adapters
JOBS = [("hello there", "alpha", SamplingParams(max_tokens=30, temperature=0)),
        ("x", "beta", SamplingParams(max_tokens=5, temperature=0)),
        ("the quick brown fox", None, SamplingParams(max_tokens=12, temperature=1.3, seed=7)),
        ("zebra", "beta", SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=3)),
        ("abc", "alpha", SamplingParams(max_tokens=9, temperature=0))]


def _alone(engine, prompt, adapter, params):
    return engine.generate(prompt, adapter, max_tokens=params.max_tokens, temperature=params.temperature,
                           top_p=params.top_p, seed=params.seed).text


def test_rows_joining_and_leaving_mid_generation_equal_their_single_runs(engine):
    """Drive the batch by hand: rows join at steps 0, 3 and 7 and leave as they finish (different
    lengths, adapters, greedy and seeded); each text equals the request run alone."""
    references = [_alone(engine, p, a, s) for p, a, s in JOBS]
    rows = [Row(engine.encode(p), a, s, lambda e: None) for p, a, s in JOBS]
    running = Running(engine.model, engine.tokenizer, engine.eos_ids, engine.pad_id)
    joins = {0: rows[:1], 3: rows[1:3], 7: rows[3:]}
    widths, in_flight = [], []
    with engine._model_lock:
        for step in range(60):
            if step in joins:
                running.admit(joins[step])
            running.drop_done()
            in_flight.append(len(running))
            widths.append(running.kv.width)
            running.step()
            running.drop_done()
    assert all(r.done for r in rows) and len(running) == 0 and running.kv.held_bytes() == 0
    assert [r.text for r in rows] == references
    assert max(in_flight) >= 3  # they really shared steps
    assert min(w for w in widths[8:] if w) < max(widths)  # the cache shrank when long rows left


def test_short_request_behind_a_long_one_is_not_held_back(engine, tiny_model_dir, root):
    """A 3-token request on another adapter, submitted while a 200-token one runs, finishes within a few
    decoding steps (counted, not timed), long before the long one; both equal their single-run texts.
    Window batching, for contrast, finishes it only after the long batch."""
    long_job = ("hello there", "alpha", SamplingParams(max_tokens=200, temperature=0))
    short_job = ("x", "beta", SamplingParams(max_tokens=3, temperature=0))
    refs = [_alone(engine, *long_job), _alone(engine, *short_job)]

    def race(eng):
        long_events, short_events = queue.Queue(), queue.Queue()
        eng.submit(eng.encode(long_job[0]), long_job[1], long_job[2], long_events.put)
        first = long_events.get(timeout=60)  # the long request is generating
        steps_before = eng.stats.steps
        eng.submit(eng.encode(short_job[0]), short_job[1], short_job[2], short_events.put)
        texts = []
        for events in (short_events, long_events):
            parts = [first] if events is long_events else []
            parts.append(events.get(timeout=120))
            while parts[-1].finish_reason is None:
                parts.append(events.get(timeout=120))
            texts.append("".join(e.text for e in parts))
            if events is short_events:
                short_steps = eng.stats.steps - steps_before
        return texts[::-1], short_steps

    (long_text, short_text), steps = race(engine)
    assert [long_text, short_text] == refs
    assert steps <= short_job[2].max_tokens + 3, steps  # its own tokens plus a step or two of admission
    with _engine(tiny_model_dir, root, scheduler="window", batch_window_ms=0) as window:
        (long_w, short_w), steps_w = race(window)
        assert [long_w, short_w] == refs
        assert window.stats.batches == 2  # the short request ran as its own batch, after the long one


def test_cancelled_row_leaves_at_the_next_step_and_frees_its_adapter(engine):
    """What the HTTP layer does when a client disconnects: the row leaves, its adapter can be unloaded."""
    events, path = queue.Queue(), engine._slots["beta"].path
    row = engine.submit(engine.encode("hello"), "beta", SamplingParams(max_tokens=200, temperature=0), events.put)
    events.get(timeout=60)  # running
    assert engine._slots["beta"].pending == 1
    row.cancelled.set()
    deadline = time.monotonic() + 60
    while (engine.stats.running or engine._slots["beta"].pending) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.stats.running == 0 and engine._slots["beta"].pending == 0
    assert len(row.tokens) < 200 and row.finish_reason is None  # stopped early, no final event
    engine.unload_adapter("beta")  # no 409: nothing holds it any more
    engine.load_adapter("beta", path)


def test_unknown_cache_layouts_are_refused_with_the_fix():
    sliding = MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, sliding_window=8)
    assert "--scheduler window" in splice_error(sliding)
    assert splice_error(sliding.__class__(**{**sliding.to_dict(), "sliding_window": None})) is None


def test_slot_cache_pads_joins_and_trims_leaves(tiny_model_dir):
    """keep/add against hand-built tensors, and bytes per token against a real forward's cache."""
    def cache_of(rows, width, fill):
        cache = DynamicCache()
        cache.update(torch.full((rows, 2, width, 4), fill), torch.full((rows, 2, width, 4), -fill), 0)
        return cache

    slots = SlotCache()
    slots.add(cache_of(2, 5, 1.0), torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
    slots.add(cache_of(1, 2, 2.0), torch.tensor([[1, 1]]))
    keys = slots.cache.layers[0].keys
    assert keys.shape == (3, 2, 5, 4) and slots.mask.tolist()[2] == [0, 0, 0, 1, 1]
    assert keys[2, :, :3].abs().sum() == 0 and (keys[2, :, 3:] == 2).all() and (keys[0] == 1).all()
    assert slots.used_tokens() == 11 and slots.held_bytes() == 2 * 3 * 2 * 5 * 4 * 4
    slots.keep([2, 0])  # the full-width row leaves: two columns nobody uses are cut
    assert slots.mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]] and slots.width == 4
    assert (slots.cache.layers[0].keys[0, :, 2:] == 2).all() and (slots.cache.layers[0].values[1] == -1).all()
    slots.keep([])
    assert slots.cache is None and slots.held_bytes() == 0

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    out = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    held = sum(t.numel() * t.element_size() for layer in out.past_key_values.layers for t in (layer.keys, layer.values))
    assert held == 3 * kv_bytes_per_token(model.config, torch.float32)


def test_engine_refuses_long_prompts_by_characters_before_tokenizing(engine):
    calls = []
    real = engine.tokenizer.__class__.__call__

    def spy(self, *args, **kwargs):
        calls.append(len(args[0]))
        return real(self, *args, **kwargs)

    engine.tokenizer.__class__.__call__ = spy
    try:
        with pytest.raises(ServeError, match="5000000 characters"):
            engine.encode("y" * 5_000_000)
        assert calls == []  # never tokenized
        with pytest.raises(ServeError, match="70 tokens"):
            engine.encode("y" * 70)  # within the character bound: tokenized, then refused by count
        assert calls == [70]
    finally:
        engine.tokenizer.__class__.__call__ = real
