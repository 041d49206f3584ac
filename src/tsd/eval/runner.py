"""mean@k evaluation of a policy on the Countdown test split, without a search harness.

mean@k: k samples per test problem, graded with the *sparse* reward (correct or not), averaged
(the article's metric, k=16). pass@k is reported beside it (unbiased estimator).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from tsd.envs.base import Env, Problem
from tsd.eval.metrics import MeanAtK, PassAtK
from tsd.rollouts.base import decode_completion, encode_prompt
from tsd.samplers.base import Sampler


def evaluate_mean_at_k(
    sampler: Sampler,
    env: Env,
    problems: Sequence[Problem],
    k: int = 16,
    max_new_tokens: int = 256,
    problems_per_batch: int = 8,
    progress: bool = True,
    return_samples: bool = False,
) -> dict:
    """Sample k completions per problem and grade them; returns metrics (and samples if asked)."""
    if k < 1:
        raise ValueError(f"eval.k: must be >= 1, got {k}")
    if problems_per_batch < 1:
        raise ValueError(f"eval.problems_per_batch: must be >= 1, got {problems_per_batch}")
    if not problems:
        raise ValueError("eval: no problems to evaluate (eval.num_problems must be >= 1)")
    # one process evaluates (rank 0 when training is distributed): nothing to sync across ranks
    mean, passk = MeanAtK(k, sync_on_compute=False), PassAtK(k, sync_on_compute=False)
    tok = sampler.tokenizer
    t0, tokens, dense_sum = time.perf_counter(), 0, 0.0
    samples = []
    per_problem: dict[str, int] = {}  # problem id -> correct samples out of k (for paired comparisons)
    scores: list[torch.Tensor] = []  # (P_chunk,) fractions correct, for the standard error
    bar = tqdm(total=len(problems), desc=f"mean@{k}", disable=not progress, leave=False)
    for i in range(0, len(problems), problems_per_batch):
        chunk = problems[i : i + problems_per_batch]
        prompts = [encode_prompt(env, p, tok) for p in chunk]
        outs = sampler.sample(prompts, n=k, max_new_tokens=max_new_tokens, stop="answer")
        correct = torch.zeros((len(chunk), k), dtype=torch.bool)  # (P, k)
        for r, (p, conts) in enumerate(zip(chunk, outs)):
            for j, c in enumerate(conts):
                text = decode_completion(tok, c.token_ids)
                s = env.score(text, p)
                correct[r, j] = s.correct
                dense_sum += s.dense
                tokens += len(c.token_ids)
                if return_samples:
                    samples.append(
                        {"problem_id": p.id, "completion": text, "correct": s.correct, "dense": s.dense}
                    )
        counts = correct.sum(dim=1)  # (P,)
        per_problem.update((str(p.id), int(c)) for p, c in zip(chunk, counts.tolist()))
        scores.append(counts.double() / k)
        mean.update(correct)
        passk.update(correct)
        bar.update(len(chunk))
        bar.set_postfix(mean=f"{mean.compute().item():.4f}")
    bar.close()
    dt = time.perf_counter() - t0
    n = len(problems) * k
    per_score = torch.cat(scores)  # (P,) every problem's fraction correct, duplicates included
    se = float(per_score.std() / len(per_score) ** 0.5) if len(per_score) > 1 else float("nan")
    res: dict[str, object] = {
        f"mean@{k}": mean.compute().item(),
        f"mean@{k}_se": se,  # standard error over problems (the samples within one are not independent)
        f"pass@{k}": passk.compute().item(),
        "dense_mean": dense_sum / n,
        "num_problems": len(problems),
        "samples_per_problem": k,
        "generated_tokens": tokens,
        "seconds": dt,
        "per_problem_correct": per_problem,
    }
    if return_samples:
        res["samples"] = samples
    return res
