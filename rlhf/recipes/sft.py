"""Supervised fine-tuning: masked-label next-token loss on completions, with an optional λ-weighted LM loss on
prompt tokens (L_total = L_task + λ·L_LM, `prompt_loss_weight`).

Steps: 1 accelerator and seed → 2 policy (+ action tokens) → 3 data → 4 optimizer → 5 resume → 6 train loop
(log / eval / checkpoint) → 7 final eval and save.
"""

from __future__ import annotations

import torch
from pydantic import Field

from rlhf.config import GenerationSettings, ModelSettings, OptimSettings, Section, StageConfig, TrainSettings
from rlhf.data import collate_sft, load_prompts, load_records, prompt_text, sft_texts, tokenize_sft
from rlhf.distributed import check_engine, global_normalizer, make_accelerator, sync_unless_last
from rlhf.errors import UserError
from rlhf.evaluation import evaluate_gold
from rlhf.losses import sft_loss_weights, weighted_nll_loss
from rlhf.policy import PolicyModel, sequence_nll
from rlhf.stage import StageContext
from rlhf.training import (
    end_of_step, final_eval_and_save, make_optimizer, make_scheduler, micro_batch_indices, optimizer_step, resume_state,
)
from rlhf.tracking import progress
from rlhf.vision import check_image_prompts
from rlhf.world import gold_score_fn, gold_task_records, scratch_builder


class SFTData(Section):
    train: str = Field("data/demo/sft.jsonl", description="prompt/completion or messages data (file, saved dataset dir or hub id)")
    tasks: list[str] | None = Field(None, description="train only on rows whose `task` is one of these (null = all rows)")
    eval: str | None = Field(None, description="held-out demonstrations for eval loss; null = hold out eval_fraction of train")
    eval_fraction: float = Field(0.02, ge=0.0, lt=1.0, description="fraction of train held out when eval is null")
    gold_prompts: str | None = Field(
        "data/demo/eval_prompts.jsonl", description="held-out prompts with task/meta, scored by the world's gold scorers"
    )
    gold_limit: int | None = Field(None, ge=1, description="use at most this many gold prompts (null = all)")
    max_length: int = Field(128, ge=2, description="tokens per sequence; longer completions are cut on the right")
    skip_overlong_prompts: bool = Field(False, description="drop (instead of failing on) prompts longer than max_length")


class Config(StageConfig):
    """`rlhf sft`: fine-tune a causal LM on demonstrations."""

    model: ModelSettings = Field(default_factory=ModelSettings, description="the policy to fine-tune")
    data: SFTData = Field(default_factory=SFTData, description="demonstrations and evaluation prompts")
    action_tokens: list[str] = Field(default_factory=list, description="special tokens to add (e.g. task selectors)")
    prompt_loss_weight: float = Field(0.0, ge=0.0, description="λ: weight of the next-token loss on prompt tokens")
    train: TrainSettings = Field(default_factory=TrainSettings, description="loop length, batch and cadence")
    optim: OptimSettings = Field(default_factory=OptimSettings, description="AdamW and lr schedule")
    generation: GenerationSettings = Field(default_factory=GenerationSettings, description="gold evaluation decoding")
    save_merged: bool = Field(False, description="with LoRA, also write the merged full model (else the adapter)")


def run(cfg: Config, ctx: StageContext) -> dict[str, float]:
    # 1. accelerator and seed ---------------------------------------------------------------------------------
    accelerator = make_accelerator(cfg.train, cfg.seed)
    check_engine(accelerator, micro_batches=cfg.train.grad_accum,
                 generates="the gold evaluation (data.gold_prompts)" if cfg.data.gold_prompts else None,
                 merges="save_merged" if cfg.save_merged and cfg.model.lora else None)

    # 2. policy; action tokens become special tokens with fresh embedding rows ---------------------------------
    policy = PolicyModel.load(cfg.model, add_tokens=cfg.action_tokens, seed=cfg.seed,
                              build=scratch_builder(cfg.model.scratch_size))
    tokenizer = policy.tokenizer

    # 3. data ---------------------------------------------------------------------------------------------------
    records = load_records(cfg.data.train)
    if cfg.data.tasks is not None:
        records = [r for r in records if r.get("task") in cfg.data.tasks]
        if not records:
            raise UserError(f"{cfg.data.train}: no row has a task in {cfg.data.tasks} (config key 'data.tasks')")
    if cfg.data.eval is not None:
        eval_records = load_records(cfg.data.eval)
    else:
        n_eval = int(len(records) * cfg.data.eval_fraction)
        split = torch.randperm(len(records), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        eval_records = [records[i] for i in split[:n_eval]]
        records = [records[i] for i in split[n_eval:]]
    images = policy.image_inputs  # a vision-language model: every prompt carries one image
    model_name = cfg.model.path or "(scratch)"
    check_image_prompts(records + eval_records, images, model_name, prompt_of=lambda r: sft_texts(r, tokenizer)[0])
    train_set, _ = tokenize_sft(records, tokenizer, cfg.data.max_length, cfg.data.skip_overlong_prompts, images)
    eval_set = tokenize_sft(eval_records, tokenizer, cfg.data.max_length, True, images)[0] if eval_records else []
    gold_prompts = load_prompts(cfg.data.gold_prompts, cfg.data.gold_limit) if cfg.data.gold_prompts else []
    gold_prompts = gold_task_records(gold_prompts)  # the gold judge scores prompts of the demo world's tasks
    check_image_prompts(gold_prompts, images, model_name, prompt_of=lambda r: prompt_text(r, tokenizer))

    # 4. optimizer and schedule, prepared by accelerate (DDP / FSDP / mixed precision when launched so) ----------
    optimizer = make_optimizer(policy.model.parameters(), cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    policy.keep_whole_weights(accelerator)  # FSDP: an unsharded copy to sample and save with
    policy.model, optimizer, scheduler = accelerator.prepare(policy.model, optimizer, scheduler)
    model = policy.model

    # 5. resume: model, optimizer, scheduler and RNG from the last checkpoint; the data order is a function of the step
    start, counters, timer = resume_state(accelerator, ctx)

    def batch_for(micro_index: int) -> dict[str, torch.Tensor]:
        idx = micro_batch_indices(len(train_set), cfg.train.batch_size, micro_index, cfg.seed,
                                  accelerator.process_index, accelerator.num_processes)
        batch = collate_sft([train_set[i] for i in idx], tokenizer.pad_token_id, images)
        return {k: v.to(accelerator.device) for k, v in batch.items()}

    def evaluate() -> dict[str, float]:
        model.eval()
        metrics = {}
        if eval_set:
            metrics["eval/loss"] = eval_loss(model, eval_set, tokenizer.pad_token_id, cfg, accelerator.device, images)
        if gold_prompts:  # generate on the bare model: a DDP / FSDP wrapper has no `generate`
            metrics.update(evaluate_gold(policy.unwrapped(accelerator), gold_prompts, cfg.generation, gold_score_fn,
                                         accelerator=accelerator))
        model.train()
        return metrics

    # 6. train loop ---------------------------------------------------------------------------------------------
    model.train()
    metrics: dict[str, float] = {}
    for step in progress(range(start, cfg.train.max_steps), total=cfg.train.max_steps, initial=start, desc=ctx.name):
        micro = [batch_for(step * cfg.train.grad_accum + m) for m in range(cfg.train.grad_accum)]
        weights = [sft_loss_weights(b["completion_mask"], b["attention_mask"], cfg.prompt_loss_weight) for b in micro]
        # one global denominator for all micro-batches (and processes): accumulation then equals one big batch
        normalizer = global_normalizer(accelerator, sum(w.sum() for w in weights))
        loss_sum = 0.0
        for i, (batch, w) in enumerate(zip(micro, weights)):
            with accelerator.autocast(), sync_unless_last(accelerator, model, i, len(micro)):
                nll = sequence_nll(model, batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"))
                loss, _ = weighted_nll_loss(nll, w, normalizer)
                accelerator.backward(loss)
            loss_sum += loss.item()
        grad_norm = optimizer_step(accelerator, model, optimizer, scheduler, cfg.optim.max_grad_norm, loss=loss_sum)

        tokens = int(sum(b["attention_mask"].sum() for b in micro)) * accelerator.num_processes
        counters["samples"] += sum(len(b["input_ids"]) for b in micro) * accelerator.num_processes
        counters["tokens"] += tokens
        end_of_step(ctx, accelerator, cfg.train, step + 1, counters, timer, tokens=tokens, evaluate=evaluate, metrics={
            "loss/total": loss_sum, "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm})
        metrics["loss/total"] = loss_sum

    # 7. final evaluation and the model in Hugging Face format ---------------------------------------------------
    return final_eval_and_save(ctx, accelerator, policy, metrics, evaluate, counters, timer, cfg.train.max_steps, merged=cfg.save_merged)


@torch.no_grad()
def eval_loss(model, examples, pad_token_id: int, cfg: Config, device, image_inputs=None) -> float:
    """Completion-token NLL on held-out demonstrations (same λ weighting as training)."""
    total, weight = 0.0, 0.0
    for start in range(0, len(examples), cfg.train.batch_size):
        chunk = examples[start:start + cfg.train.batch_size]
        batch = {k: v.to(device) for k, v in collate_sft(chunk, pad_token_id, image_inputs).items()}
        w = sft_loss_weights(batch["completion_mask"], batch["attention_mask"], cfg.prompt_loss_weight)
        nll = sequence_nll(model, batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"))
        _, stats = weighted_nll_loss(nll, w)
        total += stats["loss/nll_sum"].item()
        weight += stats["loss/weight_sum"].item()
    return total / max(weight, 1e-8)
