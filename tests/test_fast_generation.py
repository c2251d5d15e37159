"""The static-cache engine must decode exactly what transformers' greedy `generate` decodes."""

import pytest
import torch

from scaledown.evaluation.evaluate import tokenize_text_prompts
from scaledown.fast_generation import FLEX_TILES_SUPPORTED, StaticGreedyGenerator, generate_compressed
from scaledown.modeling_scaledown import text_prompt
from scaledown.toy_models import build_encoder

from conftest import DOCUMENTS, QUESTIONS


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_compressed_answers_equal_generate(make_model, arch):
    model = make_model(arch)
    batch = model.input_builder(QUESTIONS, DOCUMENTS)
    expected = model.generate(**batch, max_new_tokens=10)  # (batch, new), padded after EOS
    engine = StaticGreedyGenerator(model.generator)
    fast = generate_compressed(model, batch, engine, max_new_tokens=10)
    assert torch.equal(fast[:, : expected.shape[1]], expected)
    assert (fast[:, expected.shape[1] :] == model.input_builder.generator_pad_id).all()
    again = generate_compressed(model, batch, engine, max_new_tokens=10)  # reuses the cached state of this shape
    assert torch.equal(again, fast)
    assert engine.attention_kernel == "sdpa"  # "auto" times its candidates on CUDA only


@pytest.mark.parametrize("kernel", ["flex", "matmul"])
def test_decode_attention_kernels_answer_as_generate(make_model, kernel):
    model = make_model("mistral")
    config = model.generator.config
    assert config.num_key_value_heads < config.num_attention_heads  # so the grouped decode attention runs
    batch = model.input_builder(QUESTIONS, DOCUMENTS)
    expected = model.generate(**batch, max_new_tokens=10)
    engine = StaticGreedyGenerator(model.generator, decode_attention_kernel=kernel)
    fast = generate_compressed(model, batch, engine, max_new_tokens=10)
    assert torch.equal(fast[:, : expected.shape[1]], expected)


def test_unknown_engine_attention_kernels():
    with pytest.raises(ValueError, match="Unknown decode attention kernel"):
        StaticGreedyGenerator(torch.nn.Linear(2, 2), decode_attention_kernel="flash")
    with pytest.raises(ValueError, match="Unknown suffix attention kernel 'cascade'"):
        StaticGreedyGenerator(torch.nn.Linear(2, 2), suffix_attention_kernel="cascade")


@pytest.mark.parametrize("kv_heads", [2, 4])  # grouped and plain heads
@pytest.mark.parametrize("transposed", [False, True])  # a contiguous query, and transformers' transposed view
def test_suffix_attention_kernels_agree_with_a_reference(kv_heads, transposed):
    from scaledown.fast_generation import SUFFIX_ATTENTION_KERNELS, causal_suffix_attention

    batch, heads, length, prefix, head_dim = 2, 4, 9, 3, 8
    seeded = torch.Generator().manual_seed(0)
    query = torch.randn(batch, heads, length - prefix, head_dim, generator=seeded)
    query = query.transpose(1, 2).contiguous().transpose(1, 2) if transposed else query
    key, value = (torch.randn(batch, kv_heads, length, head_dim, generator=seeded) for _ in range(2))
    slots = torch.arange(length)
    allowed = slots[None, :] <= slots[prefix:, None]  # (rest, length): query i sits at slot prefix + i
    repeated_key, repeated_value = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (key, value))
    scores = (query @ repeated_key.transpose(-1, -2)) * head_dim**-0.5
    want = (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ repeated_value).transpose(1, 2)
    for kernel in SUFFIX_ATTENTION_KERNELS:
        got, _ = causal_suffix_attention(None, query, key, value, allowed[None, None], kernel=kernel)
        assert got.shape == (batch, length - prefix, heads, head_dim) and got.is_contiguous()  # some families .view it
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs the remainder's mask"):
        causal_suffix_attention(None, query, key, value, None, kernel="masked")


def test_prefill_graph_only_for_short_prompts_without_padding():
    engine = StaticGreedyGenerator(torch.nn.Linear(2, 2), prefill_graph_max_tokens=8)
    assert engine._prefill_fits_graph(torch.ones(2, 4, dtype=torch.long))
    assert not engine._prefill_fits_graph(torch.ones(3, 4, dtype=torch.long))  # 12 tokens
    assert not engine._prefill_fits_graph(torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))  # left padding


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("arch", ["llama", "mistral"])  # Mistral's sliding-window cache cannot be captured
def test_prefill_graph_decodes_as_the_eager_prefill(make_model, arch):
    generator = make_model(arch).generator.to("cuda")
    graphed, eager = StaticGreedyGenerator(generator), StaticGreedyGenerator(generator, prefill_graph_max_tokens=0)
    whole = StaticGreedyGenerator(generator, prefill_graph_max_tokens=0, last_layer_on_last_position=False)
    mask = torch.ones(2, 24, dtype=torch.long, device="cuda")
    seeded = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, generator.config.vocab_size, (2, 24), generator=seeded).cuda() for _ in range(3)]
    answers = []
    for ids in prompts:  # the first call captures the prefill, the next two replay it on new prompts
        answers.append(graphed.generate(mask, 8, input_ids=ids))
        assert torch.equal(answers[-1], eager.generate(mask, 8, input_ids=ids))
        assert torch.equal(answers[-1], whole.generate(mask, 8, input_ids=ids))  # the last layer run at every position
    assert eager._state.prefill_graph is None
    if arch == "llama":
        assert isinstance(graphed._state.prefill_graph, torch.cuda.CUDAGraph)  # the replays above used it
    else:  # tried: transformers 5's sliding-window layers copy a CPU tensor in on first use, so it fell back (False)
        assert graphed._state.prefill_graph is not None
    assert not torch.equal(answers[0], answers[1])  # a replay that kept the captured prompt would repeat it
    embeds = generator.get_input_embeddings()(prompts[2])  # same shape, embeddings: captured anew
    assert torch.equal(graphed.generate(mask, 8, inputs_embeds=embeds), answers[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_stacked_projections_under_cuda_graphs(make_model):
    from scaledown.fast_generation import stack_projections

    plain, stacked = (make_model("llama", lora_r=0).generator.to("cuda") for _ in range(2))  # the same weights
    stack_projections(stacked)
    plain_engine, stacked_engine = StaticGreedyGenerator(plain), StaticGreedyGenerator(stacked)
    mask = torch.ones(2, 24, dtype=torch.long, device="cuda")
    seeded = torch.Generator().manual_seed(0)
    for _ in range(3):  # the first call captures the prefill and decode graphs, the next two replay them
        ids = torch.randint(3, plain.config.vocab_size, (2, 24), generator=seeded).cuda()
        want_ids, want_scores = plain_engine.generate(mask, 8, input_ids=ids, return_scores=True)
        got_ids, got_scores = stacked_engine.generate(mask, 8, input_ids=ids, return_scores=True)
        assert torch.equal(got_ids, want_ids)
        torch.testing.assert_close(got_scores, want_scores, atol=1e-4, rtol=1e-4)
    assert isinstance(stacked_engine._state.prefill_graph, torch.cuda.CUDAGraph)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize(
    "levers", ["fused_decode", "stacked,fused_decode", "residual_norms", "residual_norms,fused_decode"]
)
def test_fused_layers_under_cuda_graphs(make_model, levers):
    from scaledown.fast_generation import stack_projections
    from scaledown.fused_layers import fuse_residual_norms

    plain, fused = (make_model("llama", lora_r=0).generator.to("cuda") for _ in range(2))  # the same weights
    if "stacked" in levers:
        stack_projections(fused)
    if "residual_norms" in levers:
        fuse_residual_norms(fused)  # compiled on CUDA
    plain_engine = StaticGreedyGenerator(plain)
    fused_engine = StaticGreedyGenerator(fused, fused_decode="fused_decode" in levers)
    seeded = torch.Generator().manual_seed(0)
    for batch in (2, 2, 2, 3):  # capture, two replays, then a new shape (torch.compile's dynamic batch)
        mask = torch.ones(batch, 24, dtype=torch.long, device="cuda")
        ids = torch.randint(3, plain.config.vocab_size, (batch, 24), generator=seeded).cuda()
        want_ids, want_scores = plain_engine.generate(mask, 8, input_ids=ids, return_scores=True)
        got_ids, got_scores = fused_engine.generate(mask, 8, input_ids=ids, return_scores=True)
        assert torch.equal(got_ids, want_ids)
        torch.testing.assert_close(got_scores, want_scores, atol=1e-4, rtol=1e-4)
    assert isinstance(fused_engine._state.graph, torch.cuda.CUDAGraph)
    assert isinstance(fused_engine._state.prefill_graph, torch.cuda.CUDAGraph)  # 3 x 24 tokens: a captured prefill


def test_overlapped_stream_answers_each_batch_as_alone(make_model):
    from scaledown.fast_generation import generate_compressed_overlapped

    model = make_model()
    batches = [  # same shape, different content: each batch must be answered from its own vectors
        model.input_builder(QUESTIONS, DOCUMENTS),
        model.input_builder(QUESTIONS[::-1], DOCUMENTS[::-1]),
        model.input_builder(QUESTIONS, DOCUMENTS[::-1]),
    ]
    engine = StaticGreedyGenerator(model.generator)
    expected = [generate_compressed(model, batch, engine, max_new_tokens=8, stop_at_eos=False) for batch in batches]
    assert not torch.equal(expected[0], expected[1])
    streamed = generate_compressed_overlapped(model, batches, engine, max_new_tokens=8, stop_at_eos=False)
    assert len(streamed) == 3
    for got, want in zip(streamed, expected):
        assert torch.equal(got, want)


def test_text_prompts_equal_generate_and_eager_attention(make_model):
    model = make_model()
    tokenizer = model.generator_tokenizer
    prompts = [text_prompt(tokenizer, q, docs) for q, docs in zip(QUESTIONS, DOCUMENTS)]
    batch = tokenize_text_prompts(tokenizer, prompts, model.device)  # left-padded to different lengths
    assert (batch["attention_mask"] == 0).any()
    new = 6
    expected = model.generator.generate(
        **batch, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )[:, batch["input_ids"].shape[1] :]
    for implementation in ("sdpa", "eager"):
        model.generator.config._attn_implementation = implementation
        engine = StaticGreedyGenerator(model.generator)
        fast = engine.generate(**batch, max_new_tokens=new, pad_token_id=tokenizer.pad_token_id)
        assert fast.shape == (len(QUESTIONS), new)
        # min_new_tokens forbids EOS; the engine without eos_token_id never stops: same steps, same argmax
        # except where generate masked an EOS argmax.
        keep = (fast != tokenizer.eos_token_id).cumprod(-1).bool()
        assert torch.equal(fast[keep], expected[keep])


def test_shared_prefix_length_and_prefix_first_layout():
    from scaledown.fast_generation import prefix_first_layout, shared_prefix_length

    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [5, 6, 7, 9, 1, 2], [0, 5, 6, 7, 3, 4]])  # left padded with 0
    mask = (ids != 0).long()
    mask[1] = 1
    assert shared_prefix_length(ids, mask) == 3  # 5 6 7
    assert shared_prefix_length(ids[:1], mask[:1]) == 0  # one row: nothing to share
    assert shared_prefix_length(ids[[0, 0]], mask[[0, 0]]) == 3  # equal rows still keep a token of their own
    embeds = torch.nn.functional.one_hot(ids, 10).float()  # (batch, len, hidden): equal vectors are equal tokens
    assert shared_prefix_length(embeds, mask) == 3

    laid, laid_mask = prefix_first_layout(ids, mask, 3)
    assert laid[:, :3].tolist() == [[5, 6, 7]] * 3
    assert laid_mask.tolist() == [[1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1]]
    assert laid[laid_mask.bool()].tolist() == ids[mask.bool()].tolist()  # each row's tokens, in their order
    laid_embeds, _ = prefix_first_layout(embeds, mask, 3)
    assert torch.equal(laid_embeds, torch.nn.functional.one_hot(laid, 10).float())


def prompt_cases(model) -> list[dict]:
    """Three batches of 3 prompts for the engine: left-padded text, text without padding whose first 7 tokens are
    equal, and compressed prompts (input embeddings, left-padded)."""
    tokenizer = model.generator_tokenizer
    prompts = [text_prompt(tokenizer, q, docs) for q, docs in zip(QUESTIONS, DOCUMENTS)]
    padded = tokenize_text_prompts(tokenizer, prompts, model.device)
    assert (padded["attention_mask"] == 0).any()
    seeded = torch.Generator().manual_seed(0)
    unpadded_ids = torch.randint(3, model.generator.config.vocab_size, (3, 20), generator=seeded)
    unpadded_ids[:, :7] = unpadded_ids[0, :7]
    compressed = model.input_builder(QUESTIONS, DOCUMENTS)
    with torch.no_grad():
        vectors, _ = model.compress_tensors(compressed["compressor_input_ids"], compressed["compressor_attention_mask"])
        embeds = model.embed_generator_inputs(compressed["input_ids"], vectors.to(model.generator.dtype))
    return [
        dict(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]),
        dict(input_ids=unpadded_ids, attention_mask=torch.ones_like(unpadded_ids)),
        dict(inputs_embeds=embeds, attention_mask=compressed["attention_mask"]),
    ]


@pytest.mark.parametrize(
    "arch,suffix_kernel", [("llama", "padded"), ("mistral", "masked"), ("qwen2", "auto"), ("qwen2", "padded-bshd")]
)
def test_shared_prefix_prefill_decodes_as_the_plain_prefill(make_model, arch, suffix_kernel):
    model = make_model(arch)
    model.generator.float()  # float32: the split prefill must give the same logits, not only the same argmax
    cases = prompt_cases(model)
    for implementation in ("sdpa", "eager"):
        model.generator.config._attn_implementation = implementation
        plain = StaticGreedyGenerator(model.generator, shared_prefix_min_tokens=None)
        shared = StaticGreedyGenerator(
            model.generator, shared_prefix_min_tokens=1, suffix_attention_kernel=suffix_kernel
        )
        for case in cases:
            want_ids, want_scores = plain.generate(max_new_tokens=6, return_scores=True, **case)
            got_ids, got_scores = shared.generate(max_new_tokens=6, return_scores=True, **case)
            assert plain.last_shared_prefix == 0 and plain.last_suffix_attention is None
            assert shared.last_shared_prefix >= 7  # the chat template's opening, or the 7 tokens made equal
            if case["attention_mask"].all() and implementation == "sdpa":  # SDPA rows without padding: the kernel
                assert shared.last_suffix_attention == ("padded" if suffix_kernel == "auto" else suffix_kernel, None)
            else:  # padded rows and eager attention keep transformers' own path under the mask
                assert shared.last_suffix_attention is None
            assert torch.equal(got_ids, want_ids)
            torch.testing.assert_close(got_scores, want_scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_prefill_runs_the_last_layer_on_the_last_position_only(make_model, arch):
    model = make_model(arch)
    model.generator.float()  # float32: the same logits, not only the same argmax
    mlp_calls = []  # (batch, positions) of each call of the last layer's MLP
    last_layer = model.generator.get_decoder().layers[-1]
    last_layer.mlp.register_forward_pre_hook(lambda module, args: mlp_calls.append(tuple(args[0].shape[:2])))

    def run(engine, case):
        mlp_calls.clear()
        ids, scores = engine.generate(max_new_tokens=4, return_scores=True, **case)
        return ids, scores, {positions for batch, positions in mlp_calls if batch == 3}  # the prefix runs as 1 row

    # SDPA after a shared prefix (the suffix kernels on rows without padding), eager attention in the plain prefill
    for implementation, shared_prefix in (("sdpa", 1), ("eager", None)):
        model.generator.config._attn_implementation = implementation
        options = dict(shared_prefix_min_tokens=shared_prefix)
        whole = StaticGreedyGenerator(model.generator, last_layer_on_last_position=False, **options)
        last = StaticGreedyGenerator(model.generator, **options)
        for case in prompt_cases(model):
            want_ids, want_scores, whole_positions = run(whole, case)
            got_ids, got_scores, last_positions = run(last, case)
            assert max(whole_positions) > 1 and last_positions == {1}
            assert torch.equal(got_ids, want_ids)
            torch.testing.assert_close(got_scores, want_scores, atol=1e-5, rtol=1e-5)


def test_last_position_prefill_only_where_exact(make_model):
    from scaledown.fast_generation import _last_layer_on_last_position

    model = make_model("mistral")
    mlp_positions = []
    model.generator.get_decoder().layers[-1].mlp.register_forward_pre_hook(
        lambda module, args: mlp_positions.append(args[0].shape[1])
    )
    ids = torch.randint(3, model.generator.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    for window, positions in ((None, 1), (8, 20)):  # a window shorter than the prompt: the cache would drop keys
        model.generator.config.sliding_window = window
        mlp_positions.clear()
        with torch.no_grad(), _last_layer_on_last_position(model.generator) as engaged:
            assert engaged
            model.generator(input_ids=ids, use_cache=True, logits_to_keep=1)
        assert mlp_positions == [positions]
    model.generator.config._attn_implementation = "flex_attention"  # its block masks have no last row to take
    with _last_layer_on_last_position(model.generator) as engaged:
        assert not engaged
    model.generator.config._attn_implementation = "sdpa"
    model.generator.config.model_type = "olmo"  # Llama-shaped layers whose keys are clipped: not on the list
    with _last_layer_on_last_position(model.generator) as engaged:
        assert not engaged
    with _last_layer_on_last_position(torch.nn.Linear(2, 2)) as engaged:  # no decoder layers to find
        assert not engaged


def _engine_without_a_model(**options) -> StaticGreedyGenerator:
    """An engine whose routing decisions can be asked without running a model: an SDPA config and nothing else."""
    engine = StaticGreedyGenerator(torch.nn.Linear(2, 2), **options)
    engine.generator.config = type("Config", (), {"_attn_implementation": "sdpa"})()
    return engine


def test_shared_prefix_only_where_it_pays():
    engine = _engine_without_a_model(shared_prefix_min_tokens=12)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 8], [1, 2, 3, 4, 5, 6, 9]])
    mask = torch.ones_like(ids)
    assert engine._prefix_to_share(ids, mask, total_len=20) == 6  # spares 2 rows x 6 tokens
    assert engine._prefix_to_share(ids[:2], mask[:2], total_len=20) == 0  # 1 x 6 < 12
    engine.shared_prefix_min_fraction = 0.9
    assert engine._prefix_to_share(ids, mask, total_len=20) == 0  # 6 of 7 prompt tokens < 0.9
    engine.shared_prefix_min_fraction = 0.05  # back to a prefix that pays, so that only the window below refuses it
    assert engine._prefix_to_share(ids, mask, total_len=20) == 6
    engine.generator.config.sliding_window = 16  # the remainder's mask would ignore a window the answer passes
    assert engine._prefix_to_share(ids, mask, total_len=20) == 0


def test_a_prompt_the_prefill_graph_takes_never_shares():
    """Captured or not: where capture failed, every call of the shape still runs the same (plain) prefill."""
    from types import SimpleNamespace

    engine = _engine_without_a_model(shared_prefix_min_tokens=1, prefill_graph_max_tokens=64)
    ids = torch.cat([torch.arange(6).expand(4, -1), torch.arange(4)[:, None] + 10], dim=1)  # (4, 7): 6 shared
    mask = torch.ones_like(ids)
    for captured, graphed in ((None, True), (False, False)):  # not yet captured; capture failed
        route = engine._prefill_route(SimpleNamespace(prefill_graph=captured), ids, mask, True, total_len=12)
        assert route == (graphed, 0)
    assert engine._prefill_route(SimpleNamespace(prefill_graph=None), ids, mask, False, total_len=12) == (False, 6)
    engine.prefill_graph_max_tokens = 8  # 28 tokens: too large for the graph, so it shares
    assert engine._prefill_route(SimpleNamespace(prefill_graph=None), ids, mask, True, total_len=12) == (False, 6)


@pytest.mark.parametrize("batch,shared", [(128, 32), (65, 32), (64, 0), (32, 0)])
def test_default_sharing_at_the_compressed_prompt_shape(batch, shared):
    """The bench's compressed prompt: 254 tokens opening with 32 shared ones. By default batch 128 spares 127 x 32
    tokens and shares, as does batch 65 (64 x 32 = SHARED_PREFIX_MIN_TOKENS); batch 64 spares 2,016, under it, and
    batch 32 (measured slower when sharing) far under it."""
    engine = _engine_without_a_model()
    opening = torch.arange(32).expand(batch, -1)
    ids = torch.cat([opening, torch.arange(batch)[:, None] + 100, torch.zeros(batch, 221, dtype=torch.long)], dim=1)
    assert engine._prefix_to_share(ids, torch.ones_like(ids), total_len=286) == shared


def test_bad_calls_raise():
    engine = StaticGreedyGenerator(torch.nn.Linear(2, 2))
    engine.generator.config = type("Config", (), {"sliding_window": 4})()
    mask = torch.ones(1, 3, dtype=torch.long)
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        engine.generate(attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate(attention_mask=mask, max_new_tokens=0, input_ids=ids)
    with pytest.raises(ValueError, match="sliding window of 4 positions, shorter than this call's prompt and answer"):
        engine.generate(attention_mask=mask, max_new_tokens=2, input_ids=ids)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_shared_query_prefix_compresses_exactly(make_model, arch):
    from scaledown.fast_generation import compress_sharing_queries

    model = make_model(arch, enable_reranking=True)
    questions = ["Who wrote Hamlet and when?", "Where?", "Where?", "What is the capital of France?"]
    documents = [DOCUMENTS[0], ["Paris is on the Seine."], [], ["The fox jumps.", "Marie Curie was born in Warsaw."]]
    batch = model.input_builder.compressor_inputs(questions, documents, return_query_lengths=True)
    mlp_calls = []  # (rows, positions) of each call of the compressor's last MLP
    model.compressor.layers[-1].mlp.register_forward_pre_hook(lambda module, a: mlp_calls.append(a[0].shape[:2]))
    for implementation in ("sdpa", "eager"):
        model.compressor.config._attn_implementation = implementation
        expected, expected_scores = model.compress_tensors(
            batch["compressor_input_ids"], batch["compressor_attention_mask"]
        )
        mlp_calls.clear()
        shared, scores = compress_sharing_queries(model, **batch)
        # the query prefix once per question (3 distinct), then the last layer at the 8 memory rows and RR alone
        assert [tuple(call) for call in mlp_calls] == [(3, int(batch["compressor_query_lengths"].max())), (6, 9)]
        assert shared.shape == expected.shape == (6, 8, model.new_token_embeddings.embedding_dim)
        torch.testing.assert_close(shared, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(scores, expected_scores, atol=1e-5, rtol=1e-4)
    if arch == "mistral":  # a window shorter than prefix and suffix would count the gaps between them: plain pass
        model.compressor.config.sliding_window = 12
        expected, expected_scores = model.compress_tensors(
            batch["compressor_input_ids"], batch["compressor_attention_mask"]
        )
        shared, scores = compress_sharing_queries(model, **batch)
        torch.testing.assert_close(shared, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(scores, expected_scores, atol=1e-5, rtol=1e-4)
        model.compressor.config.sliding_window = None

    plain = model.input_builder(questions, documents)
    expected_tokens = model.generate(**plain, max_new_tokens=6)
    sharing = model.input_builder(questions, documents, return_query_lengths=True)
    assert torch.equal(sharing["compressor_query_lengths"], batch["compressor_query_lengths"])
    fast = generate_compressed(model, sharing, StaticGreedyGenerator(model.generator), max_new_tokens=6)
    assert torch.equal(fast[:, : expected_tokens.shape[1]], expected_tokens)


def test_shared_query_prefix_needs_a_causal_compressor(make_model, modernbert_dir):
    from scaledown.fast_generation import compress_sharing_queries

    model = make_model(compressor_type="modernbert", compressor_name_or_path=modernbert_dir)
    batch = model.input_builder.compressor_inputs(QUESTIONS, DOCUMENTS, return_query_lengths=True)
    with pytest.raises(ValueError, match="causal"):
        compress_sharing_queries(model, **batch)


@pytest.fixture(scope="module")
def narrow_window_modernberts(tmp_path_factory, encoder_tokenizer):
    """Tiny ModernBERTs whose local layers see 4 positions either side, so that the window cuts the test rows:
    2 layers end on a local one, 4 on a global one."""
    root = tmp_path_factory.mktemp("narrow-modernbert")
    return {
        last: build_encoder(str(root / last), encoder_tokenizer, num_layers=layers, local_attention=8)
        for last, layers in (("local", 2), ("global", 4))
    }


@pytest.mark.parametrize("last_layer", ["local", "global"])
@pytest.mark.parametrize("attention", ["sdpa", "eager", "flex_attention"])
def test_modernbert_last_layer_on_memory_rows_equals_the_full_pass(
    make_model, narrow_window_modernberts, last_layer, attention
):
    from scaledown.fast_generation import compress_batch, reads_memory_rows_only

    encoder_path = narrow_window_modernberts[last_layer]
    model = make_model(compressor_type="modernbert", compressor_name_or_path=encoder_path, enable_reranking=True)
    if not reads_memory_rows_only(model):
        pytest.skip("transformers 4's ModernBERT attention computes its own rotary embeddings: plain compression")
    model.compressor.config._attn_implementation = attention
    assert model.compressor.config.layer_types[-1] == f"{'full' if last_layer == 'global' else 'sliding'}_attention"
    batch = model.input_builder(QUESTIONS, DOCUMENTS)
    lengths = batch["compressor_attention_mask"].sum(-1)
    assert lengths.min() < lengths.max() and lengths.min() > 2 * 4 + 1  # padded rows, longer than the window
    with torch.no_grad():
        expected, expected_scores = model.compress_tensors(
            batch["compressor_input_ids"], batch["compressor_attention_mask"]
        )
    vectors, scores = compress_batch(model, batch)
    assert vectors.shape == expected.shape == (4, 8, model.new_token_embeddings.embedding_dim)  # 4 documents in all
    torch.testing.assert_close(vectors, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scores, expected_scores, atol=1e-5, rtol=1e-4)


def test_grouped_decode_attention_equals_repeated_heads():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from scaledown.fast_generation import grouped_decode_attention

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 4, True
    query = torch.randn(3, 8, 1, 16)  # 8 query heads over 2 key/value heads
    key, value = torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16)
    mask = torch.rand(3, 1, 1, 10) > 0.3
    mask[..., 0] = True  # no row fully masked
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    grouped, _ = grouped_decode_attention(module, query, key, value, mask, scaling=0.25)
    assert grouped.shape == expected.shape == (3, 1, 8, 16)
    torch.testing.assert_close(grouped, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["sdpa", "math", "matmul", "flex"])  # cudnn and efficient exist on CUDA only
def test_decode_attention_kernels_agree(kernel):
    from scaledown.fast_generation import grouped_decode_attention

    torch.manual_seed(0)
    query, key, value = torch.randn(2, 8, 1, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    mask[0, ..., :5] = False  # left padding of the first row
    mask[..., -3:] = False  # slots not written yet
    scores = torch.einsum("bgqd,bgkd->bgqk", query.reshape(2, 2, 4, 16), key) * 0.25
    expected = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ value  # (2, 2, 4, 16)
    output, _ = grouped_decode_attention(None, query, key, value, mask, scaling=0.25, kernel=kernel)
    torch.testing.assert_close(output, expected.reshape(2, 1, 8, 16), atol=1e-5, rtol=1e-5)


def test_unknown_decode_attention_kernel():
    from scaledown.fast_generation import grouped_decode_attention

    query, key = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="Unknown decode attention kernel 'flash'"):
        grouped_decode_attention(None, query, key, key, torch.ones(1, 1, 1, 3, dtype=torch.bool), kernel="flash")


@pytest.fixture
def restore_rotary(monkeypatch):
    """Compiling replaces Llama's module-level rotary function for the whole process: put it back afterwards."""
    from transformers.models.llama import modeling_llama

    from scaledown.fast_generation import ROTARY_FUNCTION

    monkeypatch.setattr(modeling_llama, ROTARY_FUNCTION, getattr(modeling_llama, ROTARY_FUNCTION))
    return modeling_llama


@pytest.mark.parametrize("compressor", ["n_layers", "modernbert"])
def test_compiled_compressor_gives_the_same_vectors(make_model, narrow_window_modernberts, restore_rotary, compressor):
    from scaledown.fast_generation import compile_compressor, compress_batch, reads_memory_rows_only

    if compressor == "modernbert":  # its last layer local, with a window that cuts the rows
        encoder = narrow_window_modernberts["local"]
        model = make_model(compressor_type="modernbert", compressor_name_or_path=encoder, enable_reranking=True)
    else:
        model = make_model(enable_reranking=True)
    eager = model.compress(QUESTIONS[:2], DOCUMENTS[:2])
    batch = model.input_builder(QUESTIONS[:2], DOCUMENTS[:2], return_query_lengths=compressor == "n_layers")
    eager_fast = compress_batch(model, batch)  # the fast path's own way: query sharing, or memory rows
    names = list(model.state_dict())
    what = compile_compressor(model)
    if compressor == "modernbert" and reads_memory_rows_only(model):
        assert what == "the whole encoder, and its pass ending on the memory rows"
    elif compressor == "modernbert":
        assert what == "the whole encoder"
    else:  # 2 layers, no final norm
        assert what == "6 norm and MLP blocks, rotary embedding of modeling_llama"
    compiled = model.compress(QUESTIONS[:2], DOCUMENTS[:2])
    assert list(model.state_dict()) == names  # checkpoints saved after compiling load as before
    for field in ("embeddings", "rerank_scores"):
        for before, after in zip(getattr(eager, field), getattr(compiled, field)):
            torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    for before, after in zip(eager_fast, compress_batch(model, batch)):  # vectors, rerank scores
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_compiled_generator_decodes_the_same_tokens(make_model, restore_rotary):
    from scaledown.fast_generation import ROTARY_FUNCTION, compile_elementwise_work

    model = make_model()
    original_rotary = getattr(restore_rotary, ROTARY_FUNCTION)
    batch = model.input_builder(QUESTIONS, DOCUMENTS)
    engine = StaticGreedyGenerator(model.generator)
    eager, eager_scores = generate_compressed(model, batch, engine, max_new_tokens=6, return_scores=True)
    blocks = 3 * model.generator.config.num_hidden_layers + 1  # two norms and an MLP a layer, the final norm
    assert compile_elementwise_work(model.generator) == f"{blocks} norm and MLP blocks, rotary embedding of modeling_llama"
    rotary = getattr(restore_rotary, ROTARY_FUNCTION)
    assert rotary is not original_rotary
    compile_elementwise_work(model.generator)  # a second call does not wrap the compiled rotary again
    assert getattr(restore_rotary, ROTARY_FUNCTION) is rotary
    compiled, compiled_scores = generate_compressed(model, batch, engine, max_new_tokens=6, return_scores=True)
    assert torch.equal(compiled, eager)
    torch.testing.assert_close(compiled_scores, eager_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(
    not FLEX_TILES_SUPPORTED,
    reason="transformers 4's ModernBERT builds its own masks and has no flex attention; the tiles need transformers 5",
)
def test_flex_attention_block_size_keeps_transformers_mask():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sliding_window_bidirectional_mask_function

    from scaledown.fast_generation import flex_attention_with_block_size

    name = flex_attention_with_block_size("flex_attention_block16")  # 16 x 16 tiles
    padding = torch.ones(2, 64, dtype=torch.bool)  # as transformers hands it to mask functions
    padding[1, 50:] = False
    arguments = dict(
        batch_size=2,
        q_length=64,
        kv_length=64,
        mask_function=sliding_window_bidirectional_mask_function(4),
        attention_mask=padding,
        device="cpu",
    )
    default = ALL_MASK_ATTENTION_FUNCTIONS["flex_attention"](**arguments)
    tiled = ALL_MASK_ATTENTION_FUNCTIONS[name](**arguments)
    assert default.BLOCK_SIZE == (128, 128) and tiled.BLOCK_SIZE == (16, 16)
    # the band |i - j| <= 4 touches 10 of the 4 x 4 tiles of 16 positions: the other 6 are skipped
    assert tiled.to_dense()[0, 0].sum().item() == 10
    narrow = ALL_MASK_ATTENTION_FUNCTIONS[flex_attention_with_block_size("flex_attention_block32x16")](**arguments)
    assert narrow.BLOCK_SIZE == (32, 16) and narrow.to_dense()[0, 0].sum().item() == 6  # of 2 x 4

    def allowed(mask, row, query_index):
        index = lambda value: torch.tensor(value)  # noqa: E731
        return [bool(mask.mask_mod(index(row), index(0), index(query_index), index(key))) for key in range(64)]

    for row in range(2):
        for query_index in (0, 20, 47):
            assert allowed(tiled, row, query_index) == allowed(default, row, query_index)
            assert sum(allowed(tiled, row, query_index)) <= 9
    assert allowed(tiled, 0, 47)[48:52] == [True] * 4
    assert allowed(tiled, 1, 47)[48:52] == [True, True, False, False]  # padding stays masked


def test_flex_attention_block_size_rejects_other_names():
    from scaledown.fast_generation import flex_attention_with_block_size

    bad_names = ("flex_attention_block", "flex_attention_block64y32", "flex_attention_block8", "flex_attention_block64x8")
    for name in bad_names:
        with pytest.raises(ValueError, match="flex_attention_block64x32"):
            flex_attention_with_block_size(name)


def test_compile_mode_reaches_every_norm_and_mlp_block(make_model, monkeypatch):
    from scaledown.fast_generation import compile_elementwise_work

    modes = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **options: modes.append(options.get("mode")))
    generator = make_model("llama").generator
    compile_elementwise_work(generator, mode="max-autotune-no-cudagraphs")
    layers = len(generator.get_decoder().layers)
    assert modes == ["max-autotune-no-cudagraphs"] * len(modes) and len(modes) == 3 * layers + 1  # 2 norms + MLP, final


class _LinearCalls(torch.overrides.TorchFunctionMode):
    """Counts `F.linear` calls and collects their products' output widths."""

    def __init__(self):
        super().__init__()
        self.calls, self.widths = 0, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            self.calls += 1
            self.widths.add(args[1].shape[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])  # qwen2: query, key and value biases
def test_stacked_projections_answer_as_the_separate_ones(make_model, arch):
    from scaledown.fast_generation import ELEMENTWISE_BLOCKS, compress_batch, stack_projections

    model = make_model(arch, lora_r=0, enable_reranking=True).float()
    generator, config = model.generator, model.generator.config
    questions, documents = ["Who wrote Hamlet and when?", "Where?"], [DOCUMENTS[0], ["Paris is on the Seine."]]
    batch = model.input_builder(questions, documents, return_query_lengths=True)
    cases = prompt_cases(model)
    engines = [StaticGreedyGenerator(generator, shared_prefix_min_tokens=shared) for shared in (None, 1)]

    def outputs():
        vectors, scores = compress_batch(model, batch)  # the shared query prefix and the last layer on read rows
        answers = [engine.generate(max_new_tokens=5, return_scores=True, **c) for engine in engines for c in cases]
        return vectors, scores, answers

    def linear_calls_of_a_forward() -> _LinearCalls:
        with torch.no_grad(), _LinearCalls() as calls:
            generator(input_ids=cases[1]["input_ids"])
        return calls

    before, calls_before = outputs(), linear_calls_of_a_forward()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    layers = config.num_hidden_layers + model.config.num_compressor_layers
    assert stack_projections(model) == (
        f"query, key and value products of {layers} attentions, gate and up products of {layers} MLPs"
    )
    after, calls_after = outputs(), linear_calls_of_a_forward()

    # 7 products a layer (q, k, v, o, gate, up, down) and the LM head, now 4 a layer, two of them stacked
    layer_products = (calls_before.calls - 1, calls_after.calls - 1)
    assert layer_products == (7 * config.num_hidden_layers, 4 * config.num_hidden_layers)
    head_dim = generator.get_decoder().layers[0].self_attn.head_dim
    query_key_value = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    stacked_widths = {2 * config.intermediate_size, query_key_value}
    assert stacked_widths <= calls_after.widths and not stacked_widths & calls_before.widths
    assert model.state_dict().keys() == state.keys()  # checkpoints and adapters keep their names
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    mlp = generator.get_decoder().layers[0].mlp
    assert mlp.gate_proj.weight.data_ptr() == mlp.gate_up_weight.data_ptr()  # each weight held once
    assert type(mlp).__name__.endswith(ELEMENTWISE_BLOCKS)  # what compile_elementwise_work compiles
    for got, want in zip(after[:2], before[:2]):  # memory vectors, rerank scores
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for (got_ids, got_scores), (want_ids, want_scores) in zip(after[2], before[2]):
        assert torch.equal(got_ids, want_ids)
        torch.testing.assert_close(got_scores, want_scores, atol=1e-5, rtol=1e-4)
    assert engines[1].last_shared_prefix > 0  # the suffix kernels and the last-layer hook ran on stacked layers
    assert stack_projections(model).endswith("of 0 attentions, gate and up products of 0 MLPs")


def test_stacking_leaves_lora_wrapped_projections(make_model):
    from scaledown.fast_generation import StackedProjection, stack_projections

    model = make_model("llama", lora_target_modules=["q_proj", "up_proj"])  # LoRA on the generator only
    generator_layers, compressor_layers = model.generator.config.num_hidden_layers, model.config.num_compressor_layers
    assert stack_projections(model) == (
        f"query, key and value products of {compressor_layers} attentions, "
        f"gate and up products of {compressor_layers} MLPs"
    )
    layer = model.generator.get_decoder().layers[0]
    assert not isinstance(layer.self_attn.k_proj, StackedProjection) and not hasattr(layer.mlp, "gate_up_weight")
    assert generator_layers > 0

    model = make_model("llama", lora_r=0)
    model.generator.get_decoder().layers[0].self_attn.k_proj.double()  # weights of two dtypes: not one product
    said = stack_projections(model.generator)
    assert said.startswith(f"query, key and value products of {generator_layers - 1} attentions")


def test_decode_steps_write_the_cache_at_the_engines_slot(make_model, monkeypatch):
    from transformers.cache_utils import StaticLayer

    model = make_model("llama")
    batch = model.input_builder(QUESTIONS, DOCUMENTS)
    expected = model.generate(**batch, max_new_tokens=6)
    own_updates = []  # the layers' own update: the prefill's copy into the static cache only
    original = StaticLayer.update

    def counted(layer, *args, **kwargs):
        own_updates.append(layer)
        return original(layer, *args, **kwargs)

    monkeypatch.setattr(StaticLayer, "update", counted)
    engine = StaticGreedyGenerator(model.generator)
    fast = generate_compressed(model, batch, engine, max_new_tokens=6)
    assert torch.equal(fast[:, : expected.shape[1]], expected)
    assert len(own_updates) == model.generator.config.num_hidden_layers  # not once more per decode step
    assert all("update" not in vars(layer) for layer in engine._state.cache.layers)  # the layers' own method again


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])  # qwen2: query, key and value biases
def test_fused_decode_steps_answer_as_the_generators_forward(make_model, arch):
    from scaledown.fast_generation import stack_projections

    model = make_model(arch, lora_r=0)
    model.generator.float()  # float32: the same logits, not only the same argmax
    cases = prompt_cases(model)  # padded text, a shared opening (prefilled apart below), compressed prompts
    plain = StaticGreedyGenerator(model.generator, shared_prefix_min_tokens=1)
    wanted = [plain.generate(max_new_tokens=6, return_scores=True, **case) for case in cases]
    forwards = []  # decode steps that went through the generator's forward
    model.generator.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(kwargs), with_kwargs=True)
    for stacked in (False, True):
        if stacked:
            stack_projections(model.generator)
        fused = StaticGreedyGenerator(model.generator, shared_prefix_min_tokens=1, fused_decode=True)
        for case, (want_ids, want_scores) in zip(cases, wanted):
            forwards.clear()
            got_ids, got_scores = fused.generate(max_new_tokens=6, return_scores=True, **case)
            assert torch.equal(got_ids, want_ids)
            torch.testing.assert_close(got_scores, want_scores, atol=1e-5, rtol=1e-5)
            steps = [call for call in forwards if call.get("input_ids") is not None and call["input_ids"].shape[1] == 1]
            assert forwards and not steps  # the prefill went through the generator's forward, no decode step did


def test_fused_decode_compiles_once_for_every_layer(make_model):
    from scaledown.fused_layers import FusedDecode

    model = make_model("mistral", lora_r=0)
    model.generator.float()
    batch = model.input_builder(QUESTIONS, DOCUMENTS)
    want_ids, want_scores = generate_compressed(
        model, batch, StaticGreedyGenerator(model.generator), max_new_tokens=5, return_scores=True
    )
    engine = StaticGreedyGenerator(model.generator, fused_decode=True)
    engine._fused = FusedDecode(model.generator, use_compile=True)  # compiled on CPU too (on CUDA by default)
    torch._dynamo.utils.counters.clear()
    got_ids, got_scores = generate_compressed(model, batch, engine, max_new_tokens=5, return_scores=True)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_scores, want_scores, atol=1e-5, rtol=1e-4)
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"]
    # the first layer's input (no residual yet), every other layer's input, every layer's output, the head
    assert counters["stats"]["unique_graphs"] == 4 and model.generator.config.num_hidden_layers > 2


def test_fused_decode_refuses_what_it_cannot_run(make_model):
    from scaledown.fused_layers import unfusable_reason

    model = make_model("llama", lora_target_modules=["q_proj", "up_proj"])  # LoRA-wrapped generator projections
    with pytest.raises(ValueError, match="cannot run this generator: layer 0's query, key or value projection"):
        StaticGreedyGenerator(model.generator, fused_decode=True)
    assert unfusable_reason(torch.nn.Linear(2, 2)).startswith("Linear is not a Llama-family causal LM")
    assert unfusable_reason(make_model("qwen2", lora_r=0).generator) is None


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_fused_residual_norms_answer_as_the_layers_they_replace(make_model, arch):
    from scaledown.fast_generation import compress_batch
    from scaledown.fused_layers import ResidualNormDecoderLayer, fuse_residual_norms

    model = make_model(arch, lora_r=0, enable_reranking=True).float()
    generator = model.generator
    batch = model.input_builder(QUESTIONS, DOCUMENTS, return_query_lengths=True)
    cases = prompt_cases(model)
    norm_calls = []  # the layers' input norms run as modules (not handed over by the layer before)
    for layer in generator.get_decoder().layers:
        layer.input_layernorm.register_forward_hook(lambda *args: norm_calls.append(1))

    def outputs():
        engine = StaticGreedyGenerator(generator, shared_prefix_min_tokens=1)  # the shared prefix and last-layer hook
        answers = [engine.generate(max_new_tokens=5, return_scores=True, **case) for case in cases]
        norm_calls.clear()
        with torch.no_grad():
            logits = generator(input_ids=cases[1]["input_ids"]).logits
        return compress_batch(model, batch), answers, logits, len(norm_calls)

    before, state = outputs(), {name: tensor.clone() for name, tensor in model.state_dict().items()}
    layers = generator.config.num_hidden_layers + model.config.num_compressor_layers
    assert fuse_residual_norms(model) == f"residual sums of {layers} decoder layers"
    assert all(isinstance(layer, ResidualNormDecoderLayer) for layer in generator.get_decoder().layers)
    after = outputs()
    assert before[3] == generator.config.num_hidden_layers and after[3] == 1  # only the first layer norms its input
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert list(model.state_dict()) == list(state)
    for got, want in zip(after[0], before[0]):  # memory vectors, rerank scores
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for (got_ids, got_scores), (want_ids, want_scores) in zip(after[1], before[1]):
        assert torch.equal(got_ids, want_ids)
        torch.testing.assert_close(got_scores, want_scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after[2], before[2], atol=1e-5, rtol=1e-5)
    assert fuse_residual_norms(model) == "residual sums of 0 decoder layers"


def test_fused_residual_norms_compile_and_carry_lora(make_model):
    from scaledown.fused_layers import fuse_residual_norms

    model = make_model("mistral")  # LoRA on the generator: the layers keep whatever projections they hold
    ids = prompt_cases(model)[1]["input_ids"]
    with torch.no_grad():
        want = model.generator(input_ids=ids).logits
        fuse_residual_norms(model.generator, use_compile=True)  # compiled on CPU too (on CUDA by default)
        torch._dynamo.utils.counters.clear()
        got = model.generator(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch._dynamo.utils.counters["graph_break"] and torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_fused_decode_runs_a_checkpoint_saved_with_its_lora_merged(make_model, tmp_path):
    from scaledown import ScaleDownForCausalLM

    model = make_model("llama")  # LoRA on the generator: refused until merged
    with pytest.raises(ValueError, match="merge_generator=True"):
        StaticGreedyGenerator(model.generator, fused_decode=True)
    with torch.no_grad():  # trained adapters are not zero: give LoRA's B a value, so that merging changes the weights
        for name, parameter in model.generator.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    batch = model.input_builder(QUESTIONS, DOCUMENTS)
    engine = StaticGreedyGenerator(model.generator)
    want = generate_compressed(model, batch, engine, max_new_tokens=6, return_scores=True)
    model.save_pretrained(tmp_path, merge_generator=True)
    merged = ScaleDownForCausalLM.from_pretrained(tmp_path).eval()
    got = generate_compressed(
        merged, batch, StaticGreedyGenerator(merged.generator, fused_decode=True), max_new_tokens=6, return_scores=True
    )
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)


class LiveActivations(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of the tensors that operators return while any view of them is alive; keeps the peak."""

    def __init__(self):
        super().__init__()
        self.views, self.sizes, self.live, self.peak = {}, {}, 0, 0

    def _drop(self, key):
        self.views[key] -= 1
        if not self.views[key]:
            self.live -= self.sizes.pop(key)
            del self.views[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                key = tensor.untyped_storage().data_ptr()
                if key not in self.views:
                    self.views[key], self.sizes[key] = 0, tensor.untyped_storage().nbytes()
                    self.live += self.sizes[key]
                self.views[key] += 1
                weakref.finalize(tensor, self._drop, key)
        self.peak = max(self.peak, self.live)
        return out


@pytest.mark.parametrize("levers", ["stacked", "residual_norms", "stacked,residual_norms"])
def test_layer_levers_hold_no_more_activations_than_the_layers_they_replace(make_model, levers):
    import copy

    from scaledown.fast_generation import stack_projections
    from scaledown.fused_layers import fuse_residual_norms

    plain = make_model("mistral", lora_r=0).generator.float()
    levered = copy.deepcopy(plain)
    if "stacked" in levers:
        stack_projections(levered)
    if "residual_norms" in levers:
        fuse_residual_norms(levered)
    ids = torch.randint(3, plain.config.vocab_size, (2, 96))
    peaks = []
    for generator in (plain, levered):
        with torch.no_grad(), LiveActivations() as live:
            generator.model(input_ids=ids, use_cache=False)  # the prefill's layers, as an N-layers compressor runs them
        peaks.append(live.peak)
    assert peaks[1] <= peaks[0], f"{levers}: peak {peaks[1]} bytes against the plain layers' {peaks[0]}"
