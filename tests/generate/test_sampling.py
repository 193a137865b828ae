"""Token choice against closed forms: draw frequencies follow softmax(logits / T), top-k and top-p cut the
tail, greedy rows take the argmax, and a row's draws depend only on its own generator."""

from types import SimpleNamespace

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.generate.sampling import SamplingParams, choose_tokens, new_generator

LOGITS = torch.tensor([0.0, 1.0, 2.0, -1.0])


def _draws(params: SamplingParams, count: int = 6000, seed: int = 0) -> torch.Tensor:
    row = SimpleNamespace(params=params, generator=new_generator(seed, torch.device("cpu")), done=False)
    hits = torch.zeros(len(LOGITS))
    for _ in range(count):
        hits[choose_tokens(LOGITS[None], [row])[0][0]] += 1
    return hits / count


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_draws_follow_softmax_at_the_temperature(temperature):
    want = torch.softmax(LOGITS / temperature, dim=0)
    assert (_draws(SamplingParams(temperature=temperature)) - want).abs().max() < 0.025


def test_top_k_and_top_p_keep_only_the_head():
    p = torch.softmax(LOGITS, dim=0)  # 0.237, 0.645 for tokens 1, 2 (after the sort)
    top2 = _draws(SamplingParams(top_k=2))
    assert top2[0] == top2[3] == 0 and abs(top2[2] - p[2] / (p[1] + p[2])) < 0.025
    nucleus = _draws(SamplingParams(top_p=0.8))  # p = 0.644 < 0.8: tokens 2 and 1 are kept, 0 and 3 not
    assert nucleus[0] == nucleus[3] == 0 and nucleus[1] > 0
    assert _draws(SamplingParams(top_p=1e-6), count=200)[2] == 1  # the most likely token only
    assert _draws(SamplingParams(temperature=0), count=50)[2] == 1  # greedy


def test_each_row_draws_from_its_own_generator():
    rows = [SimpleNamespace(params=SamplingParams(temperature=1.0), generator=new_generator(s, torch.device("cpu")),
                            done=False) for s in (1, 2, 1)]
    alone = SimpleNamespace(params=SamplingParams(temperature=1.0), generator=new_generator(1, torch.device("cpu")),
                            done=False)
    batched = [choose_tokens(LOGITS.repeat(3, 1), rows)[0].tolist() for _ in range(30)]
    single = [choose_tokens(LOGITS[None], [alone])[0].item() for _ in range(30)]
    assert [b[0] for b in batched] == [b[2] for b in batched] == single != [b[1] for b in batched]


def test_settings_out_of_range_are_refused_by_name():
    for bad, word in [(dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"),
                      (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"), (dict(stop=[""]), "stop")]:
        with pytest.raises(ConfigError, match=word):
            SamplingParams(**bad)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b") and SamplingParams(stop="x").stop == ("x",)
