"""Run by tests/test_train_fsdp.py under ``torchrun --nproc_per_node 2``: one update of an FSDP2-sharded
student on 2 gloo ranks against one process with the same global batch.

Each rank holds half of a fixed global batch (4 completions) and takes one AdamW step on the
trainer's pieces: `opd_train.fsdp.shard`, `opd_train.lm.LM` (the model's own forward under FSDP, the
full lm_head), the fused JSD to a replicated teacher (`opd_train.lm.distill_loss`) and
`opd_train.step`. Rank 0 then repeats the update in one process on the whole batch (the mean of
the two halves' losses: data-parallel semantics) and writes both results to ``argv[1]`` (JSON).
``argv[2]``: ``qwen2`` (untied head) or ``gemma2`` (tied embeddings, softcap: `test_train_heads.build`).
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from transformers import Qwen2Config, Qwen2ForCausalLM

from opd_train import fsdp
from opd_train import rollout as R
from opd_train.lm import LM, distill_loss
from opd_train.tokenizer import build_char_tokenizer


def qwen2(tok, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    return Qwen2ForCausalLM(cfg)


def batch(tok, rows: slice) -> R.Seqs:
    prompts = R.encode_prompts(tok, ["12+34=", "7+8=", "305+96=", "1+1="])
    comp, mask = R.pad_completions(R.encode_answers(tok, ["64", "51", "1040", "2"]), tok.pad_token_id)
    return R.select(R.pack(prompts, comp, mask, tok.pad_token_id), rows)


def loss_of(student: LM, teacher: LM, s: R.Seqs) -> torch.Tensor:
    h = R.completion_hidden(student, s)
    with torch.no_grad():
        h_t = R.completion_hidden(teacher, s)
    return distill_loss(student, h, teacher, h_t, divergence="jsd", beta=0.5, mask=s.mask)


def update(student: LM, teacher: LM, halves: list[R.Seqs]) -> float:
    opt = torch.optim.AdamW(student.model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    loss = sum(loss_of(student, teacher, s) for s in halves) / len(halves)
    loss.backward()
    opt.step()
    return float(loss.detach())


def params(model) -> dict[str, list]:
    return {k: fsdp_full(v).detach().flatten().tolist() for k, v in model.named_parameters()}


def fsdp_full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def model(family: str, tok, seed: int):
    if family == "qwen2":
        return qwen2(tok, seed)
    from test_train_heads import build  # tests/ is this script's directory
    return build(family, tok, seed)


def main(out: str, family: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    tok = build_char_tokenizer()
    teacher = LM(model(family, tok, 1).eval().requires_grad_(False))  # replicated
    student = LM(model(family, tok, 0))
    fsdp.shard(student.model)
    student.sharded = True
    per = 4 // world
    loss = torch.tensor(update(student, teacher, [batch(tok, slice(rank * per, (rank + 1) * per))]))
    dist.all_reduce(loss)  # the mean over ranks of the local losses
    sharded = {"loss": loss.item() / world, "params": params(student.model),
               "shard_numel": sum(p.to_local().numel() for p in student.model.parameters()),
               "numel": sum(p.numel() for p in student.model.parameters())}
    if rank == 0:
        single = LM(model(family, tok, 0))
        initial = params(single.model)
        ref_loss = update(single, teacher, [batch(tok, slice(r * per, (r + 1) * per)) for r in range(world)])
        json.dump({"sharded": sharded, "single": {"loss": ref_loss, "params": params(single.model)},
                   "initial": initial},
                  open(out, "w"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "qwen2")
