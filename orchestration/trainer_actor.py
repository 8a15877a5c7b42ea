"""The trainer actor: a thin Ray shell around :class:`policy.trainer.PolicyTrainer`."""

from __future__ import annotations

from policy.batch import Group
from policy.models import state_checksum
from policy.trainer import PolicyTrainer


class TrainerActor:
    def __init__(self, model_dir: str, trainer_cfg, algorithm_cfg, temperature: float, max_tokens: int,
                 dtype: str, probe_ids: list[int]):
        self.trainer = PolicyTrainer(model_dir, trainer_cfg, algorithm_cfg, temperature, max_tokens, dtype)
        self.probe_ids = probe_ids

    def step(self, groups: list[Group]) -> dict[str, float]:
        return self.trainer.step(groups)

    def export(self):
        """(weights, version, checksum, probe) for a verified weight sync."""
        state = self.trainer.state_dict()
        probe = (self.probe_ids, self.trainer.probe_logprobs(self.probe_ids))
        return state, self.trainer.version, state_checksum(state), probe

    def save(self, directory: str) -> str:
        return str(self.trainer.save_checkpoint(directory))

    def load(self, directory: str) -> int:
        self.trainer.load_checkpoint(directory)
        return self.trainer.version
