import pytest
import torch

from gpt2repro.generation.generate import filter_logits, generate, sample_text
from gpt2repro.generation.sampling import GREEDY, Sampling
from gpt2repro.model.gpt import GPT


@pytest.fixture(scope="module")
def model(tiny_config):
    torch.manual_seed(0)
    return GPT(tiny_config).eval()


@pytest.mark.parametrize("prompt_len,new", [(1, 20), (7, 33), (50, 12)])
def test_kv_cache_greedy_equals_full_recompute(model, prompt_len, new):
    idx = torch.randint(0, 50257, (3, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    cached = generate(model, idx, new, sampling=GREEDY, use_cache=True)
    full = generate(model, idx, new, sampling=GREEDY, use_cache=False)
    assert cached.shape == (3, prompt_len + new)
    assert torch.equal(cached, full)


def test_cached_logits_match_full_forward(model):
    from gpt2repro.model.kvcache import KVCache

    idx = torch.randint(0, 50257, (2, 24))
    cache = KVCache.empty(model.config, 2, "cpu", torch.float32)
    with torch.no_grad():
        first = model.logits(model.hidden(idx[:, :10], cache))
        rest = model.logits(model.hidden(idx[:, 10:], cache))
        full = model(idx)[0]
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)


def test_seeded_sampling_is_reproducible(model):
    idx = torch.randint(0, 50257, (2, 5))
    a = generate(model, idx, 16, sampling=Sampling(top_k=50, seed=7))
    b = generate(model, idx, 16, sampling=Sampling(top_k=50, seed=7))
    c = generate(model, idx, 16, sampling=Sampling(top_k=50, seed=8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    alone = generate(model, idx[1:], 16, sampling=Sampling(top_k=50, seed=8))  # row 1 drawn with seed + 1
    assert torch.equal(generate(model, idx, 16, sampling=Sampling(top_k=50, seed=7))[1], alone[0])


def test_padded_ids_are_never_sampled(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config).eval()
    assert tiny_config.padded_vocab_size > tiny_config.vocab_size
    with torch.no_grad():  # make the padded rows the most likely by far, were they reachable
        model.transformer.wte.weight[tiny_config.vocab_size :] = 50.0
    out = generate(model, torch.zeros(4, 1, dtype=torch.long), 30, sampling=Sampling(seed=0))
    assert out.max().item() < tiny_config.vocab_size
    out = generate(model, torch.zeros(4, 1, dtype=torch.long), 10, sampling=GREEDY)
    assert out.max().item() < tiny_config.vocab_size


def test_generation_stops_at_block_size(model):
    idx = torch.zeros(1, model.config.block_size - 5, dtype=torch.long)
    out = generate(model, idx, 20, sampling=GREEDY)
    assert out.shape[1] == model.config.block_size
    with pytest.raises(ValueError, match="exceeds block_size"):
        generate(model, torch.zeros(1, model.config.block_size + 1, dtype=torch.long), 1, sampling=GREEDY)


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True, True]]
    probs = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    kept = ~torch.isinf(filter_logits(logits, top_p=0.8))
    assert kept.tolist() == [[True, True, False, False, False]]
    assert probs[0] < 0.8 < probs[0] + probs[1]


def test_sample_text_starts_with_prompt(model, enc):
    texts = sample_text(model, "Hello, I'm a language model,", n=2, max_new_tokens=5)
    assert len(texts) == 2 and all(t.startswith("Hello, I'm a language model,") for t in texts)


def test_a_cache_holds_sequences_of_different_lengths_in_reusable_slots(model):
    """A server's batch: slots prefilled one at a time to different lengths, then decoded together,
    give each sequence what it gets alone; a reset slot takes a new sequence; a chat's next turn
    continues its slot without encoding the history again."""
    from gpt2repro.model.kvcache import KVCache

    torch.manual_seed(1)
    a, b = torch.randint(0, 50257, (1, 7)), torch.randint(0, 50257, (1, 12))
    alone = [generate(model, p, 6, sampling=GREEDY)[0, -6:] for p in (a, b)]
    cache = KVCache.empty(model.config, 2, "cpu", torch.float32)
    with torch.no_grad():
        last = [model.logits(model.hidden(p, cache.slot(i))[:, -1]) for i, p in enumerate((a, b))]
        assert cache.lengths.tolist() == [7, 12]
        tokens = torch.cat(last).argmax(-1, keepdim=True)
        out = [tokens]
        for _ in range(5):
            tokens = model.logits(model.hidden(tokens, cache)[:, -1]).argmax(-1, keepdim=True)
            out.append(tokens)
    together = torch.cat(out, 1)
    assert torch.equal(together[0], alone[0]) and torch.equal(together[1], alone[1])
    cache.reset(0)  # slot 0 takes a new sequence while slot 1 keeps its own
    assert cache.lengths.tolist() == [0, 17]
    with torch.no_grad():
        again = model.logits(model.hidden(b, cache.slot(0))[:, -1])
        turn = model.logits(model.hidden(b[:, :3], cache.slot(0))[:, -1])  # a next turn: 3 new tokens
        full = model.logits(model.hidden(torch.cat([b, b[:, :3]], 1))[:, -1])
    torch.testing.assert_close(again, last[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(turn, full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model.hidden(torch.zeros(1, model.config.block_size, dtype=torch.long), cache.slot(1))
