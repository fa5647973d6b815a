"""Compression front-end: dense Hugging Face causal LM -> folded model."""
