"""Generative pre-training: next-token prediction on a corpus packed into fixed-length blocks (GPT-1's L1).

Steps: 1 accelerator and seed → 2 model (built from a config or loaded) → 3 corpus → 4 optimizer → 5 resume →
6 train loop (log / eval / checkpoint) → 7 final eval and save.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from rlhf.config import ModelSettings, OptimSettings, Section, StageConfig, TrainSettings
from rlhf.data import load_records, pack_corpus
from rlhf.distributed import check_engine, make_accelerator, sync_unless_last
from rlhf.losses import lm_loss
from rlhf.policy import PolicyModel
from rlhf.stage import StageContext
from rlhf.training import (
    end_of_step, final_eval_and_save, make_optimizer, make_scheduler, micro_batch_indices, optimizer_step, resume_state,
)
from rlhf.tracking import progress
from rlhf.world import scratch_builder


class PretrainData(Section):
    train: str = Field("data/demo/pretrain.jsonl", description="documents (file, saved dataset dir or hub id)")
    text_field: str = Field("text", description="the field holding each document's text")
    block_size: int = Field(128, ge=8, description="tokens per packed training block")
    eval_fraction: float = Field(0.02, ge=0.0, lt=1.0, description="fraction of blocks held out for eval loss")


class Config(StageConfig):
    """`rlhf pretrain`: train a causal LM on raw text."""

    model: ModelSettings = Field(
        default_factory=lambda: ModelSettings(scratch_size="tiny", tokenizer="data/demo/tokenizer"),
        description="model to train: scratch_size builds a fresh demo-world Llama; path continues a checkpoint",
    )
    data: PretrainData = Field(default_factory=PretrainData, description="the corpus")
    train: TrainSettings = Field(default_factory=TrainSettings, description="loop length, batch and cadence")
    optim: OptimSettings = Field(default_factory=OptimSettings, description="AdamW and lr schedule")


def run(cfg: Config, ctx: StageContext) -> dict[str, float]:
    # 1. accelerator and seed (the seed also fixes a from-scratch model's initial weights) ----------------------
    accelerator = make_accelerator(cfg.train, cfg.seed)
    check_engine(accelerator, micro_batches=cfg.train.grad_accum)

    # 2. model --------------------------------------------------------------------------------------------------
    policy = PolicyModel.load(cfg.model, seed=cfg.seed, build=scratch_builder(cfg.model.scratch_size))
    n_params = sum(p.numel() for p in policy.model.parameters())
    print(f"{ctx.name}: {n_params / 1e6:.2f}M parameters, vocab {len(policy.tokenizer)}")

    # 3. corpus, packed into blocks; a seeded slice of blocks is held out -------------------------------------------
    blocks = pack_corpus(load_records(cfg.data.train), policy.tokenizer, cfg.data.block_size, cfg.data.text_field)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(cfg.seed))
    n_eval = int(len(blocks) * cfg.data.eval_fraction)
    eval_blocks, train_blocks = blocks[order[:n_eval]], blocks[order[n_eval:]]

    # 4. optimizer and schedule ---------------------------------------------------------------------------------
    optimizer = make_optimizer(policy.model.parameters(), cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    policy.keep_whole_weights(accelerator)  # FSDP: an unsharded copy to sample and save with
    policy.model, optimizer, scheduler = accelerator.prepare(policy.model, optimizer, scheduler)
    model = policy.model

    # 5. resume -------------------------------------------------------------------------------------------------
    start, counters, timer = resume_state(accelerator, ctx)

    def evaluate() -> dict[str, float]:
        if not len(eval_blocks):
            return {}
        model.eval()
        total, count = 0.0, 0.0
        with torch.no_grad():
            for i in range(0, len(eval_blocks), cfg.train.batch_size):
                ids = eval_blocks[i:i + cfg.train.batch_size].to(accelerator.device)
                _, stats = lm_loss(model(input_ids=ids, use_cache=False).logits, ids, torch.ones_like(ids))
                total += stats["loss/nll_sum"].item()
                count += stats["loss/weight_sum"].item()
        model.train()
        return {"eval/loss": total / count, "eval/perplexity": math.exp(total / count)}

    # 6. train loop ---------------------------------------------------------------------------------------------
    model.train()
    metrics: dict[str, float] = {}
    tokens_per_micro = cfg.train.batch_size * cfg.data.block_size * accelerator.num_processes
    for step in progress(range(start, cfg.train.max_steps), total=cfg.train.max_steps, initial=start, desc=ctx.name):
        loss_sum = 0.0
        for m in range(cfg.train.grad_accum):
            idx = micro_batch_indices(len(train_blocks), cfg.train.batch_size, step * cfg.train.grad_accum + m,
                                      cfg.seed, accelerator.process_index, accelerator.num_processes)
            ids = train_blocks[idx].to(accelerator.device)
            with accelerator.autocast(), sync_unless_last(accelerator, model, m, cfg.train.grad_accum):
                # every block is full, so the mean over a micro-batch divided by grad_accum is the global token mean
                loss, _ = lm_loss(model(input_ids=ids, use_cache=False).logits, ids, torch.ones_like(ids))
                accelerator.backward(loss / cfg.train.grad_accum)
            loss_sum += loss.item() / cfg.train.grad_accum
        grad_norm = optimizer_step(accelerator, model, optimizer, scheduler, cfg.optim.max_grad_norm, loss=loss_sum)

        counters["samples"] += cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes
        counters["tokens"] += tokens_per_micro * cfg.train.grad_accum
        end_of_step(ctx, accelerator, cfg.train, step + 1, counters, timer, tokens=tokens_per_micro * cfg.train.grad_accum,
                    evaluate=evaluate, metrics={"loss/total": loss_sum, "train/lr": scheduler.get_last_lr()[0],
                                                "train/grad_norm": grad_norm})
        metrics["loss/total"] = loss_sum

    # 7. final evaluation and the model in Hugging Face format ---------------------------------------------------
    return final_eval_and_save(ctx, accelerator, policy, metrics, evaluate, counters, timer, cfg.train.max_steps)
