"""Models: loading any Hugging Face causal LM, the builtin small model, LoRA, value heads."""
