"""`rlhf reward`: train a Bradley-Terry reward model on preference pairs.

    L = L_BT + center_coef · mean((r_c + r_r)²) + λ · L_LM(chosen)

L_BT is the Bradley-Terry loss with optional per-pair margins and ties (`reward_models.losses`); the centering term
keeps scores near 0; L_LM (decoder backbones only) is the next-token loss on the chosen sequence, GPT-1's
L_total = L_2 + λ·L_1 auxiliary objective (Radford et al. 2018, eq. 3).

On a vision-language backbone (an SFT policy trained on image prompts) the reward model is image-conditioned: the
pairs carry their image (`images`, TRL's vision preference format), sampled pairs are drawn for image prompts with
their image, and every score (training, held-out, statistics) reads the prompt's image; the loss and the metrics are
the same code.

Steps: 1 accelerator and seed → 2 reward model → 3 preference pairs (loaded, or sampled from the SFT policy and
labelled by simulated annotators) → 4 held-out split and tokenization → 5 optimizer → 6 resume → 7 train loop
(log / eval / checkpoint) → 8 held-out evaluation (accuracy, margin, ECE, histogram, noise ceiling) → 9 score
statistics on SFT-policy samples → 10 save.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field

from rlhf.config import LoraSettings, OptimSettings, Section, StageConfig, TrainSettings
from rlhf.data import Record, load_prompts, load_records, prompt_text
from rlhf.distributed import (
    WholeWeights, check_engine, global_normalizer, make_accelerator, process_state, reduce_metrics, sync_unless_last,
)
from rlhf.errors import UserError
from rlhf.losses import lm_loss
from rlhf.stage import StageContext
from rlhf.tracking import progress
from rlhf.training import (
    end_of_step, make_optimizer, make_scheduler, micro_batch_indices, optimizer_step, progress_axes, resume_state,
)
from rlhf.vision import check_image_prompts, images_for, record_images
from reward_models.data import (
    check_pair_images, collate_pairs, group_by_prompt, load_preferences, split_by_prompt, tokenize_pairs,
)
from reward_models.evaluation import evaluate_pairs, plot_score_histogram
from reward_models.losses import bradley_terry_loss
from reward_models.model import RewardModel
from reward_models.pairs import PairSampling, noise_ceiling, sample_pairs, write_jsonl

PAIRS_FILE = "preferences.jsonl"  # sampled pairs, written into the stage directory (TRL format)
SAMPLES_FILE = "policy_samples.jsonl"  # the SFT samples the score statistics are measured on
HISTOGRAM_FILE = "eval_scores.png"


class RewardModelSettings(Section):
    """The backbone the reward head sits on."""

    path: str | None = Field(
        None, description="causal LM (e.g. the SFT output) or encoder directory / hub id; pkg:<package>/<dir> "
        "names a directory inside an installed python package"
    )
    tokenizer: str | None = Field(None, description="tokenizer directory or hub id; defaults to `path`")
    backbone: Literal["auto", "decoder", "encoder"] = Field(
        "auto", description="decoder: score at the last token; encoder: score on [CLS]; auto: from the model type"
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="weights dtype")
    lora: LoraSettings | None = Field(None, description="train LoRA adapters (merged on save) instead of all weights")
    warm_start: str | None = Field(
        None, description="a trained reward model (same backbone) whose trunk and score head this one starts from, "
        "instead of a new head on `path`: `rlhf loop` refreshes each round's reward model this way"
    )
    max_length: int = Field(128, ge=4, description="tokens per scored sequence; longer ones are truncated")


class PreferenceData(Section):
    """Where the pairs come from."""

    train: str | None = Field(None, description="preference pairs (JSONL, parquet, saved dataset dir or hub id); "
                              "null = sample them with `sample`")
    eval: str | None = Field(None, description="held-out pairs; null = hold out eval_fraction of train")
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="fraction of prompts whose pairs are held out "
                                 "when eval is null (split by prompt, so no response is in both sets)")
    split_seed: int | None = Field(None, description="seed of the held-out split when eval is null (null = seed): "
                                   "an ensemble's members share their first member's split")
    group_by_prompt: bool = Field(False, description="batch whole prompts: train.batch_size counts prompts, each "
                                  "response is scored once for all its comparisons (InstructGPT K-wise)")
    sample: PairSampling | None = Field(None, description="demo world: sample pairs from a policy and label them "
                                        "with simulated annotators")


class LossSettings(Section):
    """Terms of the training loss."""

    center_coef: float = Field(0.0, ge=0.0, description="weight of the reward-centering term mean((r_c + r_r)²)")
    lm_coef: float = Field(0.0, ge=0.0, description="λ: auxiliary next-token loss on the chosen sequence (decoders)")
    use_margin: bool = Field(True, description="use the pairs' `margin` field (false = train as if every margin is 0)")


class StatsSettings(Section):
    """The score mean / std stored with the model, which PPO / GRPO normalize rewards with."""

    policy: str | None = Field(None, description="policy to sample for the statistics; null = the sampled pairs' "
                               "responses (data.sample) or else the training pairs' responses")
    prompts: str = Field("data/demo/rl_prompts.jsonl", description="prompts for `policy`")
    num_samples: int = Field(512, ge=2, description="responses the statistics are measured on")
    max_new_tokens: int = Field(48, ge=1, description="response budget when sampling `policy`")


class EvalSettings(Section):
    """Held-out evaluation."""

    batch_size: int = Field(64, ge=1, description="sequences per scoring forward pass")
    ece_bins: int = Field(10, ge=1, description="confidence bins of the expected calibration error")
    hist_bins: int = Field(40, ge=2, description="bins of the score histogram (eval_scores.png)")


class EnsembleSettings(Section):
    """k reward models trained in one run, on the same pairs with other seeds (head init and data order): scored
    together they give a disagreement signal and conservative rewards (`rewards[].aggregate`)."""

    members: int = Field(1, ge=1, le=16, description="reward models in the ensemble (1 = a single model)")


class Config(StageConfig):
    """`rlhf reward`: train a Bradley-Terry reward model."""

    model: RewardModelSettings = Field(default_factory=RewardModelSettings, description="the reward model backbone")
    data: PreferenceData = Field(default_factory=PreferenceData, description="preference pairs")
    loss: LossSettings = Field(default_factory=LossSettings, description="loss terms")
    train: TrainSettings = Field(default_factory=TrainSettings, description="loop length, batch (in pairs) and cadence")
    optim: OptimSettings = Field(default_factory=OptimSettings, description="AdamW and lr schedule")
    stats: StatsSettings = Field(default_factory=StatsSettings, description="score statistics for normalization")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="held-out evaluation")
    ensemble: EnsembleSettings = Field(default_factory=EnsembleSettings, description="an ensemble of reward models")


def run(cfg: Config, ctx: StageContext) -> dict[str, float]:
    started = time.monotonic()
    # 1. accelerator and seed ---------------------------------------------------------------------------------
    accelerator = make_accelerator(cfg.train, cfg.seed)
    check_engine(accelerator, micro_batches=cfg.train.grad_accum,
                 merges="saving a LoRA reward model (merged)" if cfg.model.lora else None)

    # 2. reward model: a new score head on the backbone (+ the LM head when the auxiliary LM loss is on) -------
    if cfg.model.path is None:
        raise UserError("config key 'model.path' is required (the backbone: e.g. the SFT stage's output directory)")
    rm = RewardModel.from_backbone(
        cfg.model.path, tokenizer=cfg.model.tokenizer, backbone=cfg.model.backbone, dtype=cfg.model.dtype,
        lora=cfg.model.lora, with_lm_head=cfg.loss.lm_coef > 0, max_length=cfg.model.max_length,
    )
    if cfg.model.warm_start:
        rm.warm_start(cfg.model.warm_start)
    tokenizer = rm.tokenizer
    images = rm.image_inputs  # a vision-language backbone: every pair carries its prompt's image
    n_trainable = sum(p.numel() for p in rm.parameters() if p.requires_grad)
    print(f"{ctx.name}: {rm.backbone} reward model{' on images' if images else ''}, "
          f"{n_trainable / 1e6:.2f}M trainable parameters")

    # 3. preference pairs: sampled from the policy and labelled (demo), or read from a file --------------------
    samples: list[Record] | None = None
    train_source = cfg.data.train
    if train_source is None:
        if cfg.data.sample is None:
            raise UserError("set data.train (a preference file) or data.sample (sample pairs from a policy)")
        samples = _sampled_pairs(cfg.data.sample, ctx, cfg.seed, accelerator)
        train_source = str(ctx.dir / PAIRS_FILE)
    pairs = load_preferences(train_source, tokenizer)
    check_pair_images(pairs, images, cfg.model.path)
    if cfg.data.eval is not None:
        eval_pairs = load_preferences(cfg.data.eval, tokenizer)
        check_pair_images(eval_pairs, images, cfg.model.path)
    else:  # hold out whole prompts: pairs of one prompt may share responses
        pairs, eval_pairs = split_by_prompt(pairs, cfg.data.eval_fraction, _split_seed(cfg), source=train_source)
    if not cfg.loss.use_margin:
        for p in pairs:
            p.margin = 0.0

    # 4. tokenization: chosen and rejected of a micro-batch go through the model as one (2B, L) batch -----------
    # truncation keeps the end of each prompt and whole responses where they fit; what it cut is reported apart
    train_set, cut = tokenize_pairs(pairs, tokenizer, rm.backbone, cfg.model.max_length, images)
    _, eval_cut = tokenize_pairs(eval_pairs, tokenizer, rm.backbone, cfg.model.max_length, images)  # scored the same way
    data_metrics = {**cut.metrics("data/"), **eval_cut.metrics("data/eval_")}
    # the unit of a batch: one pair, or every pair of one prompt
    units = group_by_prompt(pairs) if cfg.data.group_by_prompt else [[i] for i in range(len(pairs))]
    print(f"{ctx.name}: {len(train_set)} training pairs ({len(units)} batch units), {len(eval_pairs)} held out, "
          f"{sum(p.tie for p in pairs)} ties in training")
    print(f"{ctx.name}: training: {cut.summary()}; held out: {eval_cut.summary()}")

    # 5. optimizer and schedule, prepared by accelerate ------------------------------------------------------------
    optimizer = make_optimizer(rm.parameters(), cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    whole_rm = WholeWeights(accelerator, rm)  # FSDP: an unsharded copy to evaluate and save with
    model, optimizer, scheduler = accelerator.prepare(rm, optimizer, scheduler)

    # 6. resume: weights, optimizer, scheduler and RNG; the data order is a function of the step --------------------
    start, counters, timer = resume_state(accelerator, ctx)

    def batch_for(micro_index: int) -> dict[str, torch.Tensor]:
        idx = micro_batch_indices(len(units), cfg.train.batch_size, micro_index, cfg.seed,
                                  accelerator.process_index, accelerator.num_processes)
        batch = collate_pairs([train_set[i] for u in idx for i in units[u]], tokenizer.pad_token_id, images)
        return {k: v.to(accelerator.device) for k, v in batch.items()}

    def evaluate(final: bool = False) -> dict[str, float]:
        metrics, chosen, rejected = evaluate_pairs(whole_rm.get(model), eval_pairs,
                                                   cfg.eval.batch_size, cfg.eval.ece_bins)
        ceiling = noise_ceiling(eval_pairs)
        if ceiling is not None:
            # the gold scorer's own accuracy on the noisy labels: the best a reward model can expect
            metrics["eval/noise_ceiling"] = ceiling
            metrics["eval/accuracy_vs_ceiling"] = metrics["eval/accuracy"] / ceiling
        if final and accelerator.is_main_process:
            plot_score_histogram(chosen, rejected, ctx.dir / HISTOGRAM_FILE, cfg.eval.hist_bins)
        return metrics

    # 7. train loop ---------------------------------------------------------------------------------------------
    model.train()
    metrics: dict[str, float] = {}
    for step in progress(range(start, cfg.train.max_steps), total=cfg.train.max_steps, initial=start, desc=ctx.name):
        micro = [batch_for(step * cfg.train.grad_accum + m) for m in range(cfg.train.grad_accum)]
        # global denominators (all micro-batches and processes): pairs for the BT loss, chosen tokens for the LM
        # loss, so accumulation equals one big batch even when micro-batches hold different numbers of pairs
        pair_normalizer = global_normalizer(accelerator, sum(float(len(b["label"])) for b in micro)).item()
        lm_normalizer = global_normalizer(accelerator, sum(
            rm.lm_mask(b["input_ids"], b["attention_mask"])[: int(b["lm_rows"])].sum() for b in micro))
        totals: dict[str, float] = {}
        for i, batch in enumerate(micro):
            share = len(batch["label"]) / pair_normalizer  # this micro-batch's part of the mean over pairs
            with accelerator.autocast(), sync_unless_last(accelerator, model, i, len(micro)):
                inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values")
                          if k in batch}
                out = model(**inputs, lm_rows=int(batch["lm_rows"]) if cfg.loss.lm_coef > 0 else 0)
                scores = out[0] if isinstance(out, tuple) else out
                loss, stats = bradley_terry_loss(scores[batch["chosen_index"]], scores[batch["rejected_index"]],
                                                 batch["margin"], batch["label"], cfg.loss.center_coef)
                loss = loss * share
                if cfg.loss.lm_coef > 0:
                    lm, _ = lm_loss(out[1], out[2], out[3], lm_normalizer)
                    stats["loss/lm"] = lm.detach() / share  # logged as the full-batch LM loss
                    loss = loss + cfg.loss.lm_coef * lm
                accelerator.backward(loss)
            for key, value in {"loss/total": loss.detach() / share, **stats}.items():
                totals[key] = totals.get(key, 0.0) + float(value) * share
        grad_norm = optimizer_step(accelerator, model, optimizer, scheduler, cfg.optim.max_grad_norm,
                                   loss=totals["loss/total"])

        tokens = int(sum(b["attention_mask"].sum() for b in micro)) * accelerator.num_processes
        counters["samples"] += sum(len(b["label"]) for b in micro) * accelerator.num_processes
        counters["tokens"] += tokens
        end_of_step(ctx, accelerator, cfg.train, step + 1, counters, timer, tokens=tokens, evaluate=evaluate, metrics={
            **totals, "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm})
        metrics["loss/total"] = totals["loss/total"]

    # 8. held-out evaluation, with the score histogram -----------------------------------------------------------------
    rm = whole_rm.get(model)
    metrics = {**reduce_metrics(accelerator, metrics), **evaluate(final=True)}

    # 9. score statistics on samples of the SFT policy (PPO / GRPO normalize rewards with them) -------------------
    stat_prompts, stat_completions, stat_images, source = _stats_samples(cfg, pairs, samples, rm)
    stats = rm.set_stats(rm.score(stat_prompts, stat_completions, cfg.eval.batch_size, images=stat_images), source)
    metrics.update({"eval/sft_score_mean": stats["mean"], "eval/sft_score_std": stats["std"]})
    metrics.update(data_metrics)
    metrics["perf/stage_seconds"] = time.monotonic() - started
    ctx.tracker.log({**metrics, **progress_axes(counters, timer)}, step=cfg.train.max_steps)

    # 10. the reward model in Hugging Face format (AutoModelForSequenceClassification, num_labels=1) -------------
    if accelerator.is_main_process:
        rm.save(ctx.dir)
    accelerator.wait_for_everyone()

    # 11. the other members of an ensemble, each a reward stage of its own in members/ (resumable the same way) -----
    if cfg.ensemble.members > 1:
        metrics.update(_train_members(cfg, ctx, train_source, rm, eval_pairs))
    return metrics


MEMBERS_DIR = "members"


def _split_seed(cfg: Config) -> int:
    return cfg.data.split_seed if cfg.data.split_seed is not None else cfg.seed


def _train_members(cfg: Config, ctx: StageContext, train_source: str, first: RewardModel,
                   eval_pairs) -> dict[str, float]:
    """Train members 2..k on this stage's pairs and held-out split with seeds seed + 1 ..., list them in
    ensemble.json beside the first member (this directory), and score the ensemble on the held-out pairs."""
    import json

    from rlhf.config import set_dotted, validate
    from rlhf.pipeline import run_stage
    from rlhf.stage import atomic_write
    from reward_models.scoring import ENSEMBLE_FILE, ensemble_members

    if process_state().num_processes > 1:
        raise UserError("ensemble.members > 1 runs in one process; launch the reward stage without accelerate")
    previous = ensemble_members(cfg.model.warm_start) if cfg.model.warm_start else []
    names, members = [], [first]
    for i in range(1, cfg.ensemble.members):
        data = cfg.model_dump(mode="json")
        for key, value in {"seed": cfg.seed + i, "output_dir": str(ctx.dir / MEMBERS_DIR / f"member-{i}"),
                           "ensemble.members": 1, "data.train": train_source, "data.sample": None,
                           "data.split_seed": _split_seed(cfg),
                           "model.warm_start": previous[i - 1] if i - 1 < len(previous) else None}.items():
            set_dotted(data, key, value)
        member = validate(Config, data, source=f"{ctx.name} ensemble member {i}")
        run_stage("reward", member, name=f"{ctx.name}/member-{i}", rerun=True, debug=ctx.debug)
        names.append(f"{MEMBERS_DIR}/member-{i}")
        members.append(RewardModel.load(member.output_dir, max_length=cfg.model.max_length))
    atomic_write(ctx.dir / ENSEMBLE_FILE, json.dumps({"members": names}, indent=1))
    return ensemble_metrics(members, eval_pairs, cfg.eval.batch_size)


def ensemble_metrics(members: list[RewardModel], pairs, batch_size: int = 64) -> dict[str, float]:
    """Held-out accuracy of the members' mean (normalized) score and of each member on average, and their
    disagreement (std over members of a response's normalized score, averaged over responses)."""
    from reward_models.losses import pairwise_accuracy

    chosen, rejected, accuracies = [], [], []
    for m in members:
        metrics, c, r = evaluate_pairs(m, pairs, batch_size)
        accuracies.append(metrics["eval/accuracy"])
        chosen.append(m.normalize(c) if m.stats is not None else c)
        rejected.append(m.normalize(r) if m.stats is not None else r)
    chosen, rejected = torch.stack(chosen), torch.stack(rejected)
    label = torch.tensor([p.label for p in pairs])
    return {
        "eval/ensemble_accuracy": pairwise_accuracy(chosen.mean(0) - rejected.mean(0), label).item(),
        "eval/member_accuracy_mean": sum(accuracies) / len(accuracies),
        "eval/ensemble_disagreement": torch.cat([chosen.std(0), rejected.std(0)]).mean().item(),
        "eval/ensemble_members": float(len(members)),
    }


def _sampled_pairs(settings: PairSampling, ctx: StageContext, seed: int, accelerator) -> list[Record]:
    """Sample and label the demo pairs into the stage directory (once, on the main process; reused on resume).
    Returns the SFT samples the pairs were drawn from: records of prompt, completion (and images)."""
    pairs_path, samples_path = ctx.dir / PAIRS_FILE, ctx.dir / SAMPLES_FILE
    if accelerator.is_main_process and not (pairs_path.is_file() and samples_path.is_file()):
        from rlhf.policy import PolicyModel

        if settings.policy is None:
            raise UserError("config key 'data.sample.policy' is required to sample pairs (the SFT stage output)")
        policy = PolicyModel.from_pretrained(settings.policy).to(accelerator.device)
        rows, samples = sample_pairs(policy, load_prompts(settings.prompts), settings, seed)
        write_jsonl(rows, pairs_path)
        write_jsonl(samples, samples_path)
        del policy
    accelerator.wait_for_everyone()
    return load_records(samples_path)


def _stats_samples(cfg: Config, pairs, samples: list[Record] | None,
                   rm: RewardModel) -> tuple[list[str], list[str], list | None, str]:
    """(prompts, completions, images, description) to measure the score statistics on: a policy's fresh samples, the
    SFT samples the pairs were drawn from, or else the responses of the training pairs. `images`: each row's image
    for an image reward model (None for a text one)."""
    n = cfg.stats.num_samples
    with_images = rm.image_inputs is not None
    if cfg.stats.policy is not None:
        from rlhf.policy import PolicyModel

        policy = PolicyModel.from_pretrained(cfg.stats.policy)
        records: list[Record] = load_prompts(cfg.stats.prompts)
        check_image_prompts(records, policy.image_inputs, cfg.stats.policy,
                            prompt_of=lambda r: prompt_text(r, policy.tokenizer))
        rows = [records[i % len(records)] for i in range(n)]
        prompts = [prompt_text(r, policy.tokenizer) for r in rows]
        completions = []
        for start in range(0, n, cfg.eval.batch_size):
            rollout = policy.generate(prompts[start:start + cfg.eval.batch_size],
                                      max_new_tokens=cfg.stats.max_new_tokens, seed=cfg.seed + start,
                                      images=images_for(rows[start:start + cfg.eval.batch_size], policy.image_inputs))
            completions += rollout.completions
        return prompts, completions, images_for(rows, rm.image_inputs), f"samples of {cfg.stats.policy}"
    if samples is not None:
        rows = samples[:n]
        images = [record_images(r)[0] for r in rows] if with_images else None
        return [r["prompt"] for r in rows], [r["completion"] for r in rows], images, f"samples of {cfg.data.sample.policy}"
    prompts = [p.prompt for p in pairs for _ in range(2)][:n]
    completions = [c for p in pairs for c in (p.chosen, p.rejected)][:n]
    images = [p.images[0] for p in pairs for _ in range(2)][:n] if with_images else None
    return prompts, completions, images, "responses of the training pairs"
