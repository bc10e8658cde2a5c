"""Post-training analysis of LoRA updates (LoRA paper §7): subspace similarity φ and amplification factor."""
