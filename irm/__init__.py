"""irm: measure and explain how far an RLHF-tuned model's Implicit Reward Model diverges from its training reward."""

__version__ = "0.1.0"
