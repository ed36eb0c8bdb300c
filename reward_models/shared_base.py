"""A LoRA reward model on the policy's own base: one more adapter, no second copy of the weights.

When the reward stage trained its model as LoRA on the same SFT base the policy starts from, PPO runs it as a frozen
adapter on the policy's model (`PolicyModel.add_adapter` / `using_adapter`) and hands it to `Scorer(models=...)`.

An image reward model is not shared: a LoRA vision-language policy trains its projector whole (peft wraps it in
`modules_to_save`), and the reward adapter's LoRA weights of the projector do not load onto that wrapped module
(peft reports them as unexpected keys), so as an adapter it would score without its own projector. It loads as a
model of its own instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from rlhf.config import LoraSettings
from rlhf.policy import PolicyModel
from reward_models.model import ADAPTER_DIR, RewardModel, is_reward_model_dir
from reward_models.scoring import RewardComponent


class SharedBaseClassifier(nn.Module):
    """The `hf` of a `RewardModel` whose trunk is the policy's frozen base with the reward model's adapter active.

    `RewardModel.forward` reads `hf.base_model(...).last_hidden_state` and `hf.score`; here the trunk call runs the
    policy's model under `using_adapter`, in eval mode and without grad. The policy is held outside the module tree,
    so the scorer's `.eval()` / `requires_grad_(False)` on the reward model never touch the policy's weights.
    """

    def __init__(self, policy: PolicyModel, adapter: str, lora: LoraSettings, score: nn.Linear, config):
        super().__init__()
        self.score = score
        self.config = config
        self.adapter, self.lora = adapter, lora
        self._policy = [policy]  # not a submodule

    @property
    def base_model(self):
        return self._trunk

    @torch.no_grad()
    def _trunk(self, input_ids, attention_mask, position_ids=None, use_cache=False):
        from types import SimpleNamespace

        policy = self._policy[0]
        was_training = policy.model.training
        policy.model.eval()
        try:
            with policy.using_adapter(self.adapter):
                out = policy.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   logits_to_keep=1, output_hidden_states=True, use_cache=False)
        finally:
            policy.model.train(was_training)
        return SimpleNamespace(last_hidden_state=out.hidden_states[-1])


def shared_reward_models(rewards: list[RewardComponent], policy: PolicyModel,
                         base_path: str | None) -> dict[str, RewardModel]:
    """Reward components whose model was trained as LoRA on the policy's own base (its `adapter/` records that
    base): each is loaded as a frozen adapter on the policy's model, with its score head. Name -> reward model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    if base_path is None or not Path(base_path).expanduser().is_dir():
        return {}
    base = Path(base_path).expanduser().resolve()
    shared: dict[str, RewardModel] = {}
    for c in rewards:
        adapter_dir = Path(c.model or "") / ADAPTER_DIR
        if c.model is None or not (adapter_dir / "adapter_config.json").is_file():
            continue
        if is_reward_model_dir(c.model):  # an image reward model (see the module docstring): loaded on its own
            print(f"reward '{c.name}': an image reward model; loaded as a model of its own, not as an adapter")
            continue
        saved = json.loads((adapter_dir / "adapter_config.json").read_text())
        if Path(saved.get("base_model_name_or_path") or "/nonexistent").expanduser().resolve() != base:
            continue
        name = f"reward_{c.name}"
        lora = LoraSettings(r=saved["r"], alpha=saved["lora_alpha"], dropout=0.0, target_modules=saved["target_modules"])
        policy.add_adapter(name, lora)
        weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
        head_weights = {k.rsplit(".", 1)[-1]: weights.pop(k) for k in list(weights) if ".score." in k}
        set_peft_model_state_dict(policy.model, weights, adapter_name=name)
        for param_name, param in policy.model.named_parameters():
            if f".{name}." in param_name:
                param.requires_grad_(False)  # the reward model is frozen
        score = nn.Linear(head_weights["weight"].size(1), 1, bias="bias" in head_weights).to(policy.device)
        score.load_state_dict(head_weights)
        config = AutoConfig.from_pretrained(c.model)
        classifier = SharedBaseClassifier(policy, name, lora, score, config)
        shared[c.name] = RewardModel(classifier, AutoTokenizer.from_pretrained(c.model), "decoder")
        print(f"reward '{c.name}': LoRA reward model on the policy's base, run as adapter '{name}' (no second copy)")
    return shared
