"""The GPT model and its parallel strategies; imported inside rank processes only."""
