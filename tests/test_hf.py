"""opd_kernels.hf on tiny config-built HF causal LMs (no download): the fused ops on
``hidden_states`` + ``head`` equal the naive losses on the model's own ``forward`` logits, values
and every parameter gradient. The naive side runs a copy of the same float32 model and takes its
float32 logits to float64 for the loss (reference.py's convention: the tolerance covers the loss's
own arithmetic, not the backbone's, which both sides share)."""
import copy

import pytest
import torch
import transformers as T

import opd_kernels as ok
from reference import TOL, _divergence, close, divergence_rows, reduce

V_ROWS = 101  # head rows; odd on purpose
COMMON = dict(vocab_size=V_ROWS, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, initializer_range=0.3, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)


def _cfg(cls, drop=(), **kw):
    args = {k: v for k, v in COMMON.items() if k not in drop}
    args.update(kw)
    return cls(**args)


# name -> (model class, config builder); softcap / logit_scale set so that they change the logits visibly
MODELS = {
    "llama": (T.LlamaForCausalLM, lambda **k: _cfg(T.LlamaConfig, **k)),
    "mistral": (T.MistralForCausalLM, lambda **k: _cfg(T.MistralConfig, **k)),
    "qwen2": (T.Qwen2ForCausalLM, lambda **k: _cfg(T.Qwen2Config, **k)),
    "qwen3": (T.Qwen3ForCausalLM, lambda **k: _cfg(T.Qwen3Config, **k)),
    "gemma2": (T.Gemma2ForCausalLM, lambda **k: _cfg(T.Gemma2Config, final_logit_softcapping=1.5, **k)),
    "gemma3": (T.Gemma3ForCausalLM, lambda **k: _cfg(T.Gemma3TextConfig, final_logit_softcapping=1.5, **k)),
    "gpt2": (T.GPT2LMHeadModel, lambda **k: T.GPT2Config(vocab_size=V_ROWS, n_embd=k.get("hidden_size", 32), n_layer=2,
                                                         n_head=4, initializer_range=0.3, bos_token_id=1,
                                                         eos_token_id=2)),
    "cohere": (T.CohereForCausalLM, lambda **k: _cfg(T.CohereConfig, logit_scale=0.5, **k)),
    "phi": (T.PhiForCausalLM, lambda **k: _cfg(T.PhiConfig, drop=("head_dim",), **k)),  # lm_head has a bias
}
def build(name, seed=0, **kw):
    cls, cfg = MODELS[name]
    torch.manual_seed(seed)
    model = cls(cfg(**kw)).float().eval()  # eval: no dropout, so two forwards agree
    if name == "phi":
        with torch.no_grad():
            model.lm_head.bias.normal_(0, 1.0)
    return model


def batch(B=3, L=9, rows=V_ROWS, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, rows, (B, L), generator=g)
    attn = torch.ones(B, L, dtype=torch.long)
    attn[1, -3:] = 0  # right padding
    labels = ids.clone()
    labels[:, :3] = -100  # prompt
    labels[attn == 0] = -100
    return ids, attn, labels[:, 1:].contiguous()


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_verify_all_models_and_head_fields():
    for name in MODELS:
        model = build(name)
        h = ok.hf.verify(model)
        assert h.weight is model.get_output_embeddings().weight
        assert h.bias is model.get_output_embeddings().bias
        if name == "gpt2":
            assert h.weight is model.transformer.wte.weight  # tied embeddings
        assert h.softcap == (1.5 if name in ("gemma2", "gemma3") else None), name
        assert h.logit_scale == (0.5 if name == "cohere" else None), name
        assert h.vocab_size is None


def check_against_naive(models, fused, naive, dtype):
    """``fused(models)`` vs ``naive(models, low)`` (both scalar losses), values and the gradients of
    every parameter of ``models[0]``.

    float64: the same float64 models on both sides, float64 tolerance. float32: the oracle is the
    naive loss on a float64 copy of the models; the fused value must be within the float32 tolerance
    of it, and each fused gradient no farther from it than twice the naive float32 computation's
    (model and loss in float32) plus the float32 atol -- the backbone's own float32 rounding is in
    both, so a plain float32 tolerance on backbone gradients would test the backbone, not the loss.
    """
    models = [m.to(dtype) for m in models]
    oracle = [copy.deepcopy(m).double() for m in models]
    plain = [copy.deepcopy(m) for m in models]
    loss = fused(models)
    loss.backward()
    want = naive(oracle, low=False)
    want.backward()
    close(loss, want, dtype)
    for m in models[1:]:
        assert not grads(m), "the teacher takes no gradient"
    g, go = grads(models[0]), grads(oracle[0])
    assert g.keys() == go.keys() and len(g) > 3
    if dtype == torch.float64:
        for n in go:
            close(g[n], go[n], dtype, "grad")
        return
    naive(plain, low=True).backward()
    gp = grads(plain[0])
    atol = TOL[dtype]["grad"][1]
    for n in go:
        err, naive_err = ((x.double() - go[n]).abs().max().item() for x in (g[n], gp[n]))
        assert err <= 2 * naive_err + atol, f"{n}: fused error {err:.3g}, naive float32 error {naive_err:.3g}"


DTYPES = [torch.float64, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(MODELS))
def test_token_logprobs_equal_forward_logits(name, dtype):
    ids, attn, y = batch()
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)  # non-unit upstream
    temperature = 0.8

    def fused(models):
        (model,) = models
        head = ok.hf.head(model)
        hid = ok.hf.hidden_states(model, ids, attn)[:, :-1]
        logp = ok.fused_linear_token_logprobs(hid, head.weight, y, temperature=temperature, **head.kwargs())
        return (logp.double() * w).sum()

    def naive(models, low):
        logits = models[0](input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
        lq = torch.log_softmax((logits if low else logits.double()) / temperature, -1)
        valid = y != -100
        logp = torch.where(valid, lq.gather(-1, torch.where(valid, y, 0)[..., None])[..., 0], 0.0)
        return (logp.double() * w).sum()

    check_against_naive([build(name)], fused, naive, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(MODELS))
def test_distill_loss_equals_forward_logits(name, dtype):
    ids, attn, y = batch()
    mask = y != -100
    div, beta, temperature = "jsd", 0.3, 0.9

    def fused(models):
        student, teacher = models
        hs, ht = ok.hf.head(student), ok.hf.head(teacher)
        xs = ok.hf.hidden_states(student, ids, attn)[:, :-1]
        with torch.no_grad():
            xt = ok.hf.hidden_states(teacher, ids, attn)[:, :-1]
        return 2.5 * ok.fused_linear_distill_loss(xs, hs.weight, xt, ht.weight, mask=mask, divergence=div, beta=beta,
                                                  temperature=temperature, **hs.kwargs("student"),
                                                  **ht.kwargs("teacher"))

    def naive(models, low):
        student, teacher = models
        s = student(input_ids=ids, attention_mask=attn).logits[:, :-1]
        with torch.no_grad():
            t = teacher(input_ids=ids, attention_mask=attn).logits[:, :-1]
        if low:
            rows = _divergence(torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1),
                               div, beta)
        else:
            rows = divergence_rows(s, t, div, beta, temperature)
        return 2.5 * reduce(rows, mask, "mean")

    # a teacher of another hidden size
    check_against_naive([build(name, seed=0), build(name, seed=1, hidden_size=48)], fused, naive, dtype)


def _tokenizer(n):
    from tokenizers import Tokenizer, models
    vocab = {f"t{i}": i for i in range(n)}
    return T.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_padded_vocab_from_tokenizer(divergence):
    tok = _tokenizer(97)
    student, teacher = build("qwen2", seed=0).double(), build("qwen2", seed=1).double()
    hs, ht = ok.hf.head(student, tok), ok.hf.head(teacher, tok)
    assert len(tok) == 97 and hs.vocab_size == 97 and hs.kwargs()["vocab_size"] == 97
    assert ok.hf.head(student, _tokenizer(V_ROWS)).vocab_size is None  # no padding
    ids, attn, y = batch(rows=97)
    mask = y != -100
    xs = ok.hf.hidden_states(student, ids, attn)[:, :-1]
    xt = ok.hf.hidden_states(teacher, ids, attn)[:, :-1].detach()
    loss = ok.fused_linear_distill_loss(xs, hs.weight, xt, ht.weight, divergence=divergence, mask=mask,
                                        vocab_size=hs.vocab_size, **hs.kwargs("student"), **ht.kwargs("teacher"))
    loss.backward()
    sref, tref = copy.deepcopy(student), copy.deepcopy(teacher)
    s = sref(input_ids=ids, attention_mask=attn).logits[:, :-1, :97]
    t = tref(input_ids=ids, attention_mask=attn).logits[:, :-1, :97].detach()
    want = reduce(divergence_rows(s, t, divergence), mask, "mean")
    want.backward()
    close(loss, want, torch.float64)
    for n, gr in grads(sref).items():
        close(grads(student)[n], gr, torch.float64, "grad")
    assert grads(student)["lm_head.weight"][97:].abs().max() == 0  # padded rows take no gradient


def test_kwargs_by_side():
    h = ok.hf.Head(weight=torch.zeros(5, 2), bias=torch.zeros(5), softcap=30.0, logit_scale=None, vocab_size=4)
    assert set(h.kwargs()) == {"bias", "softcap", "vocab_size"}
    assert set(h.kwargs("student")) == {"student_bias", "student_softcap"}
    assert set(h.kwargs("ref")) == {"ref_bias", "ref_softcap"}
    assert ok.hf.Head(weight=torch.zeros(5, 2)).kwargs("teacher") == {}
    with pytest.raises(ValueError, match="side must be.*'pupil'"):
        h.kwargs("pupil")
    with pytest.raises(Exception):  # frozen
        h.softcap = 1.0


def test_errors_name_the_class():
    model = build("llama")

    class MyHead(torch.nn.Linear):
        pass

    wrapped = copy.deepcopy(model)
    wrapped.lm_head = MyHead(32, V_ROWS, bias=False)
    with pytest.raises(ValueError, match="LlamaForCausalLM.lm_head is a .*MyHead, not a plain torch.nn.Linear"):
        ok.hf.head(wrapped)

    granite = T.GraniteForCausalLM(_cfg(T.GraniteConfig, logits_scaling=4.0))
    with pytest.raises(ValueError, match=r"GraniteForCausalLM: config.logits_scaling=4.0 changes the logits"):
        ok.hf.head(granite)

    olmo = T.OlmoForCausalLM(_cfg(T.OlmoConfig))
    with pytest.raises(ValueError, match=r"OlmoForCausalLM \(model_type='olmo'\) is not an architecture"):
        ok.hf.head(olmo)
    assert ok.hf.verify(olmo, strict=False).weight is olmo.lm_head.weight  # opt-in after a numeric check

    with pytest.raises(ValueError, match="Linear has no .config"):
        ok.hf.head(torch.nn.Linear(2, 3))
    with pytest.raises(ValueError, match="LlamaModel has no output embeddings"):
        ok.hf.head(model.model)
    with pytest.raises(ValueError, match="tokenizer has 102 tokens but lm_head.weight has only 101 rows"):
        ok.hf.head(model, _tokenizer(102))


def test_verify_catches_an_unseen_transform():
    model = build("llama")
    model.config.final_logit_softcapping = 0.5  # read by head(), but Llama's forward does not apply it
    with pytest.raises(ValueError, match="LlamaForCausalLM: logits from opd_kernels.hf.head/hidden_states differ"):
        ok.hf.verify(model)


def test_unwrap_and_hidden_state_is_what_lm_head_sees():
    model = build("qwen3")
    ids, attn, _ = batch()
    seen = {}
    hook = model.lm_head.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    model(input_ids=ids, attention_mask=attn)
    hook.remove()
    dp = torch.nn.DataParallel(model)
    for m in (model, dp):
        torch.testing.assert_close(ok.hf.hidden_states(m, ids, attn), seen["x"], rtol=0, atol=0)
    assert ok.hf.head(dp).weight is model.lm_head.weight


def test_hidden_states_under_ddp_go_through_its_forward(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = build("gpt2")
        ids, attn, _ = batch()
        want = ok.hf.hidden_states(model, ids, attn)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        calls = []
        ddp.register_forward_pre_hook(lambda m, a: calls.append(1))
        got = ok.hf.hidden_states(ddp, ids, attn)
        assert calls == [1]  # DDP's forward ran (its gradient hooks expect that)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert not model.lm_head._forward_hooks and not model.transformer._forward_hooks
        head = ok.hf.head(ddp)
        y = torch.where(attn[:, 1:] > 0, ids[:, 1:], -100)
        ok.fused_linear_token_logprobs(got[:, :-1], head.weight, y).sum().backward()
        assert model.transformer.wte.weight.grad.abs().sum() > 0
    finally:
        dist.destroy_process_group()


def test_wrapped_forward_is_run_through():
    """A forward replaced on the instance (as accelerate's autocast wrapper is under bf16 mixed
    precision) is run, so the hidden state is the one the model's forward computes."""
    model = build("llama")
    ids, attn, _ = batch()
    plain = ok.hf.hidden_states(model, ids, attn)
    forward = model.forward

    def autocast_forward(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    model.forward = autocast_forward
    auto = ok.hf.hidden_states(model, ids, attn)
    with torch.no_grad():
        seen = {}
        hook = model.lm_head.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
        model(input_ids=ids, attention_mask=attn)
        hook.remove()
    torch.testing.assert_close(auto, seen["x"], rtol=0, atol=0)
    assert (auto - plain).abs().max() > 1e-3  # bf16 autocast really changed it
    torch.testing.assert_close(ok.hf.hidden_states(model, ids, attn, through_forward=False), plain, rtol=0, atol=0)
