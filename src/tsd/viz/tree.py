"""Draw an MCTS search tree (``SearchTree.to_dict()``) as PNG + SVG, and search one problem to draw.

    python scripts/draw_tree.py --problems 2 --workers 4 --iterations 6     # the CLI around this

The step text on the edges; visits N, Q and prior P on the nodes; terminals show their reward
(green when correct); the chosen (max-visit) path in red. :func:`search_and_draw` is what
:class:`~tsd.callbacks.MeanAtKEval` calls at each evaluation of an MCTS run (the picture goes to
W&B and to the run directory).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from tsd.envs.base import Env, Problem
from tsd.rollouts.base import decode_completion
from tsd.rollouts.mcts import MCTSRollout
from tsd.samplers.base import Sampler

#: the rollout knobs shown in a tree's title and saved beside it
KNOBS = (
    "workers",
    "completions_per_node",
    "iterations",
    "c_puct",
    "virtual_loss",
    "max_step_tokens",
    "max_depth",
)


def step_label(text: str | None, limit: int = 28) -> str:
    """``<step>3+5=8</step>`` -> ``3+5=8``; ``<answer>e</answer>`` -> ``=> e``; cut to ``limit``."""
    text = (text or "").replace("<eos>", " <eos>").replace("\n", "\\n")
    text = re.sub(r"</?step>", "", text)
    text = re.sub(r"<answer>(.*?)</answer>", r"=> \1", text).strip()
    text = text if len(text) <= limit else text[: limit - 1] + "~"
    return "\n".join(text[i : i + 16] for i in range(0, len(text), 16))


def layout(tree: dict) -> dict[int, tuple[float, float]]:
    """Tidy-ish layout: leaves on consecutive x slots in depth-first order (children by id), each
    parent centred over its children; y = -depth."""
    kids: dict[int, list[int]] = {}
    for n in tree["nodes"]:
        if n["parent"] is not None:
            kids.setdefault(n["parent"], []).append(n["id"])
    pos: dict[int, tuple[float, float]] = {}
    depth = {n["id"]: n["depth"] for n in tree["nodes"]}
    slot = 0

    def place(i: int) -> float:
        nonlocal slot
        ch = kids.get(i, [])
        if not ch:
            x = float(slot)
            slot += 1
        else:
            xs = [place(c) for c in ch]
            x = (xs[0] + xs[-1]) / 2
        pos[i] = (x, -float(depth[i]))
        return x

    place(0)
    return pos


def draw(tree: dict, title: str, path_stem: Path) -> Path:
    """Write ``path_stem.png`` and ``path_stem.svg``; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = layout(tree)
    width = max(x for x, _ in pos.values()) + 1
    depth = max(-y for _, y in pos.values()) + 1
    fig, ax = plt.subplots(figsize=(min(80.0, 2.2 + 1.9 * width), 1.6 + 1.9 * depth))
    nodes = {n["id"]: n for n in tree["nodes"]}
    for n in tree["nodes"]:  # edges first, labelled with the step
        if n["parent"] is None:
            continue
        (x0, y0), (x1, y1) = pos[n["parent"]], pos[n["id"]]
        chosen = n["on_chosen_path"] and nodes[n["parent"]]["on_chosen_path"]
        ax.plot([x0, x1], [y0, y1], color="crimson" if chosen else "0.6", lw=2.5 if chosen else 0.8, zorder=1)
        ax.text(x0 + 0.62 * (x1 - x0), y0 + 0.62 * (y1 - y0), step_label(n["step"]), fontsize=6.5, ha="center", va="center",
                family="monospace", color="crimson" if chosen else "0.15", zorder=3,
                bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85))  # fmt: skip
    for n in tree["nodes"]:
        x, y = pos[n["id"]]
        if n["terminal"]:
            fc = "#b7e4b0" if n["correct"] else ("#f4c7c3" if n["reward"] is not None else "#eeeeee")
        else:
            fc = "#dbe8f6" if n["visits"] else "white"
        ec = "crimson" if n["on_chosen_path"] else "0.3"
        label = f"N={n['visits']:g}  Q={n['q']:+.2f}\nP={n['prior']:.2f}"
        if n["terminal"]:
            r = "?" if n["reward"] is None else f"{n['reward']:+.2f}"
            label += f"  r={r}\n[{n['terminal_reason']}]"
        ax.text(x, y, label, fontsize=6.5, ha="center", va="center", zorder=4,
                bbox=dict(boxstyle="round,pad=0.3", fc=fc, ec=ec, lw=2.0 if n["on_chosen_path"] else 0.6))  # fmt: skip
    ax.set_title(title, fontsize=9, family="monospace", loc="left")
    ax.set_xlim(-0.8, width - 0.2)
    ax.set_ylim(-depth + 0.4, 0.6)
    ax.axis("off")
    fig.tight_layout()
    png = path_stem.with_suffix(".png")
    fig.savefig(png, dpi=110)
    fig.savefig(path_stem.with_suffix(".svg"))
    plt.close(fig)
    return png


def describe(
    rollout: MCTSRollout, problem: Problem, tree: Any, traj: Any, tokenizer, env: Env
) -> tuple[dict, str]:
    """``(tree dict with the problem, the chosen trajectory and the knobs, title)``."""
    d = tree.to_dict()
    text = decode_completion(tokenizer, traj.completion_ids)
    d.update(
        problem={**env.to_record(problem), "id": problem.id},
        chosen={"text": text, "reward": traj.reward, "correct": traj.correct, "finish_reason": traj.finish_reason,
                **traj.stats},
        knobs={k: getattr(rollout, k) for k in KNOBS},
    )  # fmt: skip
    title = (
        f"{env.describe(problem)}   N={rollout.workers} K={rollout.completions_per_node} "
        f"M={rollout.iterations}   {len(tree.nodes)} nodes\nchosen: {text!r}   reward {traj.reward:+.3f}"
        f"{'  CORRECT' if traj.correct else ''}"
    )
    return d, title


def search_and_draw(
    rollout: MCTSRollout, problem: Problem, sampler: Sampler, env: Env, path_stem: Path
) -> tuple[Path, dict, str]:
    """Search ``problem`` with a copy of ``rollout`` (trees recorded; the original is untouched) and
    draw its tree at ``path_stem`` (.png, .svg and .json). Returns (PNG path, tree dict, title)."""
    import json

    search = copy.deepcopy(rollout)
    search.record_trees = True
    out = search.run([problem], sampler, env)
    d, title = describe(search, problem, search.trees[0], out.trajectories[0], sampler.tokenizer, env)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    path_stem.with_suffix(".json").write_text(json.dumps(d, indent=1))
    return draw(d, title, path_stem), d, title
