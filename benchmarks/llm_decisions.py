"""Decisions per second of the round-robin LLM workload: naive loop vs abm.

    python benchmarks/llm_decisions.py [--model smollm2-135m-instruct] [--device auto]

1. Runs scenarios/round_robin.toml once (score mode, reflections off) to get
   the 35 prompts the LLM is asked, grouped as the engine batches them (one
   batch per round).
2. score mode: the naive way scores each decision alone with two full forward
   passes (prompt + each answer), no reuse; abm scores each round's batch at
   once with the shared-prefix KV cache and answers repeated prompts once;
   "abm phrasings" scores every phrasing of the police framing (6 for C, 4 for
   D, as the policy does) on one prefill and one step per level of their trie.
3. generate mode: the naive way calls transformers' generate once per
   decision; abm
   generates each round's distinct prompts in one batch on the shared-prefix
   cache.
Every way runs in this process on the same prompts, greedy; the script says
how many decisions each pair agrees on (the same mode must agree on all).
The baseline is "naive generate": one transformers generate call per
decision with the full prompt. Every tensor is built on the model's device, so
the script runs on a GPU as it does on a CPU (``--device cuda``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np
import tomli_w
import torch

ROOT = Path(__file__).resolve().parents[1]


def collect_prompts(model: str, device: str) -> list[list[list[dict]]]:
    from abm.run import run_scenario

    data = tomllib.loads((ROOT / "scenarios" / "round_robin.toml").read_text())
    llm = data["population"]["players"][-1]
    llm.update(reflection=False, model=model, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rr.toml"
        path.write_text(tomli_w.dumps(data))
        out = run_scenario(path, out=Path(tmp) / "run", quiet=True)
        lines = [json.loads(line) for line in (out / "transcripts.jsonl").read_text().splitlines()]
    batches: dict[tuple[int, int], list] = {}
    for line in lines:
        batches.setdefault((line["step"], line["round"]), []).append(line["prompt"])
    return [batches[k] for k in sorted(batches)]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--new-tokens", type=int, default=8, help="generate mode answer length")
    parser.add_argument(
        "--decode",
        choices=("auto", "eager", "static", "compiled"),
        default="auto",
        help="abm generate's decode path (compiled counts its compile time: see decode_steps.py)",
    )
    args = parser.parse_args()

    from abm.llm.backend import Backend
    from abm.llm.models import resolve
    from abm.llm.parsing import parse_answer
    from abm.llm.prompts import police

    batches = collect_prompts(args.model, args.device)
    n = sum(len(b) for b in batches)
    framing = police()
    prefix = framing.answer_prefix
    naive = Backend(resolve(args.model), device=args.device, prefix_cache=False)
    fast = Backend(resolve(args.model), device=args.device, prefix_cache=True, decode=args.decode)
    context = fast.render(batches[0][0], prefix)
    labels = tuple(
        fast.continuation_ids(context, " " + label) for label in (framing.label_c, framing.label_d)
    )
    print(
        f"model {args.model} on {naive.device}; {n} decisions in {len(batches)} batches; "
        f"abm decodes {fast.decode_path}"
    )

    def naive_score():
        out = []
        for batch in batches:
            for messages in batch:
                ids = naive.encode(messages, prefix)
                lp = []
                for lab in labels:  # one full pass per answer: no batching, no reuse
                    with torch.inference_mode():
                        logits = naive.model(
                            input_ids=torch.tensor([ids + lab], device=naive.device)
                        ).logits[0]
                    logp = torch.log_softmax(logits.float(), dim=-1)
                    lp.append(sum(logp[len(ids) - 1 + j, t].item() for j, t in enumerate(lab)))
                out.append(int(lp[1] > lp[0]))
        return out

    def abm_score():
        out, memo = [], {}
        for batch in batches:
            ids = [tuple(fast.encode(m, prefix)) for m in batch]
            todo = list(dict.fromkeys(i for i in ids if i not in memo))
            if todo:
                memo.update(zip(todo, fast.score([list(t) for t in todo], labels), strict=True))
            out += [int(memo[i][1] > memo[i][0]) for i in ids]
        return out

    def naive_generate():
        out = []
        tok = naive.tokenizer
        for batch in batches:
            for messages in batch:
                ids = torch.tensor([naive.encode(messages)], device=naive.device)
                with torch.inference_mode():  # transformers' own generate, one prompt at a time
                    new = naive.model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=args.new_tokens,
                        do_sample=False,
                        pad_token_id=tok.pad_token_id,
                    )[0, ids.shape[1] :]
                text = tok.decode(new, skip_special_tokens=True).strip()
                out.append(parse_answer(text, framing.words).action)
        return out

    def abm_generate():
        out, memo = [], {}
        for batch in batches:
            ids = [tuple(fast.encode(m)) for m in batch]
            todo = list(dict.fromkeys(i for i in ids if i not in memo))
            if todo:
                memo.update(
                    zip(
                        todo,
                        fast.generate([list(t) for t in todo], max_new_tokens=args.new_tokens),
                        strict=True,
                    )
                )
            out += [parse_answer(memo[i], framing.words).action for i in ids]
        return out

    sets = [[fast.continuation_ids(context, t) for t in texts] for texts in framing.phrasings]
    phrasings = [ids for texts in sets for ids in texts]
    owner = np.repeat([0, 1], [len(t) for t in sets])

    def abm_phrasings():  # what the policy does: every phrasing of each option counts
        out, memo = [], {}
        for batch in batches:
            ids = [tuple(fast.encode(m, prefix)) for m in batch]
            todo = list(dict.fromkeys(i for i in ids if i not in memo))
            if todo:
                memo.update(
                    zip(todo, fast.score_phrasings([list(t) for t in todo], phrasings), strict=True)
                )
            for i in ids:
                c, d = (np.logaddexp.reduce(memo[i][owner == o]) for o in (0, 1))
                out.append(int(d > c))
        return out

    results = {}
    for name, fn in (
        ("naive generate", naive_generate),
        ("abm generate", abm_generate),
        ("naive score", naive_score),
        ("abm score", abm_score),
        ("abm phrasings", abm_phrasings),
    ):
        results[name] = timed(fn)
    print(f"{'way':<16} {'seconds':>8} {'decisions/s':>12}")
    for name, (_, seconds) in results.items():
        print(f"{name:<16} {seconds:>8.1f} {n / seconds:>12.2f}")
    print()
    for slow, quick in (
        ("naive generate", "abm generate"),
        ("naive score", "abm score"),
        ("naive generate", "abm score"),
        ("abm score", "abm phrasings"),
    ):
        a, b = results[slow][0], results[quick][0]
        agree = sum(x == y for x, y in zip(a, b, strict=True))
        print(
            f"{quick} vs {slow}: {results[slow][1] / results[quick][1]:.1f}x faster, "
            f"same decision in {agree}/{n}"
        )


if __name__ == "__main__":
    main()
