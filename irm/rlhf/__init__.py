"""Stage 1, PPO fine-tuning (paper 4.1, C): `run(cfg)` in `irm.rlhf.stage`; the reward adapter and value model in
`adapter`, the TRL trainer subclass in `trainer`, full-state checkpoints in `checkpoint`, logging in `monitor`."""

from irm.rlhf.stage import run

__all__ = ["run"]
