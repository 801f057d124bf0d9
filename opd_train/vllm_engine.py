"""``--rollout-engine vllm``: the student's completions sampled by a colocated vLLM engine.

One engine per process, beside the trained student (vLLM's offline ``LLM``, in-process:
``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so that its worker is reachable without serializing
weights). Under ``torchrun`` every rank starts its own engine and samples its own prompts, as
the HF engine does; no rank serves another.

Semantics are the HF engine's (`opd_train.rollout.generate`): plain ancestral sampling at
``temperature`` (top-k and top-p off), greedy at ``greedy``, at most ``max_new_tokens``, stop
at EOS (kept, and covered by the mask), with ``--vocab-size`` only the first ``vocab_size``
tokens drawn. Prompts go in as token ids (the engine loads no tokenizer).

Weights. The engine starts from the student's directory (its config and architecture) and is
loaded with the in-memory student at once (so a resumed or bf16 run samples what it trains),
then after every optimizer step: ``reload_weights`` on the worker with the student's state dict
(the HF checkpoint names; under ``--fsdp`` the full state dict, gathered from the shards by
every rank), then ``reset_prefix_cache``. vLLM's own ``load_weights`` path is not used: on CPU
it fails on the prepacked linear layers.

Sampler logprobs. Methods that need ``log π_old`` of the sampled tokens (OPD's importance weight,
GRPO's ratio) recompute them with the student's forward at the weights that sampled
(`opd_train.methods.base.Method.old_logprobs`); the engine's own logprobs are returned by
`VLLMEngine.generate` but not used by a loss. They agree to float32 rounding
(tests/test_vllm_rollout_engine.py).

Before training, `VLLMEngine.start` fails with one line when vLLM is missing or cannot run the
student (on CPU: its attention supports head_dim 32, 64, 80, 96, 112, 128 and more, not 12 or 24).
"""
from __future__ import annotations

import logging
import os

import torch
from torch.distributed.tensor import DTensor

from .inputs import InputError

INSTALL = "pip install -e '.[vllm]' (on CPU then: pip uninstall torchvision torchaudio torchcodec; see the README)"


def add_options(p) -> None:
    g = p.add_argument_group("rollout engine")
    g.add_argument("--rollout-engine", choices=("hf", "vllm"), default="hf",
                   help="what samples the student's completions: HF generate in this process, or a colocated "
                        "vLLM engine (one per process) that receives the student's weights after every "
                        "optimizer step; evaluation stays on HF generate")
    g.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3,
                   help="the share of GPU memory the colocated vLLM engine may take (CUDA only; on CPU the KV "
                        "cache is VLLM_CPU_KVCACHE_SPACE GiB, 1 unless set)")


def check_args(args, method_cls, error) -> None:
    """argparse-time checks; ``error(message)`` exits."""
    if args.rollout_engine == "vllm" and not method_cls.samples_student:
        error(f"--rollout-engine vllm: --method {args.method} samples nothing from the student")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class VLLMEngine:
    """A colocated vLLM engine that samples from the trained student (see the module docstring)."""

    def __init__(self, llm, eos_id: int, pad_id: int, vocab_size: int | None, device: torch.device):
        self.llm, self.eos_id, self.pad_id, self.device = llm, eos_id, pad_id, device
        self.allowed = None if vocab_size is None else list(range(vocab_size))

    @classmethod
    def start(cls, path, model, tok, *, vocab_size: int | None, device: torch.device, seed: int, dtype: str,
              gpu_memory_utilization: float, log=print) -> "VLLMEngine":
        """An engine for the student directory ``path``, loaded with ``model``'s current weights."""
        try:
            import vllm
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
        except Exception as e:  # ImportError, or a CUDA-built torchvision crashing vLLM's import
            raise InputError(f"--rollout-engine vllm: cannot import vLLM ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); {INSTALL}") from None
        hd = head_dim(model.config)
        if device.type == "cpu" and hd not in CPUAttentionBackend.get_supported_head_sizes():
            sizes = ", ".join(map(str, CPUAttentionBackend.get_supported_head_sizes()))
            raise InputError(f"--rollout-engine vllm: the student ({path}) has head_dim {hd}; vLLM's CPU attention "
                             f"supports head_dim {sizes}")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process worker: weights are passed, not sent
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        kw = {} if device.type == "cpu" else {"gpu_memory_utilization": gpu_memory_utilization}
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # under torchrun: vLLM joins the trainer's process group, one engine (a data-parallel
            # rank of tensor-parallel size 1) per process
            kw["distributed_executor_backend"] = "external_launcher"
        try:
            llm = vllm.LLM(model=str(path), dtype=dtype, enforce_eager=True, skip_tokenizer_init=True, seed=seed, **kw)
        except Exception as e:
            raise InputError(f"--rollout-engine vllm: vLLM cannot start on the student ({path}): "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        engine = cls(llm, tok.eos_token_id, tok.pad_token_id, vocab_size, device)
        engine.load_weights(model)
        log(f"rollout engine: vLLM {vllm.__version__} ({dtype}, head_dim {hd}) on {device.type}")
        return engine

    def close(self) -> None:
        """Shut the engine down (its worker, and the process group it started when there was none)."""
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None

    @torch.no_grad()
    def load_weights(self, model: torch.nn.Module) -> None:
        """Give the engine ``model``'s weights (after every optimizer step; a collective under FSDP)."""
        if any(isinstance(p, DTensor) for p in model.parameters()):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        else:
            state = model.state_dict()
        quiet = logging.getLogger("vllm")  # its per-reload INFO lines, and a warning for weightless rotary buffers
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(list(state.items()))})
            self.llm.reset_prefix_cache()
        finally:
            quiet.setLevel(level)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One completion per prompt: ``(completion [B, C], mask [B, C], logprobs [B, C])``.

        The mask covers tokens up to and including the first EOS; ``logprobs`` are the engine's
        log-probabilities of the sampled tokens under the model's logits (before temperature),
        0 at padding.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        sp = SamplingParams(max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature, top_p=1.0,
                            top_k=0, logprobs=0, stop_token_ids=[self.eos_id], detokenize=False,
                            allowed_token_ids=self.allowed)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        rows = [o.outputs[0] for o in outs]
        width = max(1, max(len(r.token_ids) for r in rows))
        comp = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        logprobs = torch.zeros(len(rows), width)
        for i, r in enumerate(rows):
            ids = list(r.token_ids)
            comp[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = True
            logprobs[i, : len(ids)] = torch.tensor([lp[t].logprob for t, lp in zip(ids, r.logprobs)])
        return comp.to(self.device), mask.to(self.device), logprobs.to(self.device)
