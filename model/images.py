"""Input images for demos and profiles (no data is ever downloaded)."""
from __future__ import annotations

from .checkpoint import default_edge_moe_dir

CITYSCAPES_SHAPE = (3, 128, 256)


def load_image(cfg, path: str | None = None):
    """The demo/profile input: a file (.bin raw float32 [C,H,W], or a picture matplotlib reads),
    else the Cityscapes image in ../shared when present, else a matplotlib sample photo.
    -> (float tensor [1, C, img_h, img_w] in [0, 1], description); resized to the preset."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    cityscapes = default_edge_moe_dir() / "image.float32.bin"
    if path is None and cityscapes.exists():
        path, desc = str(cityscapes), "Cityscapes sample (edge-moe-cityscapes/image.float32.bin)"
    elif path is None:
        from matplotlib import cbook
        with cbook.get_sample_data("grace_hopper.jpg") as f:
            import matplotlib.image as mpimg
            arr = mpimg.imread(f, format="jpg")
        path, desc = None, "matplotlib sample photo grace_hopper.jpg"
    else:
        desc = path
    if path is not None and path.endswith(".bin"):
        raw = np.fromfile(path, dtype="<f4")
        shape = CITYSCAPES_SHAPE if raw.size == np.prod(CITYSCAPES_SHAPE) else (cfg.in_chans, cfg.img_h, cfg.img_w)
        if raw.size != np.prod(shape):
            raise ValueError(f"image {path} holds {raw.size} float32 values; expected "
                             f"{np.prod(CITYSCAPES_SHAPE)} (3x128x256) or "
                             f"{cfg.in_chans}x{cfg.img_h}x{cfg.img_w} for preset '{cfg.name}'")
        x = torch.from_numpy(raw.reshape(shape).copy())
    else:
        if path is not None:
            import matplotlib.image as mpimg
            arr = mpimg.imread(path)
        arr = np.asarray(arr)
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        x = torch.from_numpy(np.ascontiguousarray(arr[..., :3], dtype=np.float32)).permute(2, 0, 1)
    if x.shape[0] != cfg.in_chans:
        raise ValueError(f"image image has {x.shape[0]} channels, preset '{cfg.name}' "
                         f"needs in_chans = {cfg.in_chans}")
    x = x.unsqueeze(0)
    if tuple(x.shape[2:]) != (cfg.img_h, cfg.img_w):
        desc += f" resized {x.shape[2]}x{x.shape[3]} -> {cfg.img_h}x{cfg.img_w}"
        x = F.interpolate(x, size=(cfg.img_h, cfg.img_w), mode="bilinear", align_corners=False)
    return x, desc
