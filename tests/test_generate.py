import pytest
import torch

from gpt2repro.generation.generate import filter_logits, generate, sample_text
from gpt2repro.model.gpt import GPT


@pytest.fixture(scope="module")
def model(tiny_config):
    torch.manual_seed(0)
    return GPT(tiny_config).eval()


@pytest.mark.parametrize("prompt_len,new", [(1, 20), (7, 33), (50, 12)])
def test_kv_cache_greedy_equals_full_recompute(model, prompt_len, new):
    idx = torch.randint(0, 50257, (3, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    cached = generate(model, idx, new, temperature=0, use_cache=True)
    full = generate(model, idx, new, temperature=0, use_cache=False)
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
    a = generate(model, idx, 16, top_k=50, generator=torch.Generator().manual_seed(7))
    b = generate(model, idx, 16, top_k=50, generator=torch.Generator().manual_seed(7))
    c = generate(model, idx, 16, top_k=50, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_padded_ids_are_never_sampled(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config).eval()
    assert tiny_config.padded_vocab_size > tiny_config.vocab_size
    with torch.no_grad():  # make the padded rows the most likely by far, were they reachable
        model.transformer.wte.weight[tiny_config.vocab_size :] = 50.0
    out = generate(model, torch.zeros(4, 1, dtype=torch.long), 30, generator=torch.Generator().manual_seed(0))
    assert out.max().item() < tiny_config.vocab_size
    out = generate(model, torch.zeros(4, 1, dtype=torch.long), 10, temperature=0)
    assert out.max().item() < tiny_config.vocab_size


def test_generation_stops_at_block_size(model):
    idx = torch.zeros(1, model.config.block_size - 5, dtype=torch.long)
    out = generate(model, idx, 20, temperature=0)
    assert out.shape[1] == model.config.block_size
    with pytest.raises(ValueError, match="exceeds block_size"):
        generate(model, torch.zeros(1, model.config.block_size + 1, dtype=torch.long), 1)


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
    alone = [generate(model, p, 6, temperature=0)[0, -6:] for p in (a, b)]
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


def _block_forward(block, x, cache):
    """Block.forward's general path, for a decoding step too."""
    x = x + block.attn(block.ln_1(x), cache, None)
    return x + block.mlp(block.ln_2(x))


@pytest.mark.parametrize("lengths", [(5, 5), (3, 9)])
def test_a_decoding_step_is_op_for_op_the_blocks_forward(model, lengths):
    """Block.decode, the lean path of a one-token step over the cache, gives bit for bit the logits
    and cached keys/values of Block.forward, with slots at one length or at different ones."""
    from unittest import mock

    from gpt2repro.model.gpt import Block
    from gpt2repro.model.kvcache import KVCache

    torch.manual_seed(2)
    prompts = [torch.randint(0, 50257, (1, n)) for n in lengths]
    tok = torch.randint(0, 50257, (2, 1))
    results = []
    for lean in (True, False):
        cache = KVCache.empty(model.config, 2, "cpu", torch.float32)
        plain = mock.patch.object(Block, "decode", _block_forward)
        with torch.no_grad(), mock.MagicMock() if lean else plain:
            for i, p in enumerate(prompts):
                model.hidden(p, cache.slot(i))
            logits = model.logits(model.hidden(tok, cache)[:, -1])
        results.append((logits, cache.k, cache.v, cache.lengths))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_compiled_steps_decode_as_the_eager_steps_in_one_graph_for_every_length(model):
    """The one-token steps compiled whole (generation/compiled.py): the eager steps' logits and
    cached keys/values to fp32 rounding at every step, the same greedy tokens, and one graph for all
    cache lengths (no recompiling per token)."""
    from torch._dynamo.utils import counters

    from gpt2repro.generation.compiled import compiled_steps
    from gpt2repro.model.kvcache import KVCache

    torch.manual_seed(3)
    prompt = torch.randint(0, 50257, (2, 9))
    step = compiled_steps(model)
    caches, tokens, graphs = [], [], []
    with torch.no_grad():
        for compiled in (True, False):
            cache = KVCache.empty(model.config, 2, "cpu", torch.float32)
            logits = model.logits(model.hidden(prompt, cache)[:, -1])
            seen = []
            for _ in range(12):
                tok = logits.argmax(-1, keepdim=True)
                seen.append((tok, logits))
                logits = step(tok, cache) if compiled else model.logits(model.hidden(tok, cache)[:, -1])
                graphs.append(counters["stats"]["unique_graphs"])  # after each step
            caches.append(cache)
            tokens.append(seen)
    assert graphs[1:12] == [graphs[0]] * 11  # lengths 10..20 after the first step: no new graph
    for (tok_c, logits_c), (tok_e, logits_e) in zip(*tokens):
        assert torch.equal(tok_c, tok_e)
        torch.testing.assert_close(logits_c, logits_e, rtol=1e-5, atol=1e-5)
    assert torch.equal(caches[0].lengths, caches[1].lengths)
    torch.testing.assert_close(caches[0].k, caches[1].k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(caches[0].v, caches[1].v, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # generate's option: the same greedy tokens
        assert torch.equal(
            generate(model, prompt, 10, temperature=0, compiled=True),
            generate(model, prompt, 10, temperature=0),
        )


def test_compiled_steps_refuse_what_they_cannot_do_in_one_line(model):
    """Without the cache; with a C++ compiler that does not work (a one-line GenerateError naming
    the cause, not inductor's traceback)."""
    from gpt2repro.generation.sampling import GenerateError

    prompt = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(GenerateError, match="need use_cache=True"):
        generate(model, prompt, 4, temperature=0, compiled=True, use_cache=False)
    odd = GPT(model.config.__class__(**{**vars(model.config), "n_embd": 48, "n_head": 3})).eval()
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        with pytest.raises(
            GenerateError, match="compiling the decoding step failed .*decode without compiling"
        ):
            generate(odd, prompt, 4, temperature=0, compiled=True)


def test_a_compiled_step_needs_every_slot_at_one_length(model):
    from gpt2repro.generation.compiled import compiled_steps
    from gpt2repro.model.kvcache import KVCache

    cache = KVCache.empty(model.config, 2, "cpu", torch.float32)
    cache.lengths[:] = torch.tensor([3, 4])
    with pytest.raises(ValueError, match="every slot at one length"):
        compiled_steps(model)(torch.zeros(2, 1, dtype=torch.long), cache)
    cache.reset()
    with pytest.raises(ValueError, match="every slot at one length"):  # nothing cached yet
        compiled_steps(model)(torch.zeros(2, 1, dtype=torch.long), cache)
