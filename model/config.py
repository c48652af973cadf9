"""ModelConfig: every shape of the M3ViT backbone and task heads, validated in one place."""
from __future__ import annotations

from dataclasses import dataclass, replace


class ConfigError(ValueError):
    """A configuration field has a value the toolkit cannot build."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    img_h: int
    img_w: int
    patch: int
    dim: int
    depth: int
    heads: int
    mlp_hidden: int                 # hidden width of the dense MLP blocks
    moe_blocks: tuple[int, ...]     # indices of blocks whose MLP is a mixture of experts
    num_experts: int
    top_k: int
    expert_hidden: int
    tasks: tuple[str, ...]          # task names, e.g. ("semseg", "depth")
    task_channels: tuple[int, ...]  # output channels of each task head
    gating: str = "multi"           # "multi": one bias-free router per task; "task_cond": task embedding + one router
    task_embed_dim: int = 16        # only used by gating == "task_cond"
    in_chans: int = 3
    ln_eps: float = 1e-6
    head_channels: int = 64         # PUP decoder width
    head_stages: int = 4            # number of 2x upsampling stages (4 -> x16 = patch size)

    def __post_init__(self):
        def need(cond, fieldname, msg):
            if not cond:
                raise ConfigError(f"ModelConfig '{self.name}': field '{fieldname}' = "
                                  f"{getattr(self, fieldname)!r}: {msg}")
        for f in ("img_h", "img_w", "patch", "dim", "depth", "heads", "mlp_hidden",
                  "num_experts", "top_k", "expert_hidden", "in_chans", "head_channels"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f, "must be a positive integer")
        need(self.img_h % self.patch == 0, "img_h", f"not divisible by patch {self.patch}")
        need(self.img_w % self.patch == 0, "img_w", f"not divisible by patch {self.patch}")
        need(self.dim % self.heads == 0, "dim", f"not divisible by heads {self.heads}")
        need(len(set(self.moe_blocks)) == len(self.moe_blocks), "moe_blocks", "duplicate block index")
        for b in self.moe_blocks:
            need(0 <= b < self.depth, "moe_blocks", f"block index {b} out of range 0..{self.depth - 1}")
        need(self.top_k <= self.num_experts, "top_k", f"greater than num_experts {self.num_experts}")
        need(len(self.tasks) >= 1, "tasks", "at least one task is needed")
        need(len(self.task_channels) == len(self.tasks), "task_channels",
             f"needs one entry per task ({len(self.tasks)} tasks)")
        need(self.gating in ("multi", "task_cond"), "gating", "must be 'multi' or 'task_cond'")
        need(self.ln_eps > 0, "ln_eps", "must be > 0")
        need(self.head_stages >= 0 and 2 ** self.head_stages == self.patch, "head_stages",
             f"2**head_stages must equal patch {self.patch} so the heads return full resolution")

    # Derived shapes (one place).
    @property
    def grid(self) -> tuple[int, int]:
        return self.img_h // self.patch, self.img_w // self.patch

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1  # + class token

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def is_moe(self, block: int) -> bool:
        return block in self.moe_blocks

    def task_index(self, task: int | str) -> int:
        if isinstance(task, str):
            if task not in self.tasks:
                raise ConfigError(f"unknown task {task!r}; model '{self.name}' has tasks {self.tasks}")
            return self.tasks.index(task)
        if not 0 <= task < self.num_tasks:
            raise ConfigError(f"task index {task} out of range 0..{self.num_tasks - 1}")
        return task

    def replace(self, **kw) -> "ModelConfig":
        return replace(self, **kw)


PRESETS: dict[str, ModelConfig] = {
    # Edge-MoE's M3ViT on Cityscapes (DESIGN.md section 5).
    "edge-moe": ModelConfig(
        name="edge-moe", img_h=128, img_w=256, patch=16, dim=192, depth=12, heads=3,
        mlp_hidden=768, moe_blocks=(1, 3, 5, 7, 9, 11), num_experts=16, top_k=2,
        expert_hidden=384, tasks=("semseg", "depth"), task_channels=(19, 1)),
    # Small shape for fast tests and RTL simulation.
    "tiny": ModelConfig(
        name="tiny", img_h=32, img_w=64, patch=16, dim=64, depth=4, heads=2,
        mlp_hidden=256, moe_blocks=(1, 3), num_experts=4, top_k=2, expert_hidden=128,
        tasks=("semseg", "depth"), task_channels=(19, 1), head_channels=32),
    # ViT-S M3ViT recipe for NYUD-v2 (16 experts, top-4, expert hidden = dim).
    "vit-s-nyud": ModelConfig(
        name="vit-s-nyud", img_h=480, img_w=640, patch=16, dim=384, depth=12, heads=6,
        mlp_hidden=1536, moe_blocks=(1, 3, 5, 7, 9, 11), num_experts=16, top_k=4,
        expert_hidden=384, tasks=("semseg", "depth"), task_channels=(40, 1)),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
