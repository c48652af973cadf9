"""Synthetic multi-task street scenes: RGB image, per-pixel semantic label and metric depth.

A seeded, procedural stand-in for Cityscapes/NYUD that needs no download: every sample is
drawn from its own seed, so any (seed, h, w) gives the same bytes on every call, and train,
val and test splits are disjoint seed ranges.

Classes (`CLASSES`, index = label value):
    0 background  sky, far hills (a "far wall" at DEPTH_MAX), grass/dirt, sidewalk and curb
    1 road        asphalt band on the ground plane, converging to the horizon, may curve;
                  lane and edge markings are part of the road
    2 building    fronto-parallel blocks (flat or gabled roof) with a grid of windows
    3 car         rounded-box body + trapezoidal cabin with glass + wheels; rear or side view
    4 person      stack of ellipses: two legs, torso, two arms, round head
    5 pole        thin vertical bar (cylindrical shading), sometimes with a lamp arm
    6 sign        disc / triangle / inverted triangle / diamond / rectangle with a border,
                  mounted on a pole, slightly in front of it

Colours: every class draws its colours from one shared palette with class-specific weights
(grey sidewalk vs grey road vs grey building vs grey car vs grey pole, white car vs white sign
vs overcast sky, ...), then per-image lighting rescales everything, so colour alone does not
separate the classes; shape, texture (grain amplitude, windows, markings) and context (cars on
the road, people and poles on the sidewalk, buildings behind) do.

Geometry (pinhole camera, square pixels, focal f = F*h pixels, camera height hc metres,
horizon row yh): the ground point at depth z images to row yh + f*hc/z, so background depth
is f*hc/(y - yh) below the horizon (increasing toward it) and DEPTH_MAX above it. An object at
depth z stands on the ground (its base at that row, pixels below the contact line are
clipped) and is scaled by f/z pixels per metre, so apparent size falls with depth. Objects
have constant depth and are painted far to near (painter's algorithm); the road is painted
first with the ground-plane depth. Distance haze (exp(-z/visibility)) adds another depth cue.

Lighting: per-object brightness, vertical and sun-side shading and texture grain; per-image
contrast, brightness, colour tint and a linear shading ramp; Gaussian pixel noise. Images are
float32 in [0, 1), shape [3, h, w]; labels int64 [h, w]; depth float32 [h, w] in
[DEPTH_MIN, DEPTH_MAX] metres.

Randomness: numpy Generator(PCG64) per sample, from SeedSequence(seed), never global state.
The layout (camera, every object, every colour) comes from a child stream that does not depend
on the resolution, so one seed gives the same scene at 32x64, 128x256 or 480x640; only pixel
grain and noise come from a resolution-dependent stream.

API: make_scene, make_batch, SceneDataset (torch), split_seeds, save_preview, bench_data.
`python -m edgemoe.model.data --bench` / `--preview out.png` run the last two.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

CLASSES = ("background", "road", "building", "car", "person", "pole", "sign")
NUM_CLASSES = len(CLASSES)
BACKGROUND, ROAD, BUILDING, CAR, PERSON, POLE, SIGN = range(NUM_CLASSES)
DEPTH_MIN = 1.0
DEPTH_MAX = 80.0

SPLITS = ("train", "val", "test")
SPLIT_STRIDE = 1 << 32  # split k of base_seed b uses seeds b + k*SPLIT_STRIDE + [0, n)
MIN_SIZE = 8            # smallest h or w: the horizon and ground need a few rows

_BELOW_ONE = np.nextafter(np.float32(1.0), np.float32(0.0))  # largest float32 < 1

# ---------------------------------------------------------------------------------------
# Colours: one palette, class-specific weights over it (the overlap is deliberate).
_PALETTE = {
    "white": (0.90, 0.90, 0.88), "lightgrey": (0.70, 0.70, 0.70), "grey": (0.50, 0.50, 0.50),
    "darkgrey": (0.30, 0.30, 0.31), "black": (0.10, 0.10, 0.11), "red": (0.75, 0.15, 0.12),
    "brick": (0.60, 0.32, 0.22), "beige": (0.80, 0.72, 0.55), "brown": (0.45, 0.32, 0.20),
    "yellow": (0.90, 0.80, 0.20), "green": (0.28, 0.55, 0.22), "darkgreen": (0.15, 0.33, 0.15),
    "blue": (0.20, 0.30, 0.70), "skyblue": (0.55, 0.70, 0.90), "orange": (0.90, 0.50, 0.15),
    "skin1": (0.93, 0.78, 0.65), "skin2": (0.72, 0.52, 0.38), "skin3": (0.40, 0.26, 0.17),
}
_WEIGHTS = {
    "sky": {"skyblue": 5, "lightgrey": 3, "white": 2, "blue": 1, "orange": 0.4},
    "hill": {"darkgreen": 3, "green": 2, "grey": 2, "skyblue": 1, "brown": 1},
    "grass": {"green": 4, "darkgreen": 3, "brown": 3, "beige": 1, "grey": 1},
    "sidewalk": {"lightgrey": 3, "grey": 3, "beige": 2, "brick": 1, "darkgrey": 1},
    "road": {"grey": 4, "darkgrey": 4, "black": 1, "brown": 0.5, "lightgrey": 0.5},
    "marking": {"white": 3, "yellow": 1, "lightgrey": 1},
    "building": {"lightgrey": 3, "grey": 3, "beige": 3, "brick": 3, "white": 2, "brown": 1,
                 "skyblue": 1, "darkgrey": 1, "yellow": 0.5},
    "window": {"darkgrey": 3, "black": 2, "skyblue": 2, "blue": 1, "yellow": 1, "white": 0.5},
    "car": {"white": 3, "black": 3, "grey": 3, "lightgrey": 3, "red": 2, "blue": 2,
            "darkgreen": 1, "yellow": 1, "brown": 1, "orange": 0.5},
    "glass": {"black": 3, "darkgrey": 3, "skyblue": 1, "blue": 1},
    "shirt": {k: 1 for k in ("white", "lightgrey", "grey", "darkgrey", "black", "red", "brick",
                             "beige", "brown", "yellow", "green", "darkgreen", "blue",
                             "skyblue", "orange")},
    "pants": {"blue": 3, "black": 3, "darkgrey": 2, "brown": 1, "beige": 1, "grey": 1},
    "skin": {"skin1": 2, "skin2": 2, "skin3": 1},
    "pole": {"grey": 4, "darkgrey": 3, "black": 2, "darkgreen": 2, "lightgrey": 1, "yellow": 0.5},
    "sign": {"red": 3, "blue": 3, "yellow": 2, "white": 2, "orange": 1, "green": 1},
}
_PAL_NAMES = tuple(_PALETTE)
_PAL = np.array([_PALETTE[k] for k in _PAL_NAMES], np.float32)
_CUM = {}
for _key, _wd in _WEIGHTS.items():
    _p = np.array([_wd.get(k, 0.0) for k in _PAL_NAMES], np.float64)
    _CUM[_key] = np.cumsum(_p / _p.sum())


def _colour(rng, key, jitter=0.06):
    """A palette colour for `key`, scaled and jittered per channel."""
    i = min(int(np.searchsorted(_CUM[key], rng.random(), side="right")), len(_PAL_NAMES) - 1)
    c = _PAL[i] * rng.uniform(0.85, 1.12) + rng.uniform(-jitter, jitter, 3)
    return np.clip(c, 0.02, 0.98).astype(np.float32)


def _logu(rng, lo, hi):
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _f32(x):
    return float(np.float32(x))


# ---------------------------------------------------------------------------------------
# Scene description (metres, resolution independent).
@dataclass
class _Obj:
    kind: str
    cls: int
    z: float                 # depth in metres (float32-exact)
    x: float                 # lateral position of the base centre, metres
    ext: tuple               # (left, right, bottom, top) metres relative to the base centre
    height_m: float          # vertical extent of the shape, metres
    p: dict = field(default_factory=dict)


@dataclass
class _Scene:
    F: float
    hc: float
    h0: float                # horizon as a fraction of the image height
    road: dict | None
    bg: dict
    light: dict
    objects: list            # painted far to near (sorted at sampling time)


def _road_center(road, z):
    """Lateral position (m) of the road centre at depth z (a gentle curve)."""
    zc = np.minimum(z, DEPTH_MAX)
    return road["c0"] + road["curv"] * zc * zc


def _sample_scene(rng) -> _Scene:
    F = rng.uniform(0.85, 1.15)
    hc = rng.uniform(1.3, 1.8)
    h0 = rng.uniform(0.36, 0.52)
    road = None
    if rng.random() < 0.93:
        road = dict(hw=rng.uniform(3.0, 7.0), sw=rng.uniform(1.2, 4.0), c0=rng.uniform(-3, 3),
                    curv=rng.uniform(-0.004, 0.004), colour=_colour(rng, "road"),
                    tex=rng.uniform(0.03, 0.08), lanes=rng.random() < 0.7,
                    dash=rng.uniform(3.0, 8.0), edges=rng.random() < 0.5,
                    mark=_colour(rng, "marking", 0.04))
    bg = dict(zenith=_colour(rng, "sky"), horizon=_colour(rng, "sky"),
              clouds=rng.uniform(0.0, 0.8), cloud=_colour(rng, "sky") * 0.3 + 0.65,
              hill_amp=rng.uniform(0.02, 0.12) if rng.random() < 0.7 else 0.0,
              hill_prof=rng.random(10).astype(np.float32), hill=_colour(rng, "hill"),
              grass=_colour(rng, "grass"), grass_tex=rng.uniform(0.05, 0.14),
              side=_colour(rng, "sidewalk"), curb=_colour(rng, "sidewalk"),
              tile=rng.uniform(1.0, 2.5),
              coarse=rng.random((6, 12)).astype(np.float32),
              mid=rng.random((24, 48)).astype(np.float32))
    light = dict(bright=rng.uniform(0.65, 1.25), contrast=rng.uniform(0.6, 1.3),
                 tint=rng.uniform(0.9, 1.1, 3).astype(np.float32),
                 ramp=rng.uniform(0.0, 0.4), ramp_dir=rng.uniform(0, 2 * np.pi),
                 sun=rng.uniform(-1, 1), vis=rng.uniform(150, 600),
                 noise=rng.uniform(0.005, 0.04))

    rc = (lambda z: _road_center(road, z)) if road else (lambda z: 0.0)
    hw = road["hw"] if road else 4.0
    sw = road["sw"] if road else 2.5
    objs: list[_Obj] = []

    def shade(o):
        o.p.update(shade=rng.uniform(0.6, 1.15), vgrad=rng.uniform(-0.25, 0.25))

    for _ in range(rng.integers(0, 7)):                     # buildings
        z = _f32(rng.uniform(18, 75))
        bw, bh = rng.uniform(6, 30), rng.uniform(5, 35)
        roof = rng.uniform(1.5, 5.0) if rng.random() < 0.3 else 0.0
        if rng.random() < 0.25:
            x = rc(z) + rng.uniform(-40, 40)
        else:
            x = rc(z) + rng.choice((-1, 1)) * (hw + sw + rng.uniform(1, 15) + bw / 2)
        o = _Obj("building", BUILDING, z, x, (-bw / 2, bw / 2, 0.0, bh + roof), bh + roof,
                 dict(w=bw, h=bh, roof=roof, colour=_colour(rng, "building"),
                      win=_colour(rng, "window"), floor=rng.uniform(2.8, 3.8),
                      wsp=rng.uniform(2.2, 4.5), tex=rng.uniform(0.02, 0.06)))
        shade(o)
        objs.append(o)

    for _ in range(rng.integers(0, 7)):                     # cars
        z = _f32(_logu(rng, 4, 60))
        side = rng.random() < 0.35
        cw = rng.uniform(3.6, 4.8) if side else rng.uniform(1.65, 2.0)
        ch = rng.uniform(1.35, 1.9)
        if road and rng.random() < 0.9:
            x = rc(z) + rng.uniform(-1, 1) * max(hw - cw / 2, 0.3)
        else:
            x = rc(z) + rng.choice((-1, 1)) * (hw + rng.uniform(0, sw + 8))
        o = _Obj("car", CAR, z, x, (-cw / 2, cw / 2, 0.0, ch), ch,
                 dict(w=cw, h=ch, side=side, colour=_colour(rng, "car"),
                      glass=_colour(rng, "glass", 0.03), tyre=_colour(rng, "pants") * 0.25,
                      cab_bot=rng.uniform(0.62, 0.75) if side else rng.uniform(0.85, 0.95),
                      cab_top=rng.uniform(0.4, 0.5) if side else rng.uniform(0.65, 0.75),
                      cab_off=rng.uniform(-0.15, 0.15) if side else 0.0,
                      tex=rng.uniform(0.01, 0.03)))
        shade(o)
        objs.append(o)

    for _ in range(rng.integers(0, 6)):                     # persons
        z = _f32(_logu(rng, 3, 35))
        if rng.random() < 0.2:
            x = rc(z) + rng.uniform(-hw, hw)
        else:
            x = rc(z) + rng.choice((-1, 1)) * (hw + rng.uniform(0.2, sw + 0.5))
        pw, ph = rng.uniform(0.42, 0.6), rng.uniform(1.5, 1.95)
        o = _Obj("person", PERSON, z, x, (-0.6 * pw, 0.6 * pw, 0.0, ph), ph,
                 dict(w=pw, h=ph, legs=rng.uniform(0.3, 0.55), shirt=_colour(rng, "shirt"),
                      pants=_colour(rng, "pants"), skin=_colour(rng, "skin", 0.04),
                      tex=rng.uniform(0.02, 0.05)))
        shade(o)
        objs.append(o)

    for _ in range(rng.integers(0, 5)):                     # poles (+ signs)
        z = _f32(_logu(rng, 4, 60))
        side = rng.choice((-1, 1))
        if rng.random() < 0.15:
            x = rc(z) + rng.uniform(-hw - sw - 5, hw + sw + 5)
        else:
            x = rc(z) + side * (hw + rng.uniform(0.2, min(sw, 1.5)))
        pw, ph = rng.uniform(0.1, 0.3), rng.uniform(3.0, 9.0)
        arm = -side * rng.uniform(0.8, 2.5) if rng.random() < 0.35 else 0.0
        o = _Obj("pole", POLE, z, x, (min(-pw / 2, arm), max(pw / 2, arm), 0.0, ph), ph,
                 dict(w=pw, h=ph, arm=arm, colour=_colour(rng, "pole"),
                      tex=rng.uniform(0.01, 0.04)))
        shade(o)
        objs.append(o)
        if rng.random() < 0.6:
            r = rng.uniform(0.3, 0.55)
            c = rng.uniform(2.0, max(2.0, min(ph - 0.3 - r, 3.5)))
            kind = int(rng.integers(0, 5))
            bot, top = {0: (c - r, c + r), 1: (c - 0.5 * r, c + r), 2: (c - r, c + 0.5 * r),
                        3: (c - r, c + r), 4: (c - 0.65 * r, c + 0.65 * r)}[kind]
            s = _Obj("sign", SIGN, _f32(z - 0.08), x, (-r, r, bot, top), top - bot,
                     dict(r=r, c=c, shape=kind, face=_colour(rng, "sign"),
                          border=_colour(rng, "sign") if rng.random() < 0.5
                          else _colour(rng, "marking", 0.03),
                          bar=rng.random() < 0.3, tex=rng.uniform(0.005, 0.02)))
            shade(s)
            objs.append(s)

    # Painter's algorithm: far first; ties keep sampling order (a sign is in front of its pole).
    order = sorted(range(len(objs)), key=lambda i: (-objs[i].z, i))
    return _Scene(F, hc, h0, road, bg, light, [objs[i] for i in order])


# ---------------------------------------------------------------------------------------
# Shapes. Each gets metre grids Xm [1, w'] (right +) and Ym [h', 1] (up +, 0 = ground contact)
# of its bounding window and returns (mask, parts, extra_shade): parts are (submask, colour)
# painted in order over the base colour, extra_shade a multiplicative field or None.
def _building(Xm, Ym, p, s):
    hw = p["w"] / 2
    ax = np.abs(Xm)
    top = p["h"] + p["roof"] * (1.0 - ax / hw)
    mask = (ax <= hw) & (Ym >= 0) & (Ym <= top)
    fy = (Ym / p["floor"]) % 1.0
    fx = ((Xm + hw) / p["wsp"]) % 1.0
    win = ((fy > 0.35) & (fy < 0.8) & (Ym > 0.9 * p["floor"]) & (Ym < p["h"] - 0.6)
           & (fx > 0.22) & (fx < 0.78) & (ax < hw - 0.6))
    return mask, [(win, p["win"])], None


def _car(Xm, Ym, p, s):
    a = Xm / (p["w"] / 2)
    b = Ym / p["h"]
    body = np.abs(a) ** 6 + np.abs((b - 0.37) / 0.25) ** 6 <= 1.0
    bt = (b - 0.55) / 0.45
    cab_hw = p["cab_top"] + (p["cab_bot"] - p["cab_top"]) * (1.0 - bt)
    ta = (a - p["cab_off"]) / cab_hw
    cabin = (b >= 0.55) & (np.abs(ta) ** 4 + bt ** 4 <= 1.0)
    glass = cabin & (np.abs(ta) <= 0.82) & (b >= 0.62) & (b <= 0.92)
    parts = []
    if p["side"]:
        r = min(0.36, 0.2 * p["h"])
        cx = 0.62 * p["w"] / 2
        wheels = ((np.abs(Xm) - cx) ** 2 + (Ym - r) ** 2) <= r * r
        glass &= np.abs(ta) > 0.07                          # door pillar
        parts = [(glass, p["glass"]), (wheels, p["tyre"])]
    else:
        wheels = (np.abs(a) >= 0.6) & (np.abs(a) <= 0.95) & (Ym >= 0) & (b <= 0.2)
        lights = (np.abs(a) >= 0.6) & (np.abs(a) <= 0.9) & (b >= 0.45) & (b <= 0.53)
        parts = [(glass, p["glass"]), (wheels & ~body, p["tyre"]),
                 (lights, np.array((0.8, 0.1, 0.08), np.float32))]
    mask = body | cabin | wheels
    return mask, parts, None


def _person(Xm, Ym, p, s):
    hw, h = p["w"] / 2, p["h"]
    lx = p["legs"] * hw
    legs = ((np.abs(Xm) - lx) / (0.5 * hw)) ** 2 + ((Ym - 0.25 * h) / (0.25 * h)) ** 2 <= 1.0
    torso = (Xm / hw) ** 2 + ((Ym - 0.63 * h) / (0.2 * h)) ** 2 <= 1.0
    arms = ((np.abs(Xm) - 0.92 * hw) / (0.2 * hw)) ** 2 + ((Ym - 0.6 * h) / (0.2 * h)) ** 2 <= 1.0
    head = Xm ** 2 + (Ym - 0.935 * h) ** 2 <= (0.065 * h) ** 2
    mask = legs | torso | arms | head
    return mask, [(torso | arms, p["shirt"]), (head, p["skin"])], None  # base colour = pants


def _pole(Xm, Ym, p, s):
    hw = max(p["w"] / 2, 0.5 / s)                          # at least one pixel wide
    bar = (np.abs(Xm) <= hw) & (Ym >= 0) & (Ym <= p["h"])
    mask = bar
    if p["arm"]:
        th = max(0.12, 0.5 / s)
        lo, hi = min(0.0, p["arm"]), max(0.0, p["arm"])
        mask = bar | ((Ym <= p["h"]) & (Ym >= p["h"] - th) & (Xm >= lo) & (Xm <= hi))
    cyl = 1.0 - 0.35 * np.clip(Xm / hw, -1, 1) ** 2        # cylindrical shading
    return mask, [], cyl


def _sign_shape(Xm, Ym, c, r, kind):
    dy = Ym - c
    if kind == 0:
        return Xm ** 2 + dy ** 2 <= r * r
    if kind in (1, 2):                                     # triangle up / down
        t = dy if kind == 1 else -dy
        return (t >= -0.5 * r) & (np.abs(Xm) <= 0.866 * r * (r - t) / (1.5 * r))
    if kind == 3:
        return np.abs(Xm) + np.abs(dy) <= r
    return (np.abs(Xm) <= r) & (np.abs(dy) <= 0.65 * r)


def _sign(Xm, Ym, p, s):
    r, c, k = p["r"], p["c"], p["shape"]
    mask = _sign_shape(Xm, Ym, c, r, k)
    inner = _sign_shape(Xm, Ym, c + (0.12 * r if k == 1 else -0.12 * r if k == 2 else 0.0),
                        0.72 * r, k)
    parts = [(inner, p["face"])]
    if p["bar"]:
        parts.append(((np.abs(Ym - c) <= 0.14 * r) & (np.abs(Xm) <= 0.5 * r),
                      np.array((0.92, 0.92, 0.92), np.float32)))
    return mask, parts, None  # base colour = border


_SHAPES = {"building": _building, "car": _car, "person": _person, "pole": _pole, "sign": _sign}
_BASE = {"building": "colour", "car": "colour", "person": "pants", "pole": "colour",
         "sign": "border"}


# ---------------------------------------------------------------------------------------
@dataclass
class SceneObject:
    """One painted object (before occlusion). Returned by make_scene(..., return_objects=True),
    in painting order (road first, then far to near)."""
    cls: int
    kind: str
    z: float                 # painter's key, metres (the road: its nearest visible depth)
    height_m: float          # vertical extent of the shape in metres (0 for the road)
    mask: np.ndarray         # bool [h, w]: pixels the object covers, occluded or not
    depth: np.ndarray        # float32 [h, w]: its surface depth where mask, +inf elsewhere


@dataclass
class SceneInfo:
    objects: list            # [SceneObject], painting order
    background_depth: np.ndarray  # float32 [h, w]: depth with no object (ground / far wall)
    focal_px: float          # pixels per metre at 1 m depth
    horizon_px: float        # row coordinate (pixel edges: row i spans [i, i+1)) of the horizon
    camera_height: float     # metres


def _upsample(grid, h, w):
    """Bilinear upsampling of a small [gh, gw] grid to [h, w] (resolution-independent texture)."""
    gh, gw = grid.shape
    fy = (np.arange(h, dtype=np.float32) + 0.5) * ((gh - 1) / h)
    fx = (np.arange(w, dtype=np.float32) + 0.5) * ((gw - 1) / w)
    y0 = np.minimum(fy.astype(np.intp), gh - 2)
    x0 = np.minimum(fx.astype(np.intp), gw - 2)
    ty = (fy - y0)[:, None]
    tx = fx - x0
    rows = grid[y0] * (1 - ty) + grid[y0 + 1] * ty
    return rows[:, x0] * (1 - tx) + rows[:, x0 + 1] * tx


def _render(sc: _Scene, rng, h, w, return_objects):
    f = np.float32(sc.F * h)
    yh = np.float32(sc.h0 * h)
    hc = np.float32(sc.hc)
    yc = np.arange(h, dtype=np.float32) + 0.5
    xc = np.arange(w, dtype=np.float32) + 0.5
    grain = rng.standard_normal((h, w), dtype=np.float32)
    coarse = _upsample(sc.bg["coarse"], h, w)
    mid = _upsample(sc.bg["mid"], h, w)
    bg = sc.bg

    img = np.empty((h, w, 3), np.float32)
    label = np.zeros((h, w), np.int64)

    # Sky and far hills: background at DEPTH_MAX.
    sky_rows = int(np.clip(np.ceil(yh - 0.5), 0, h))       # rows whose centre is above the horizon
    t = np.clip((yh - yc[:sky_rows]) / max(float(yh), 1.0), 0, 1)[:, None, None]
    img[:sky_rows] = bg["horizon"] * (1 - t) + bg["zenith"] * t
    cl = np.clip((coarse[:sky_rows] - 0.45) * 3.0, 0, 1)[..., None] * bg["clouds"]
    img[:sky_rows] = img[:sky_rows] * (1 - cl) + bg["cloud"] * cl
    if bg["hill_amp"] > 0:
        prof = _upsample(np.vstack([bg["hill_prof"]] * 2), 2, w)[0]
        hill_top = yh - bg["hill_amp"] * h * (0.3 + 0.7 * prof)
        hill = yc[:sky_rows, None] >= hill_top[None, :]
        shade = (0.85 + 0.3 * mid[:sky_rows])[..., None]
        img[:sky_rows] = np.where(hill[..., None], bg["hill"] * shade, img[:sky_rows])

    # Ground plane below the horizon.
    bg_depth = np.full((h, w), DEPTH_MAX, np.float32)
    gy = yc[sky_rows:]
    zg = (f * hc) / (gy - yh)                               # unclipped ground depth per row
    bg_depth[sky_rows:] = np.clip(zg, DEPTH_MIN, DEPTH_MAX)[:, None]
    G = img[sky_rows:]
    tex = grain[sky_rows:] * bg["grass_tex"] + (mid[sky_rows:] - 0.5) * 0.3
    G[:] = bg["grass"] * (1 + tex)[..., None]
    road_mask = None
    if sc.road is not None:
        rd = sc.road
        Xg = (xc - np.float32(w / 2))[None, :] * (hc / (gy - yh))[:, None]
        d = np.abs(Xg - _road_center(rd, zg)[:, None].astype(np.float32))
        side = (d > rd["hw"]) & (d <= rd["hw"] + rd["sw"])
        tiles = ((zg / bg["tile"]) % 1.0 < 0.08)[:, None] & side
        G[side] = bg["side"] * (1 + 0.04 * grain[sky_rows:][side])[:, None]
        G[tiles] *= 0.8
        G[side & (d <= rd["hw"] + 0.18)] = bg["curb"]
        road = d <= rd["hw"]
        G[road] = rd["colour"] * (1 + rd["tex"] * grain[sky_rows:][road])[:, None]
        mark = np.zeros_like(road)
        if rd["lanes"]:
            mark |= (d <= 0.08) & ((zg / rd["dash"]) % 1.0 < 0.5)[:, None]
        if rd["edges"]:
            mark |= np.abs(d - (rd["hw"] - 0.35)) <= 0.07
        G[mark & road] = rd["mark"]
        label[sky_rows:][road] = ROAD
        road_mask = np.zeros((h, w), bool)
        road_mask[sky_rows:] = road

    # Hard-edged contact shadows under cars and persons, on the ground only (no label change).
    for o in sc.objects:
        if o.kind in ("car", "person"):
            s = f / o.z
            cx = w / 2 + f * o.x / o.z
            yb = yh + f * hc / o.z
            rx = (o.p["w"] / 2 + 0.25) * s
            ry = 0.6 + f * hc * 0.6 / (o.z * o.z)
            y0, y1 = max(sky_rows, int(yb - ry)), min(h, int(np.ceil(yb + ry)) + 1)
            x0, x1 = max(0, int(cx - rx)), min(w, int(np.ceil(cx + rx)) + 1)
            if y0 < y1 and x0 < x1:
                e = ((xc[x0:x1] - cx) / rx) ** 2 + ((yc[y0:y1, None] - yb) / ry) ** 2 <= 1
                img[y0:y1, x0:x1][e] *= 0.6

    depth = bg_depth.copy()
    objects = []
    if return_objects and road_mask is not None and road_mask.any():
        rz = np.where(road_mask, bg_depth, np.inf).astype(np.float32)
        objects.append(SceneObject(ROAD, "road", float(rz.min()), 0.0, road_mask, rz))

    sun = np.float32(sc.light["sun"] * 0.12)
    for o in sc.objects:
        z = np.float32(o.z)
        s = f / z
        cx = np.float32(w / 2) + f * np.float32(o.x) / z
        yb = yh + f * hc / z
        left, right, bottom, top = o.ext
        pad = 1.0 / s                                       # room for the one-pixel pole
        x0 = max(0, int(np.floor(cx + (left - pad) * s)))
        x1 = min(w, int(np.ceil(cx + (right + pad) * s)) + 1)
        y0 = max(0, int(np.floor(yb - top * s)) - 1)
        y1 = min(h, int(np.ceil(yb - bottom * s)) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        Xm = ((xc[x0:x1] - cx) / s)[None, :]
        Ym = ((yb - yc[y0:y1]) / s)[:, None]
        mask, parts, extra = _SHAPES[o.kind](Xm, Ym, o.p, s)
        mask = np.broadcast_to(mask, (y1 - y0, x1 - x0))
        mask = mask & (bg_depth[y0:y1, x0:x1] >= z)         # stands on the ground, never below it
        if not mask.any():
            continue
        n = int(mask.sum())
        col = np.empty((n, 3), np.float32)
        col[:] = o.p[_BASE[o.kind]]
        for sub, c in parts:
            col[np.broadcast_to(sub, mask.shape)[mask]] = c
        sh = (o.p["shade"] * (1 + o.p["vgrad"] * ((Ym - bottom) / (top - bottom) - 0.5))
              * (1 + sun * np.clip(Xm / (o.ext[1] - o.ext[0] + 1e-6) * 2, -1, 1))
              + o.p["tex"] * grain[y0:y1, x0:x1])
        if extra is not None:
            sh = sh * extra
        col *= np.broadcast_to(sh, mask.shape)[mask][:, None]
        img[y0:y1, x0:x1][mask] = col
        label[y0:y1, x0:x1][mask] = o.cls
        depth[y0:y1, x0:x1][mask] = z
        if return_objects:
            full = np.zeros((h, w), bool)
            full[y0:y1, x0:x1] = mask
            dz = np.full((h, w), np.inf, np.float32)
            dz[full] = z
            objects.append(SceneObject(o.cls, o.kind, float(z), o.height_m, full, dz))

    # Haze by depth, then per-image lighting, then sensor noise.
    L = sc.light
    tr = np.exp(-depth / np.float32(L["vis"]))[..., None]
    img = img * tr + bg["horizon"] * (1 - tr)
    ang = L["ramp_dir"]
    ramp = 1 + L["ramp"] * ((xc / w - 0.5)[None, :] * np.float32(np.cos(ang))
                            + (yc / h - 0.5)[:, None] * np.float32(np.sin(ang)))
    img = ((img - 0.5) * np.float32(L["contrast"]) + 0.5) * (np.float32(L["bright"]) * L["tint"])
    img *= ramp[..., None]
    img += rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(L["noise"])
    np.clip(img, 0.0, _BELOW_ONE, out=img)
    image = np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)
    if return_objects:
        return image, label, depth, SceneInfo(objects, bg_depth, float(f), float(yh), float(hc))
    return image, label, depth


# ---------------------------------------------------------------------------------------
def _check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_size(h, w):
    for name, v in (("h", h), ("w", w)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < MIN_SIZE:
            raise ValueError(f"image size {name} must be an integer >= {MIN_SIZE}, got {v!r}")
    return int(h), int(w)


def make_scene(seed, h, w, return_objects=False):
    """One scene: (image float32 [3,h,w] in [0,1), label int64 [h,w], depth float32 [h,w]).

    With return_objects=True a fourth item, SceneInfo, gives every painted object's class,
    depth, mask and depth map, plus the background depth and the camera."""
    seed = _check_seed(seed)
    h, w = _check_size(h, w)
    layout_ss, pixel_ss = np.random.SeedSequence(seed).spawn(2)
    scene = _sample_scene(np.random.Generator(np.random.PCG64(layout_ss)))
    return _render(scene, np.random.Generator(np.random.PCG64(pixel_ss)), h, w, return_objects)


def make_batch(seeds, h, w):
    """Stacked scenes: images [N,3,h,w] float32, labels [N,h,w] int64, depths [N,h,w] float32."""
    seeds = list(seeds)
    if not seeds:
        raise ValueError("make_batch: seeds is empty")
    h, w = _check_size(h, w)
    imgs = np.empty((len(seeds), 3, h, w), np.float32)
    labs = np.empty((len(seeds), h, w), np.int64)
    deps = np.empty((len(seeds), h, w), np.float32)
    for i, s in enumerate(seeds):
        imgs[i], labs[i], deps[i] = make_scene(s, h, w)
    return imgs, labs, deps


def split_seeds(split, n, base_seed=0) -> range:
    """The seeds of a split: base_seed + k*SPLIT_STRIDE + [0, n), k = index of split in SPLITS.
    Splits of the same base_seed never share a seed."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= SPLIT_STRIDE:
        raise ValueError(f"n (dataset length) must be an integer in [0, {SPLIT_STRIDE}], got {n!r}")
    base_seed = _check_seed(base_seed)
    start = base_seed + SPLITS.index(split) * SPLIT_STRIDE
    return range(start, start + int(n))


class SceneDataset(torch.utils.data.Dataset):
    """Map-style dataset of synthetic scenes; item i = (image [3,h,w] float32, label [h,w]
    int64, depth [h,w] float32) torch tensors, generated on the fly from seed self.seeds[i].
    Works with DataLoader workers (no shared state; each item has its own seed)."""

    def __init__(self, n, h, w, split="train", base_seed=0):
        self.seeds = split_seeds(split, n, base_seed)
        self.h, self.w = _check_size(h, w)
        self.split = split

    def __len__(self):
        return len(self.seeds)

    def __getitem__(self, i):
        if isinstance(i, (torch.Tensor, np.ndarray)):
            i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"SceneDataset index {i} out of range for length {len(self)}")
        image, label, depth = make_scene(self.seeds[i], self.h, self.w)
        return torch.from_numpy(image), torch.from_numpy(label), torch.from_numpy(depth)


# Class colours for label previews (not used by the generator).
_LABEL_RGB = np.array([(0.0, 0.0, 0.0), (0.5, 0.25, 0.5), (0.27, 0.27, 0.27), (0.0, 0.0, 0.56),
                       (0.86, 0.08, 0.24), (0.6, 0.6, 0.6), (0.86, 0.86, 0.0)])


def save_preview(path, n=4, h=128, w=256, seeds=None):
    """Write a PNG grid (one row per scene: image | label | depth) for visual inspection."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap, LogNorm
    from matplotlib.patches import Patch

    seeds = list(range(n)) if seeds is None else list(seeds)
    cmap = ListedColormap(_LABEL_RGB)
    fig, axes = plt.subplots(len(seeds), 3, figsize=(3 * 3.2 * w / h * 0.75, len(seeds) * 2.4),
                             squeeze=False)
    for r, sd in enumerate(seeds):
        img, lab, dep = make_scene(sd, h, w)
        axes[r, 0].imshow(img.transpose(1, 2, 0))
        axes[r, 1].imshow(lab, cmap=cmap, vmin=-0.5, vmax=NUM_CLASSES - 0.5,
                          interpolation="nearest")
        im = axes[r, 2].imshow(dep, cmap="magma_r", norm=LogNorm(DEPTH_MIN, DEPTH_MAX),
                               interpolation="nearest")
        fig.colorbar(im, ax=axes[r, 2], fraction=0.025, label="m")
        axes[r, 0].set_ylabel(f"seed {sd}")
        for c, t in enumerate(("image", "label", "depth")):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(t)
    fig.legend(handles=[Patch(color=_LABEL_RGB[i], label=f"{i} {c}") for i, c in enumerate(CLASSES)],
               loc="lower center", ncol=NUM_CLASSES, fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def bench_data(n=300, h=128, w=256):
    """Print and return single-process generation speed in samples per minute."""
    make_scene(0, h, w)                                     # warm-up
    t0 = time.perf_counter()
    for s in range(1, n + 1):
        make_scene(s, h, w)
    dt = time.perf_counter() - t0
    rate = n / dt * 60.0
    print(f"bench_data: {n} scenes at {h}x{w} in {dt:.2f} s = {rate:.0f} samples/min "
          f"({dt / n * 1e3:.2f} ms/sample, 1 process)")
    return rate


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="synthetic scene generator: benchmark / preview")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--preview", metavar="PNG")
    ap.add_argument("-n", type=int, default=4)
    ap.add_argument("--size", type=int, nargs=2, default=(128, 256), metavar=("H", "W"))
    a = ap.parse_args()
    if a.bench:
        bench_data(h=a.size[0], w=a.size[1])
    if a.preview:
        print(save_preview(a.preview, n=a.n, h=a.size[0], w=a.size[1]))
