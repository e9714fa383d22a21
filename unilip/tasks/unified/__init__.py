"""The unified task (`task=unified`): UAE's Unified-GRPO on UniLIP, the captioner and the generator as one
auto-encoder trained on the similarity of an image to its regeneration."""
