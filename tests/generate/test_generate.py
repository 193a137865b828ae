"""generate(): greedy completions equal transformers' generate() (single rows, mixed adapters, n > 1, a
QLoRA base); seeded sampling is reproducible; log-probs equal log_softmax of the model's logits; a model in
training mode comes back as it was."""

import pytest
import torch
from builders import tiny_llama
from transformers import AutoTokenizer, LlamaForCausalLM

import lorakit as lk
from lorakit.generate import Completion, SamplingParams, generate

PROMPTS = ["hello there", "x", "the quick brown fox jumps", "hello there, how are you"]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """The tiny Llama with two random adapters (different ranks and targets), none active."""
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    for seed, (name, r, targets) in enumerate([("a", 2, "all-linear"), ("b", 4, ["q_proj", "v_proj"])]):
        torch.manual_seed(10 + seed)
        lk.inject(model, lk.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False), name)
    lk.set_active(model, [])
    return model


def reference(model, tok, prompt_ids, max_tokens):
    """transformers' greedy generate() for one row, cut after the first eos (which it keeps)."""
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         max_new_tokens=max_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    new = out[0, len(prompt_ids):].tolist()
    return new[:new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new


def test_greedy_rows_equal_transformers_generate(model, tok):
    got = generate(model, tok, PROMPTS, sampling=GREEDY)
    for prompt, (completion,) in zip(PROMPTS, got, strict=True):
        ids = tok(prompt)["input_ids"]
        want = reference(model, tok, ids, GREEDY.max_tokens)
        assert isinstance(completion, Completion) and completion.prompt_ids == ids
        assert completion.token_ids == want
        assert completion.text == tok.decode(want, skip_special_tokens=True)
        assert completion.finish_reason == ("stop" if tok.eos_token_id in want else "length")
        assert completion.logprobs is None


def test_mixed_adapter_rows_and_n_copies_equal_transformers_generate(model, tok):
    adapters = ["a", "b", None, "a"]
    got = generate(model, tok, PROMPTS, n=3, sampling=GREEDY, adapters=adapters, max_rows=5)
    assert [len(g) for g in got] == [3, 3, 3, 3]
    for prompt, name, group in zip(PROMPTS, adapters, got, strict=True):
        lk.set_active(model, [name] if name else [])
        want = reference(model, tok, tok(prompt)["input_ids"], GREEDY.max_tokens)
        assert [c.token_ids for c in group] == [want] * 3  # greedy: all n equal
    lk.set_active(model, [])
    assert lk.active_adapters(model) == []


def test_messages_strings_and_ids_give_the_same_prompt(model, tok):
    messages = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    got = generate(model, tok, [messages, ids], sampling=GREEDY)
    assert got[0][0].prompt_ids == got[1][0].prompt_ids == ids
    assert got[0][0].token_ids == got[1][0].token_ids == reference(model, tok, ids, GREEDY.max_tokens)
    with pytest.raises(lk.ConfigError, match="prompts\\[1\\] is empty"):
        generate(model, tok, ["a", ""])
    with pytest.raises(lk.ConfigError, match="2 adapter names for 1 prompts"):
        generate(model, tok, ["a"], adapters=["a", "b"])
    with pytest.raises(lk.ConfigError, match="context length of 256"):
        generate(model, tok, ["a" * 250], sampling=SamplingParams(max_tokens=10))


def test_seeded_sampling_is_reproducible_and_the_n_rows_differ(model, tok):
    hot = SamplingParams(max_tokens=10, temperature=1.5, top_p=0.95, top_k=40, seed=7)
    first = generate(model, tok, PROMPTS[:2], n=4, sampling=hot, adapters=["a", "b"])
    again = generate(model, tok, PROMPTS[:2], n=4, sampling=hot, adapters=["a", "b"], prefix_sharing=False,
                     max_rows=3)
    assert [[c.token_ids for c in g] for g in first] == [[c.token_ids for c in g] for g in again]
    assert len({tuple(c.token_ids) for c in first[0]}) > 1  # the n completions draw from different seeds
    other = generate(model, tok, PROMPTS[:2], n=4, sampling=SamplingParams(**{**hot.__dict__, "seed": 8}),
                     adapters=["a", "b"])
    assert [[c.token_ids for c in g] for g in other] != [[c.token_ids for c in g] for g in first]


def test_logprobs_are_log_softmax_of_the_models_logits_at_the_chosen_tokens(model, tok):
    """Temperature 1: each sampled token's log-prob equals log_softmax of a full forward over prompt + tokens."""
    sampled = generate(model, tok, PROMPTS[:3], n=2, adapters=["a", None, "b"], logprobs=True,
                       sampling=SamplingParams(max_tokens=8, temperature=1.0, seed=3))
    for name, group in zip(["a", None, "b"], sampled, strict=True):
        lk.set_active(model, [name] if name else [])
        for c in group:
            assert len(c.logprobs) == len(c.token_ids)
            with torch.no_grad():
                logits = model(torch.tensor([c.prompt_ids + c.token_ids])).logits[0].float()  # (T, V)
            start = len(c.prompt_ids) - 1
            want = torch.log_softmax(logits[start:start + len(c.token_ids)], -1)
            want = want.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-5, rtol=0)
    lk.set_active(model, [])


def test_a_model_in_training_mode_comes_back_as_it_was(tok, tiny_model_dir):
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    lk.inject(model, lk.LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.5, init_lora_weights=False))
    model.train()
    model.model.layers[0].eval()  # a module its owner keeps in eval mode stays so
    modes = {n: m.training for n, m in model.named_modules()}
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    model.eval()
    lk.set_active(model, ["default"])
    eval_ref = reference(model, tok, tok("hello")["input_ids"], 8)
    model.train()
    model.model.layers[0].eval()
    got = generate(model, tok, ["hello"], n=2, sampling=SamplingParams(max_tokens=8, temperature=0))
    assert [c.token_ids for c in got[0]] == [eval_ref] * 2  # dropout was off while generating
    assert {n: m.training for n, m in model.named_modules()} == modes
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, (value, grad) in before.items():
        assert torch.equal(after[name], value) and after[name].requires_grad == grad
    loss = model(torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss
    loss.backward()  # the model still trains: nothing generate() left behind is an inference tensor
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_qlora_base_generates_as_transformers_does(tok):
    pytest.importorskip("bitsandbytes")
    from lorakit.testing import char_tokenizer

    char = char_tokenizer()
    model = lk.quantize(tiny_llama(vocab_size=len(char), eos_token_id=char.eos_token_id), "nf4")
    torch.manual_seed(1)
    lk.inject(model, lk.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.train()
    prompts = ["hello", "the quick brown"]
    got = generate(model, char, prompts, n=2, sampling=SamplingParams(max_tokens=6, temperature=0),
                   adapters=["default", None])
    model.eval()
    for prompt, name, group in zip(prompts, ["default", None], got, strict=True):
        lk.set_active(model, [name] if name else [])
        want = reference(model, char, char(prompt)["input_ids"], 6)
        assert [c.token_ids for c in group] == [want, want]


def test_the_core_imports_no_server_machinery():
    """generate/ runs inside a training process: no HTTP framework, no threads or queues of its own."""
    import ast
    from pathlib import Path

    import lorakit.generate

    banned = {"threading", "queue", "asyncio", "fastapi", "starlette", "uvicorn", "concurrent"}
    for path in Path(lorakit.generate.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        assert not {m.split(".")[0] for m in names} & banned, path.name
        relative = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 2}
        assert {m.split(".")[0] for m in relative} <= {"lora", "errors"}, (path.name, relative)


def test_a_sliding_window_cache_is_refused_with_what_to_use(tok):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, sliding_window=8)
    with pytest.raises(lk.ConfigError, match="DynamicSlidingWindowLayer.*model.generate"):
        generate(MistralForCausalLM(cfg), tok, ["hello"])
    with pytest.raises(lk.ConfigError, match="Linear has no transformers config"):
        generate(torch.nn.Linear(2, 2), tok, ["hello"])
