"""Direct preference optimization: DPO, IPO, conservative DPO and robust DPO on preference pairs, no reward model.

DPO fits the Bradley-Terry model to the implicit rewards r(x, y) = β·[log π(y|x) − log π_ref(y|x)], each log-prob a
sum over the response tokens (EOS included):

    L = −log σ( r(x, y_c) − r(x, y_r) )                       (Rafailov et al. 2023, eq. 7)

with the variants of `rlhf.losses.dpo_loss` (IPO's squared loss, cDPO's label smoothing, rDPO's unbiased
flipped-label loss) and an optional SFT term on the chosen responses, α·NLL(y_c) per token (RPO: Pang et al. 2024,
eq. 1; TRL's loss_type=["sigmoid", "sft"]). The reference is the policy's own frozen starting point: the base with
adapters disabled under LoRA, a frozen copy otherwise (or `model.ref_path`); its log-probs can be precomputed once
for every pair (`precompute_ref`), after which no reference weights are kept.

The data is what the reward stage reads (`reward_models.data.load_preferences`: TRL's preference formats, the
collection app's export, the demo's sampled pairs). A vision-language policy takes pairs about an image (`images`,
TRL's vision preference format): both rows of a pair read the pair's image, and so does the reference. DPO has no
loss for a tie: ties are refused or dropped (`data.ties`). A pair's `margin` is ignored unless `data.margins: offset`
makes it ODPO's per-pair offset. The held-out split is the reward stage's (whole prompts, same seed and fraction), so
held-out accuracies compare.

Steps: 1 accelerator → 2 policy (+ LoRA) and its reference → 3 pairs: ties, margins, held-out split, tokens →
4 reference log-probs, precomputed once (optional) → 5 optimizer → 6 resume → 7 loop: one (2B) forward of chosen and
rejected per micro-batch, log / eval / checkpoint → 8 final eval and save.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field

from rlhf.config import GenerationSettings, ModelSettings, OptimSettings, Section, StageConfig, TrainSettings
from rlhf.data import encode_prompt, load_prompts, prompt_text
from rlhf.distributed import (
    check_engine, global_normalizer, make_accelerator, map_over_processes, prepare_reference, sync_unless_last,
)
from rlhf.errors import UserError
from rlhf.evaluation import evaluate_gold
from rlhf.losses import aggregate, dpo_loss
from rlhf.policy import PolicyModel
from rlhf.stage import StageContext, atomic_write
from rlhf.tracking import progress
from rlhf.training import (
    MetricSums, end_of_step, final_eval_and_save, make_optimizer, make_scheduler, micro_batch_indices, optimizer_step,
    resume_state,
)
from rlhf.types import Rollout
from rlhf.vision import check_image_prompts
from rlhf.world import gold_score_fn, gold_task_records
from reward_models.data import PreferencePair, check_pair_images, load_preferences, split_by_prompt

REF_LOGPS_FILE = "ref_logps.pt"  # precomputed reference log-probs, (N, 2) per split, kept in the stage directory


class DPOData(Section):
    """The preference pairs and how ties, margins and length are handled."""

    train: str = Field("runs/demo/reward/preferences.jsonl",
                       description="preference pairs (JSONL, parquet, saved dataset dir e.g. the collect export, hub id)")
    eval: str | None = Field(None, description="held-out pairs; null = hold out eval_fraction of train's prompts")
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of prompts held out when eval is null "
                                 "(the reward stage's split: same seed and fraction give the same held-out pairs)")
    ties: Literal["error", "drop"] = Field("error", description="pairs marked `tie`: error = refuse the data, "
                                           "drop = train on the strict pairs only (DPO has no loss for a tie)")
    margins: Literal["ignore", "offset"] = Field(
        "ignore", description="the pairs' `margin`: ignore it (DPO has none), or offset = the reward gap must exceed it "
        "(ODPO; sigmoid loss only)")
    max_length: int = Field(128, ge=2, description="prompt + response tokens; longer responses are cut on the right, "
                            "pairs whose prompt alone fills it are dropped and counted")
    limit: int | None = Field(None, ge=1, description="train on at most this many pairs, drawn at random (null = all)")


class DPOLoss(Section):
    """The preference loss and the SFT term."""

    type: Literal["sigmoid", "ipo", "robust"] = Field(
        "sigmoid", description="sigmoid = DPO (cDPO with label_smoothing > 0), ipo = IPO (length-normalized, as TRL), "
        "robust = rDPO")
    beta: float = Field(0.1, gt=0.0, description="β: the implicit reward scale (sigmoid / robust), IPO's τ")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="ε: assumed label-flip rate (cDPO for sigmoid, "
                                   "rDPO for robust; must be 0 for ipo)")
    sft_weight: float = Field(0.0, ge=0.0, description="α: weight of the per-token NLL of the chosen responses (RPO)")


class DPOEval(Section):
    """Held-out pairs and gold-scored generation."""

    pairs_limit: int | None = Field(512, ge=1, description="score at most this many held-out pairs (null = all)")
    batch_size: int = Field(64, ge=1, description="pairs per scoring forward (held-out pairs, precomputed reference)")
    gold_prompts: str | None = Field("data/demo/eval_prompts.jsonl",
                                     description="held-out prompts with task/meta for the world's gold scorers (null = none)")
    gold_limit: int | None = Field(None, ge=1, description="use at most this many gold prompts (null = all)")
    generation: GenerationSettings = Field(default_factory=GenerationSettings, description="gold evaluation decoding")


class Config(StageConfig):
    """`rlhf dpo`: direct preference optimization of a policy on preference pairs (DPO, IPO, cDPO, rDPO)."""

    model: ModelSettings = Field(default_factory=ModelSettings, description="the policy (an SFT stage's output); its "
                                 "reference is its starting point (ref_path to use another)")
    data: DPOData = Field(default_factory=DPOData, description="preference pairs")
    loss: DPOLoss = Field(default_factory=DPOLoss, description="loss type, β, label smoothing, SFT term")
    precompute_ref: bool = Field(False, description="compute every pair's reference log-probs once before training "
                                 "(worth it for several epochs; no reference weights are kept afterwards)")
    train: TrainSettings = Field(default_factory=lambda: TrainSettings(batch_size=16),
                                 description="loop length, batch (in pairs) and cadence")
    optim: OptimSettings = Field(default_factory=lambda: OptimSettings(lr=1e-5), description="AdamW and lr schedule")
    eval: DPOEval = Field(default_factory=DPOEval, description="held-out evaluation")
    save_merged: bool = Field(False, description="with LoRA, also write the merged full model (else the adapter)")


@dataclass
class PairTokens:
    """One tokenized pair: prompt ids (with BOS) and the two responses (EOS appended unless cut); for a
    vision-language policy the prompt's image (PIL), which both responses are conditioned on."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float
    image: Any = None


def run(cfg: Config, ctx: StageContext) -> dict[str, float]:
    # 1. accelerator and seed ---------------------------------------------------------------------------------
    accelerator = make_accelerator(cfg.train, cfg.seed)
    check_engine(accelerator, micro_batches=cfg.train.grad_accum,
                 generates="the gold evaluation (eval.gold_prompts)" if cfg.eval.gold_prompts else None,
                 merges="save_merged" if cfg.save_merged and cfg.model.lora else None)
    if cfg.loss.type == "ipo" and cfg.loss.label_smoothing:
        raise UserError("config key 'loss.label_smoothing' must be 0 with loss.type=ipo (IPO has no label smoothing)")
    if cfg.data.margins == "offset" and cfg.loss.type != "sigmoid":
        raise UserError(f"config key 'data.margins': offset needs loss.type=sigmoid (ODPO), not {cfg.loss.type}")

    # 2. policy; with LoRA the reference is the same weights with adapters disabled, else a frozen copy ------------
    policy = PolicyModel.load(cfg.model, with_reference=True, seed=cfg.seed)
    tokenizer = policy.tokenizer
    images = policy.image_inputs  # a vision-language policy: every pair carries its prompt's image

    # 3. pairs: ties, margins, the held-out split by prompt, tokens -------------------------------------------------
    pairs, eval_pairs, data_metrics = _pairs(cfg, tokenizer, images)
    train_set, cut = tokenize_pairs(pairs, tokenizer, cfg.data.max_length, images)
    eval_set, _ = tokenize_pairs(eval_pairs, tokenizer, cfg.data.max_length, images)
    if cfg.eval.pairs_limit is not None and len(eval_set) > cfg.eval.pairs_limit:  # a random subset: many prompts
        keep = torch.randperm(len(eval_set), generator=torch.Generator().manual_seed(cfg.seed + 2))[: cfg.eval.pairs_limit]
        eval_set = [eval_set[i] for i in sorted(keep.tolist())]
    data_metrics.update({"data/train_pairs": float(len(train_set)), "data/eval_pairs": float(len(eval_set)), **cut})
    if not train_set:
        raise UserError(f"{cfg.data.train}: no training pair is left (every prompt fills data.max_length={cfg.data.max_length})")
    print(f"{ctx.name}: {len(train_set)} training pairs, {len(eval_set)} held out; " +
          ", ".join(f"{k.removeprefix('data/')} {int(v)}" for k, v in data_metrics.items() if k not in (
              "data/train_pairs", "data/eval_pairs")))
    gold_prompts = load_prompts(cfg.eval.gold_prompts, cfg.eval.gold_limit) if cfg.eval.gold_prompts else []
    for r in gold_prompts:
        r["prompt"] = prompt_text(r, tokenizer)
    gold_prompts = gold_task_records(gold_prompts)  # the gold judge scores prompts of the demo world's tasks
    check_image_prompts(gold_prompts, images, cfg.model.path or "the policy")
    pad = tokenizer.pad_token_id
    pixel_dtype = next(policy.model.parameters()).dtype

    # 4. optimizer and schedule, prepared by accelerate; the reference copy runs under the policy's precision --------
    optimizer = make_optimizer(policy.model.parameters(), cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    policy.keep_whole_weights(accelerator)  # FSDP: an unsharded copy to sample and save with
    policy.model, optimizer, scheduler = accelerator.prepare(policy.model, optimizer, scheduler)
    prepare_reference(accelerator, policy)
    model = policy.model

    # 5. reference log-probs of every pair, once (kept in the stage directory, so a resumed run reuses them) --------
    ref_logps: dict[str, torch.Tensor] = {}
    once: dict[str, float] = {}  # logged with the first step of this attempt
    if cfg.precompute_ref:
        started = time.perf_counter()
        ref_logps = _precomputed_reference(policy.unwrapped(accelerator), {"train": train_set, "eval": eval_set}, cfg,
                                           ctx, accelerator)
        once["perf/precompute_ref_seconds"] = time.perf_counter() - started
        policy.ref_model = None  # the copy is no longer needed (LoRA keeps no copy anyway)

    # 6. resume: weights, optimizer, scheduler and RNG; the pair order is a function of the step ----------------------
    start, counters, timer = resume_state(accelerator, ctx)

    def reference_for(split: str, idx: list[int], rollout: Rollout) -> torch.Tensor:
        """Per-sequence reference log-probs (2B,) of a pair rollout: looked up, or one no-grad forward."""
        if ref_logps:
            ref = ref_logps[split][idx].to(accelerator.device)
            return torch.cat([ref[:, 0], ref[:, 1]])
        with policy.unwrapped(accelerator).reference() as reference:
            return sequence_logps(reference, rollout)[0]

    def evaluate() -> dict[str, float]:
        model.eval()
        metrics = evaluate_pairs(policy, eval_set, cfg, reference_for, accelerator.device)
        if gold_prompts:  # generate on the bare model: a DDP / FSDP wrapper has no `generate`
            metrics.update(evaluate_gold(policy.unwrapped(accelerator), gold_prompts, cfg.eval.generation,
                                         gold_score_fn, seed=cfg.seed, accelerator=accelerator))
        model.train()
        return metrics

    # 7. train loop ---------------------------------------------------------------------------------------------
    model.train()
    metrics: dict[str, float] = {}
    for step in progress(range(start, cfg.train.max_steps), total=cfg.train.max_steps, initial=start, desc=ctx.name):
        micro = []
        for m in range(cfg.train.grad_accum):
            idx = micro_batch_indices(len(train_set), cfg.train.batch_size, step * cfg.train.grad_accum + m, cfg.seed,
                                      accelerator.process_index, accelerator.num_processes)
            rollout = pair_rollout([train_set[i] for i in idx], pad, images, pixel_dtype)
            micro.append((idx, rollout.to(accelerator.device)))
        # global denominators over every micro-batch (and process): pairs for the preference loss, chosen tokens for
        # the SFT term, so that accumulation equals one big batch
        n = accelerator.num_processes
        pair_normalizer = global_normalizer(accelerator, float(sum(len(i) for i, _ in micro)))
        token_normalizer = global_normalizer(accelerator, sum(r.response_mask[: len(i)].sum() for i, r in micro).float())
        sums = MetricSums()
        ref_seconds = 0.0
        for k, (idx, rollout) in enumerate(micro):
            share = len(idx) / float(pair_normalizer)  # this micro-batch's part of the means over pairs
            ref_started = time.perf_counter()
            ref = reference_for("train", idx, rollout)
            ref_seconds += time.perf_counter() - ref_started
            with accelerator.autocast(), sync_unless_last(accelerator, model, k, len(micro)):
                loss, stats = _pair_loss(policy, rollout, ref, [train_set[i] for i in idx], cfg, pair_normalizer,
                                         token_normalizer)
                accelerator.backward(loss)
            sums.add(stats, share)  # means over pairs are weighted by the micro-batch's pairs
        grad_norm = optimizer_step(accelerator, model, optimizer, scheduler, cfg.optim.max_grad_norm,
                                   loss=sums.current["loss/total"])
        sums.end_minibatch({"train/grad_norm": grad_norm})

        tokens = int(sum(torch.cat([r.prompt_mask, r.response_mask], 1).sum() for _, r in micro)) * n
        counters["samples"] += int(pair_normalizer.item() * n)  # progress/samples counts preference pairs seen
        counters["tokens"] += tokens
        step_metrics = {**sums.means(), "train/lr": scheduler.get_last_lr()[0], "perf/reference_seconds": ref_seconds,
                        **once}
        once = {}
        end_of_step(ctx, accelerator, cfg.train, step + 1, counters, timer, tokens=tokens, evaluate=evaluate,
                    metrics=step_metrics)
        metrics.update({k: step_metrics[k] for k in ("loss/total", "train/accuracy", "train/margin")})

    # 8. final evaluation and the policy in Hugging Face format ---------------------------------------------------
    metrics.update(data_metrics)
    return final_eval_and_save(ctx, accelerator, policy, metrics, evaluate, counters, timer, cfg.train.max_steps,
                               merged=cfg.save_merged)


# ---------------------------------------------------------------------------------------------------------------
# Pairs -> tokens -> a (2B) rollout: chosen rows first, then rejected


def _pairs(cfg: Config, tokenizer,
           image_inputs=None) -> tuple[list[PreferencePair], list[PreferencePair], dict[str, float]]:
    """Training and held-out pairs, after the tie and margin policies, each checked against the policy's image
    interface (`check_pair_images`). Returns (train, eval, data metrics)."""
    model_name = cfg.model.path or "the policy"
    pairs = load_preferences(cfg.data.train, tokenizer)
    check_pair_images(pairs, image_inputs, model_name)
    if cfg.data.eval is not None:
        eval_pairs = load_preferences(cfg.data.eval, tokenizer)
        check_pair_images(eval_pairs, image_inputs, model_name)
    else:  # the reward stage's split: whole prompts (pairs of one prompt share responses), same permutation
        pairs, eval_pairs = split_by_prompt(pairs, cfg.data.eval_fraction, cfg.seed, source=cfg.data.train)
    ties = [p for p in pairs + eval_pairs if p.tie]
    if ties and cfg.data.ties == "error":
        raise UserError(f"{cfg.data.train}: {len(ties)} pair(s) are ties (first: {ties[0].origin}); DPO has no loss "
                        "for a tie: set data.ties=drop to train on the strict pairs only")
    pairs = [p for p in pairs if not p.tie]
    eval_pairs = [p for p in eval_pairs if not p.tie]
    with_margin = sum(p.margin != 0.0 for p in pairs)
    if with_margin and cfg.data.margins == "ignore":
        print(f"note: {with_margin} training pairs carry a margin; DPO ignores it (data.margins=offset makes it a "
              "per-pair offset, ODPO)")
    if cfg.data.limit is not None and len(pairs) > cfg.data.limit:
        keep = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed + 1))[: cfg.data.limit]
        pairs = [pairs[i] for i in sorted(keep.tolist())]
    if not pairs:
        raise UserError(f"{cfg.data.train}: no training pair is left after dropping {len(ties)} ties")
    metrics = {"data/ties_dropped": float(len(ties)), "data/pairs_with_margin": float(with_margin)}
    return pairs, eval_pairs, metrics


def tokenize_pairs(pairs: list[PreferencePair], tokenizer, max_length: int,
                   image_inputs=None) -> tuple[list[PairTokens], dict[str, float]]:
    """Token ids of every pair, as the policy generates them: the prompt with BOS (`encode_prompt`, as SFT), each
    response without special tokens plus EOS (unless a chat template wrote one). A response that does not fit
    max_length with its prompt is cut on the right (losing its EOS); a pair whose prompt alone fills max_length is
    dropped (TRL drops those too). Each distinct text is tokenized once. Returns (pairs, counts).

    `image_inputs` (a vision-language policy): the prompt's image placeholder becomes the image tokens (they count
    in max_length, and are never cut: only responses are) and the pair keeps its image."""
    eos = tokenizer.eos_token_id
    expand = image_inputs.expand if image_inputs is not None else (lambda text: text)
    prompts = {t: encode_prompt(expand(t), tokenizer) for t in {p.prompt for p in pairs}}
    texts = sorted({t for p in pairs for t in (p.chosen, p.rejected)})
    ids = tokenizer(texts, add_special_tokens=False).input_ids if texts else []
    responses = {t: r if r and r[-1] == eos else r + [eos] for t, r in zip(texts, ids)}
    out, dropped, cut = [], 0, 0
    for p in pairs:
        prompt = prompts[p.prompt]
        room = max_length - len(prompt)
        if room <= 0:
            dropped += 1
            continue
        chosen, rejected = responses[p.chosen][:room], responses[p.rejected][:room]
        cut += (len(chosen) < len(responses[p.chosen])) + (len(rejected) < len(responses[p.rejected]))
        out.append(PairTokens(prompt, chosen, rejected, p.margin, p.images[0] if image_inputs is not None else None))
    return out, {"data/overlong_prompts_dropped": float(dropped), "data/responses_cut": float(cut)}


def pair_rollout(batch: list[PairTokens], pad_token_id: int, image_inputs=None,
                 pixel_dtype: torch.dtype = torch.float32) -> Rollout:
    """The pairs of a batch as one Rollout of 2B rows, [chosen..., rejected...]: prompts left-padded, responses
    right-padded, `response_mask` True on every response token (EOS included). `prompt_index` names the pair.
    `image_inputs` (a vision-language policy): `pixel_values` (2B, C, H, W) in `pixel_dtype`, pair i's image on
    rows i and B + i."""
    b = len(batch)
    prompts = [p.prompt for p in batch] * 2
    responses = [p.chosen for p in batch] + [p.rejected for p in batch]
    width_p, width_t = max(map(len, prompts)), max(map(len, responses))
    prompt_ids = torch.full((2 * b, width_p), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((2 * b, width_p), dtype=torch.bool)
    response_ids = torch.full((2 * b, width_t), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((2 * b, width_t), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        prompt_ids[i, width_p - len(p):] = torch.tensor(p)
        prompt_mask[i, width_p - len(p):] = True
        response_ids[i, : len(r)] = torch.tensor(r)
        response_mask[i, : len(r)] = True
    lengths = response_mask.sum(-1)
    pixel_values = None
    if image_inputs is not None:
        pixel_values = image_inputs.pixel_values([p.image for p in batch]).to(pixel_dtype).repeat(2, 1, 1, 1)
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                   response_mask=response_mask, ended=torch.ones(2 * b, dtype=torch.bool), lengths=lengths,
                   prompt_index=torch.arange(b).repeat(2), pixel_values=pixel_values)


def sequence_logps(policy: PolicyModel, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sequence log-probs (2B,), per-token log-probs (2B, T) zeroed outside the response) under `policy`."""
    token_logps = policy.forward(rollout).logprobs * rollout.response_mask
    return token_logps.sum(-1), token_logps


def _pair_loss(policy, rollout: Rollout, ref: torch.Tensor, batch: list[PairTokens], cfg: Config, pair_normalizer,
               token_normalizer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one micro-batch (its share of the global batch loss) and its detached stats."""
    b = len(batch)
    logps, token_logps = sequence_logps(policy, rollout)
    lengths = rollout.lengths
    margin = (torch.tensor([p.margin for p in batch], device=logps.device) if cfg.data.margins == "offset" else None)
    loss, stats = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], cfg.loss.beta, cfg.loss.type,
                           cfg.loss.label_smoothing, normalizer=pair_normalizer, margin=margin,
                           chosen_lengths=lengths[:b], rejected_lengths=lengths[b:])
    out = {"loss/dpo": loss.detach()}
    if cfg.loss.sft_weight > 0:
        sft = aggregate(-token_logps[:b], rollout.response_mask[:b], "token_mean", normalizer=token_normalizer)
        loss = loss + cfg.loss.sft_weight * sft
        out["loss/sft"] = sft.detach()
    out["loss/total"] = loss.detach()
    out.update({f"train/{k}": v for k, v in stats.items() if k != "loss"})
    out["train/logps_chosen"] = logps[:b].detach().mean()
    out["train/logps_rejected"] = logps[b:].detach().mean()
    return loss, out


@torch.no_grad()
def evaluate_pairs(policy: PolicyModel, eval_set: list[PairTokens], cfg: Config, reference_for, device) -> dict[str, float]:
    """Held-out preference metrics: eval/loss (the DPO loss, no SFT term), eval/accuracy, eval/margin and the implicit
    rewards eval/reward_chosen, eval/reward_rejected (means over pairs)."""
    if not eval_set:
        return {}
    totals: dict[str, float] = {}
    for start in range(0, len(eval_set), cfg.eval.batch_size):
        batch = eval_set[start:start + cfg.eval.batch_size]
        rollout = pair_rollout(batch, policy.tokenizer.pad_token_id, policy.image_inputs,
                               next(policy.model.parameters()).dtype).to(device)
        b = len(batch)
        logps, _ = sequence_logps(policy, rollout)
        ref = reference_for("eval", list(range(start, start + b)), rollout)
        margin = torch.tensor([p.margin for p in batch], device=device) if cfg.data.margins == "offset" else None
        _, stats = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], cfg.loss.beta, cfg.loss.type,
                            cfg.loss.label_smoothing, margin=margin, chosen_lengths=rollout.lengths[:b],
                            rejected_lengths=rollout.lengths[b:])
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + float(value) * b
    return {f"eval/{k}": v / len(eval_set) for k, v in totals.items()}


def _precomputed_reference(policy: PolicyModel, splits: dict[str, list[PairTokens]], cfg: Config, ctx: StageContext,
                           accelerator) -> dict[str, torch.Tensor]:
    """Reference log-probs of every pair, {split: (N, 2) [chosen, rejected]}, row i = pair i of the split. Computed
    once, each process scoring its share of the batches, gathered (every process needs all rows) and saved; a
    resumed stage loads them instead."""
    path = ctx.dir / REF_LOGPS_FILE
    sizes = {name: len(rows) for name, rows in splits.items()}
    if ctx.resume and path.is_file() and (saved := _saved_reference(path)) is not None:
        if {name: len(t) for name, t in saved.items()} == sizes:
            print(f"{ctx.name}: reusing the precomputed reference log-probs in {path}")
            return saved
    out = {}
    pad = policy.tokenizer.pad_token_id
    pixel_dtype = next(policy.model.parameters()).dtype
    was_training = policy.model.training
    policy.model.eval()
    with policy.reference() as reference:
        for name, rows in splits.items():
            def batch_logps(start: int, rows=rows) -> torch.Tensor:  # (batch, 2) [chosen, rejected]
                rollout = pair_rollout(rows[start:start + cfg.eval.batch_size], pad, policy.image_inputs,
                                       pixel_dtype).to(accelerator.device)
                with accelerator.autocast():
                    logps = sequence_logps(reference, rollout)[0].float()
                return torch.stack(logps.cpu().chunk(2), dim=1)

            parts = map_over_processes(batch_logps, range(0, len(rows), cfg.eval.batch_size), accelerator)
            out[name] = torch.cat(parts) if parts else torch.zeros(0, 2)
    policy.model.train(was_training)
    if accelerator.is_main_process:
        atomic_write(path, lambda tmp: torch.save(out, tmp))
    accelerator.wait_for_everyone()
    return out


def _saved_reference(path) -> dict[str, torch.Tensor] | None:
    """The reference log-probs a previous attempt saved, or None when the file is unreadable (cut by a kill or a full
    disk): they are only a cache, so they are computed again."""
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        print(f"{path} is unreadable ({reason}): computing the reference log-probs again")
        return None
    if isinstance(saved, dict) and all(isinstance(t, torch.Tensor) for t in saved.values()):
        return saved
    print(f"{path} does not hold reference log-probs: computing them again")
    return None

