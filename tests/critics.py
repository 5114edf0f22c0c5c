"""The PPO tests' reference critic: the value model as it was before the head-only critic's shared trunk."""


def frozen_copy(original):
    """A stand-in for `irm.rlhf.adapter.value_model_from`: `original(policy)`, the full value model (built with the
    same random draws as the head-only critic), with its body frozen and its head trainable."""

    def build(policy, lora=None, head_only=False):
        value = original(policy)
        value.requires_grad_(False)
        value.score.requires_grad_(True)
        return value

    return build
