"""LLM support: the only package that imports torch and transformers, and only on use.

Only ``abm.llm.backend`` imports them; every other module here (model names,
prompts, answer parsing, chat formats, ``stats``) imports on a core install, so
the rest of ``abm`` may import those freely and load the backend lazily.
"""
