"""tsd: tree-search distillation of language models.

MCTS over reasoning steps finds stronger trajectories; online RL (CISPO/PPO) distils them back
into the policy, beside group-sampling (CISPO/GRPO) and best-of-N baselines.
"""

from pathlib import Path

__version__ = "0.1.0"

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
TINY_POLICY_DIR = ASSETS_DIR / "tiny_policy"
