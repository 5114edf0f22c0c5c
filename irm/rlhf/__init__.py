"""PPO fine-tuning's parts (paper 4.1, C), run by the rlhf stage (`irm.stages.rlhf`): the reward adapter and value
model in `adapter`, the TRL trainer subclass in `trainer` (TRL's internals it overrides in `trl_internals`),
full-state checkpoints in `checkpoint`, logging in `monitor`."""
