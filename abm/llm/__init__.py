"""LLM support: the only package that imports torch and transformers, and only on use."""
