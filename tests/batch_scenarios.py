"""The tiny rule-only base scenario the batch tests sweep over."""


def tiny_base(noise: float = 0.0, rounds: int = 3) -> str:
    """Three players (all_d, tit_for_tat, random) in a round robin with self-play."""
    return f"""
name = "tiny"
seed = 5
[game]
noise = {noise}
[match]
rounds = {rounds}
[graph]
kind = "complete"
self_loops = true
[population]
players = ["all_d", "tit_for_tat", {{ name = "random", p = 0.5 }}]
[output]
charts = false
rounds = false
"""
