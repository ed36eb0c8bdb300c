"""PPO's critic: the value function V(state before each response token), in one of three topologies.

    model       a separate value model initialised from the reward model: its score head read at every position,
                on the reward's scale (InstructGPT; Huang et al. 2024, "The N+ Implementation Details").
                Without a learned reward model: the policy's weights with a zero head.
    value_head  a scalar head on the policy's own trunk (shared weights; lm-human-preferences): its values come out
                of the policy's forward pass.
    adapter     with LoRA: a second adapter plus a head on the policy's frozen base, so policy, reference (adapters
                off) and critic share one copy of the weights.

`build_critic` is the one place that reads `critic.kind`; a recipe sees a `Critic` (cleanrl's `Agent.get_value`,
verl's `BasePPOCritic.compute_values`): `values(policy, rollout)`, `module` (what the optimizer and accelerate
receive, None when it lives inside the policy), `shares_policy_forward`, `policy_parameters(policy)` and `save`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from rlhf.config import LoraSettings, ModelSettings, Section
from rlhf.errors import UserError
from rlhf.policy import VALUE_HEAD_FILE, PolicyModel
from rlhf.types import Rollout
from reward_models.model import RewardModel, is_reward_model_dir
from reward_models.scoring import RewardComponent

CRITIC_DIR = "critic"  # the critic's files inside the stage directory
CRITIC_ADAPTER = "critic"  # the critic adapter's name on a LoRA policy (peft writes it to <stage dir>/critic too)


class CriticSettings(Section):
    """The value function V(state before each response token)."""

    kind: Literal["model", "value_head", "adapter"] = Field(
        "model", description="model = a separate value model (from the reward model); value_head = a head on the "
        "policy's trunk; adapter = a second LoRA adapter + head on the policy's frozen base (needs model.lora)")
    path: str | None = Field(
        None, description="model: initial weights, a reward model directory (its score head read per token) or a causal "
        "LM (a zero head); null = the first reward model in `rewards`, else the policy")
    normalize: bool = Field(
        True, description="model from a reward component: read values on that component's scale (weight·score, "
        "normalized as the scorer normalizes it), so initial values match the rewards; false = the raw score")
    lora: LoraSettings | None = Field(None, description="adapter: the critic adapter's settings (null = model.lora's)")
    warmup_steps: int = Field(0, ge=0, description="the first N steps train only the critic; the policy does not move")


def policy_settings(model: ModelSettings, critic: CriticSettings) -> ModelSettings:
    """The policy's settings with what the critic needs of it: a value head for `value_head`, LoRA for `adapter`."""
    if critic.kind == "adapter" and model.lora is None:
        raise UserError("config key 'critic.kind' is 'adapter': set model.lora too (the critic adapter shares the "
                        "policy's frozen base), or use critic.kind: model")
    return model.model_copy(update={"value_head": critic.kind == "value_head"})


class Critic:
    """V per response token, with gradients. Shape: (B, T)."""

    shares_policy_forward = False  # True: the values come from `policy.forward(..., with_values=True)`

    def __init__(self, module: nn.Module | None):
        self.module = module  # trained beside the policy (replaced by its prepared wrapper); None = inside the policy

    def values(self, policy: PolicyModel, rollout: Rollout) -> torch.Tensor:
        raise NotImplementedError

    def policy_parameters(self, policy: PolicyModel) -> list[nn.Parameter]:
        """The policy's own trainable weights (what a critic warm-up keeps still): a shared trunk counts as policy."""
        return [p for p in policy.model.parameters() if p.requires_grad]

    def keep_whole_weights(self, accelerator) -> None:
        """Call before `accelerator.prepare`: under FSDP, an unsharded copy of the module for `bare` to fill."""
        from rlhf.distributed import WholeWeights

        self._whole = WholeWeights(accelerator, self.module) if self.module is not None else None

    def bare(self, accelerator) -> nn.Module | None:
        """The trained module without accelerate's wrapper, with whole weights (every process must call it)."""
        if self.module is None:
            return None
        whole = getattr(self, "_whole", None)
        return whole.get(self.module) if whole is not None else accelerator.unwrap_model(self.module)

    def save(self, stage_dir: Path, module: nn.Module | None) -> None:
        """Write the critic beside the saved policy (main process only). `module`: `bare(accelerator)`."""


class ValueHeadCritic(Critic):
    """A head on the policy's trunk: `PolicyModel.forward` reads it; the policy's save writes it."""

    shares_policy_forward = True

    def __init__(self):
        super().__init__(None)

    def values(self, policy: PolicyModel, rollout: Rollout) -> torch.Tensor:
        return policy.forward(rollout, with_values=True).values


class ValueModel(nn.Module):
    """A critic of its own: a decoder reward model's trunk and score head, read before every response token.

    V_t = scale · score(prefix up to the token before y_t) + shift, so that a critic initialised from a reward model
    starts on the scale the scorer gives that reward (`reward_scale`). An image reward model reads each row's image
    (the rollout's `pixel_values`).
    """

    def __init__(self, rm: RewardModel, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.rm = rm
        self.scale, self.shift = float(scale), float(shift)

    def forward(self, rollout: Rollout) -> torch.Tensor:
        """Values of the states before each response token. Shape: (B, T)."""
        inputs = rollout.model_inputs()
        t = rollout.response_ids.size(1)
        scores = self.rm.token_scores(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"],
                                      inputs.get("pixel_values"))
        return scores[:, -t - 1:-1] * self.scale + self.shift

    def save(self, path: str | Path) -> None:
        """The trunk and head as a Hugging Face sequence classifier, plus the scale and shift (critic.json)."""
        self.rm.save(path)
        (Path(path) / "critic.json").write_text(json.dumps({"scale": self.scale, "shift": self.shift}, indent=2))


class SeparateCritic(Critic):
    """A value model of its own (`ValueModel`), saved as a sequence classifier under `critic/`."""

    def values(self, policy: PolicyModel, rollout: Rollout) -> torch.Tensor:
        return self.module(rollout)

    def save(self, stage_dir: Path, module: nn.Module | None) -> None:
        module.save(Path(stage_dir) / CRITIC_DIR)


class AdapterCritic(Critic):
    """A second adapter on the policy's frozen base plus a scalar head (`module`); peft saves the adapter under
    `critic/` with the policy, the head goes beside it."""

    def values(self, policy: PolicyModel, rollout: Rollout) -> torch.Tensor:
        with policy.using_adapter(CRITIC_ADAPTER):
            inputs = rollout.model_inputs()
            t = rollout.response_ids.size(1)
            out = policy.model(**inputs, logits_to_keep=1, output_hidden_states=True, use_cache=False)
            hidden = out.hidden_states[-1][:, -t - 1:-1]
            return self.module(hidden.to(self.module.weight.dtype)).squeeze(-1)

    def policy_parameters(self, policy: PolicyModel) -> list[nn.Parameter]:
        return [p for n, p in policy.model.named_parameters() if p.requires_grad and f".{CRITIC_ADAPTER}." not in n]

    def save(self, stage_dir: Path, module: nn.Module | None) -> None:
        from safetensors.torch import save_file

        (Path(stage_dir) / CRITIC_DIR).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in module.state_dict().items()},
                  str(Path(stage_dir) / CRITIC_DIR / VALUE_HEAD_FILE))


def build_critic(settings: CriticSettings, policy: PolicyModel, rewards: list[RewardComponent],
                 model: ModelSettings, shared: dict[str, RewardModel]) -> Critic:
    """The critic `settings.kind` names, on `policy` (loaded with `policy_settings`). `shared`: reward models that
    run as adapters on the policy's base (`reward_models.shared_base`); an adapter critic starts from one of them."""
    if settings.kind == "value_head":
        return ValueHeadCritic()
    if settings.kind == "adapter":
        return AdapterCritic(_critic_adapter(settings, policy, rewards, model, shared).to(policy.device))
    value = _value_model(settings, rewards, model, policy.tokenizer, policy.image_inputs)
    return SeparateCritic(value.to(policy.device))


def _check_critic_images(rm: RewardModel, policy_images, source: str | None) -> None:
    """A separate critic reads the policy's rollouts, images included (their pixel values, as the policy's image
    processor made them): an image critic needs an image policy with the same image processing, a text one a text
    policy. `policy_images`: the policy's `image_inputs`."""
    if (rm.image_inputs is None) != (policy_images is None):
        what = "an image reward model" if rm.image_inputs is not None else "a text-only model"
        raise UserError(f"critic from {source}: {what}, but the policy is "
                        f"{'text-only' if policy_images is None else 'a vision-language model'}; use a critic "
                        "of the policy's kind (critic.path) or critic.kind: value_head")
    if rm.image_inputs is not None and (
            rm.image_inputs.tokens_per_image != policy_images.tokens_per_image
            or rm.image_inputs.processor.to_dict() != policy_images.processor.to_dict()):
        raise UserError(f"critic from {source}: its image processor differs from the policy's, so it cannot read the "
                        "policy's pixel values; use a critic built on the policy's vision tower")


def reward_scale(component: RewardComponent | None, stats: dict | None, normalize: bool) -> tuple[float, float]:
    """(scale, shift) that put a reward model's raw score on the scale the scorer gives its component: weight ·
    (score − mean) / std with the stored statistics when the component normalizes, else weight · score. With no
    component, or `normalize` false (critic.normalize), the raw score: (1, 0)."""
    if component is None or not normalize:
        return 1.0, 0.0
    if component.normalize and stats is not None:
        std = max(stats["std"], 1e-6)
        return component.weight / std, -component.weight * stats["mean"] / std
    return component.weight, 0.0


def _value_model(settings: CriticSettings, rewards: list[RewardComponent], model: ModelSettings, tokenizer,
                 image_inputs=None) -> ValueModel:
    """The separate critic: from `critic.path`, else the first reward model component, else the policy's weights.
    `tokenizer`, `image_inputs`: the policy's, whose rollouts it reads."""
    component = next((c for c in rewards if c.model is not None), None)
    path = settings.path or (component.model if component is not None else model.path)
    if path is None:
        raise UserError("config key 'critic.path' is required when the policy is built from scratch and no reward "
                        "model is configured")
    scale, shift = 1.0, 0.0
    if _is_reward_model(path):
        rm = RewardModel.load(path)
        owner = next((c for c in rewards if c.model == path), None)
        scale, shift = reward_scale(owner, rm.stats, settings.normalize)
    else:  # a causal LM (e.g. the policy): its trunk and a zero head, V = 0 at start
        rm = RewardModel.from_backbone(path, tokenizer=model.tokenizer)
        nn.init.zeros_(rm.hf.score.weight)
    if rm.backbone != "decoder":
        raise UserError(f"critic from {path}: an encoder cannot give per-token values; use a decoder reward model or "
                        "critic.kind: value_head")
    _check_critic_images(rm, image_inputs, path)
    if rm.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"critic from {path}: its tokenizer differs from the policy's, so it cannot read the policy's "
                        "tokens; set critic.path to a model with the policy's tokenizer, or use critic.kind: value_head")
    return ValueModel(rm, scale, shift)


def _is_reward_model(path: str) -> bool:
    """A sequence-classification checkpoint with one label (the reward stage's output), or an image reward model
    (a vision-language model with its score head), not a causal LM."""
    if is_reward_model_dir(path):
        return True
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # not JSON, not UTF-8 text, unreadable
        raise UserError(f"critic from {path}: {config_file} is not a readable JSON model config ({exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"critic from {path}: {config_file} is not a JSON object of model settings")
    architectures = config.get("architectures") or []
    return isinstance(architectures, list) and any(str(a).endswith("ForSequenceClassification") for a in architectures)


def _critic_adapter(settings: CriticSettings, policy: PolicyModel, rewards: list[RewardComponent],
                    model: ModelSettings, shared: dict[str, RewardModel]) -> nn.Linear:
    """The critic as a second adapter on the policy's base, plus its head. When the reward model it starts from
    (`critic.path`, else the first reward model) runs on that base (`shared`), the adapter and head start as that
    reward model's, on its reward scale; otherwise a fresh adapter and a zero head (V = 0)."""
    source = settings.path or next((c.model for c in rewards if c.model is not None), None)
    owner = next((c for c in rewards if c.model is not None and c.model == source and c.name in shared), None)
    hidden = policy.model.config.hidden_size
    if owner is None:
        policy.add_adapter(CRITIC_ADAPTER, settings.lora or model.lora)
        head = nn.Linear(hidden, 1)
        nn.init.zeros_(head.weight)  # V = 0 at start, the mean of the normalized rewards
        nn.init.zeros_(head.bias)
        return head
    rm = shared[owner.name]
    reward_adapter = rm.hf.adapter
    policy.add_adapter(CRITIC_ADAPTER, rm.hf.lora)
    params = dict(policy.model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            if f".{CRITIC_ADAPTER}." in name:
                param.copy_(params[name.replace(f".{CRITIC_ADAPTER}.", f".{reward_adapter}.")])
    scale, shift = reward_scale(owner, rm.stats, settings.normalize)
    head = nn.Linear(hidden, 1)
    with torch.no_grad():
        head.weight.copy_(rm.hf.score.weight * scale)
        head.bias.fill_(shift + (float(rm.hf.score.bias) * scale if rm.hf.score.bias is not None else 0.0))
    return head
