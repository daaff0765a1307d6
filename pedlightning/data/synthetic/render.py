"""Procedural pedestrian renderer (PIL drawing, about 0.5 ms per 128x64 image on one CPU core).

A camera is a fixed style (background texture, brightness, colour cast, blur, typical person scale);
an image draws one identity in a random pose, scale, horizontal offset and view on that camera's
background, optionally behind an occluder. Clothing colours survive the camera's colour cast, so the
identity is recognisable across cameras while cameras differ. Every random choice comes from
``random.Random`` seeded by integers, so a (identity, camera, seed) triple always gives the same pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pedlightning.data.sources.attributes import PA100K_ATTRIBUTES
from pedlightning.data.synthetic.identity import COLORS, Identity, derive_seed

__all__ = ["VIEWS", "CameraStyle", "camera_style", "render_background", "render_person"]

VIEWS: tuple[str, ...] = ("front", "side", "back")
_VIEW_ATTRIBUTE = {"front": "Front", "side": "Side", "back": "Back"}
_DARK = (34, 30, 30)
_EYE = (24, 20, 20)


@dataclass(frozen=True)
class CameraStyle:
    """What makes one camera's images look alike: scene colours and texture, exposure, colour cast, blur."""

    wall: tuple[int, int, int]
    floor: tuple[int, int, int]
    horizon: float
    texture: str
    brightness: float
    cast: tuple[float, float, float]
    blur: float
    scale: float


@lru_cache(maxsize=None)
def camera_style(camera: int) -> CameraStyle:
    """The fixed style of camera ``camera`` (any integer; a pure function of it)."""
    rng = random.Random(derive_seed(camera, 0xCA))

    def muted() -> tuple[int, int, int]:
        base = rng.randint(60, 200)
        return tuple(min(255, max(0, base + rng.randint(-40, 40))) for _ in range(3))  # type: ignore[return-value]

    return CameraStyle(
        wall=muted(),
        floor=muted(),
        horizon=rng.uniform(0.45, 0.8),
        texture=rng.choice(("bricks", "tiles", "stripes", "noise", "gradient")),
        brightness=rng.uniform(0.75, 1.2),
        cast=(rng.uniform(0.85, 1.15), rng.uniform(0.88, 1.12), rng.uniform(0.85, 1.15)),
        blur=rng.choice((0.0, 0.0, 0.4, 0.7)),
        scale=rng.uniform(0.88, 1.0),
    )


@lru_cache(maxsize=512)
def _texture(camera: int, height: int, width: int) -> np.ndarray:
    """A background slightly larger than the image (cropped at a random offset per image)."""
    style = camera_style(camera)
    rng = np.random.default_rng(derive_seed(camera, height, width, 0xB6))
    hp, wp = height + height // 4, width + width // 4
    img = np.empty((hp, wp, 3), np.float32)
    horizon = int(style.horizon * hp)
    img[:horizon] = style.wall
    img[horizon:] = style.floor
    yy, xx = np.mgrid[0:hp, 0:wp]
    step = max(3, hp // 14)
    if style.texture == "bricks":
        lines = (yy % step == 0) | ((xx + (yy // step % 2) * step) % (2 * step) == 0)
        img[:horizon][lines[:horizon]] *= 0.7
    elif style.texture == "tiles":
        lines = (yy % step == 0) | (xx % step == 0)
        img[horizon:][lines[horizon:]] *= 0.75
    elif style.texture == "stripes":
        img[:horizon][(xx[:horizon] // step) % 2 == 0] *= 0.82
    elif style.texture == "noise":
        coarse = rng.uniform(0.75, 1.2, (hp // 8 + 2, wp // 8 + 2, 1))
        img *= np.kron(coarse, np.ones((8, 8, 1)))[:hp, :wp]
    else:
        img *= np.linspace(1.2, 0.75, hp)[:, None, None]
    img += rng.normal(0.0, 5.0, img.shape)
    out = np.clip(img, 0, 255).astype(np.uint8)
    out.setflags(write=False)
    return out


def _background(camera: int, rng: random.Random, height: int, width: int) -> Image.Image:
    tex = _texture(camera, height, width)
    oy, ox = rng.randint(0, tex.shape[0] - height), rng.randint(0, tex.shape[1] - width)
    img = Image.fromarray(tex[oy : oy + height, ox : ox + width])
    draw = ImageDraw.Draw(img)
    style = camera_style(camera)
    for _ in range(rng.randint(0, 2)):  # clutter: a sign, a window, a bin
        x0, y0 = rng.uniform(-0.2, 0.9) * width, rng.uniform(0.0, 0.8) * height
        w, h = rng.uniform(0.1, 0.35) * width, rng.uniform(0.05, 0.25) * height
        mix = rng.uniform(0.3, 0.6)
        other = rng.choice(list(COLORS.values()))
        fill = tuple(int(mix * a + (1 - mix) * b) for a, b in zip(other, style.wall))
        draw.rectangle((x0, y0, x0 + w, y0 + h), fill=fill)
    return img


def _finish(img: Image.Image, camera: int, rng: random.Random) -> Image.Image:
    """Apply the camera's exposure and colour cast (one LUT) and its blur."""
    style = camera_style(camera)
    gain = style.brightness * rng.uniform(0.9, 1.1)
    ramp = np.arange(256, dtype=np.float32)
    lut = np.concatenate([np.clip(ramp * gain * c, 0, 255) for c in style.cast]).astype(np.uint8)
    img = img.point(lut.tolist())
    if style.blur:
        img = img.filter(ImageFilter.GaussianBlur(style.blur))
    return img


def render_background(camera: int, seed: int, size: tuple[int, int] = (128, 64)) -> Image.Image:
    """A person-free crop of camera ``camera`` (a false detection: Market-1501 style distractor)."""
    height, width = size
    rng = random.Random(derive_seed(seed, camera, 0xBA))
    return _finish(_background(camera, rng, height, width), camera, rng)


@dataclass(frozen=True)
class _Pose:
    """Where and how one person is drawn; body parts are placed at fractions of the body height."""

    view: str
    top: float  # y of the top of the head
    hb: float  # body height in pixels
    cx: float  # body centre x
    sw: float  # shoulder width as seen in this view
    facing: int  # side view: walking direction (+1 right, -1 left)
    phase: float  # walking phase in [-1, 1]: leg stride, opposite arm swing

    def y(self, f: float) -> float:
        return self.top + f * self.hb

    @property
    def head_w(self) -> float:
        return self.hb * 0.105

    @property
    def head_cx(self) -> float:
        return self.cx + (self.facing * self.head_w * 0.12 if self.view == "side" else 0.0)

    @property
    def line(self) -> int:
        return max(1, round(self.hb * 0.012))


def _random_pose(ident: Identity, view: str, rng: random.Random, height: int, width: int, scale: float) -> _Pose:
    hb = min(height * rng.uniform(0.8, 0.95) * ident.height * scale, 0.96 * height)
    return _Pose(
        view=view,
        top=rng.uniform(0.03 * height, max(0.03 * height, 0.99 * height - hb)),
        hb=hb,
        cx=width * (0.5 + rng.uniform(-0.1, 0.1)),
        sw=hb * 0.24 * ident.width * (0.62 if view == "side" else 1.0),
        facing=rng.choice((-1, 1)),
        phase=rng.uniform(-1.0, 1.0),
    )


def _leg(p: _Pose, ankle_x: float, hip_x: float, width: float, f0: float, f1: float) -> list[tuple[float, float]]:
    """Polygon of the part of one leg between body fractions f0 and f1 (hip 0.5 -> ankle 0.95)."""

    def at(f: float) -> tuple[float, float]:
        t = (f - 0.5) / 0.45
        return hip_x + t * (ankle_x - hip_x), width * (1.0 - 0.3 * t)

    (c0, w0), (c1, w1) = at(f0), at(f1)
    return [(c0 - w0 / 2, p.y(f0)), (c0 + w0 / 2, p.y(f0)), (c1 + w1 / 2, p.y(f1)), (c1 - w1 / 2, p.y(f1))]


def _dot(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, fill: tuple[int, ...]) -> None:
    draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)


def _draw_behind(draw: ImageDraw.ImageDraw, ident: Identity, p: _Pose, held: tuple[int, ...]) -> None:
    """What the body hides partly: a backpack seen from the side, an object held in front seen from behind,
    long hair seen from the front or side."""
    a, c, y = ident.attributes, ident.rgb, p.y
    if a["Backpack"] and p.view == "side":
        bx = p.cx - p.facing * p.sw * 0.95
        draw.rounded_rectangle((bx - p.sw * 0.4, y(0.18), bx + p.sw * 0.4, y(0.45)), radius=p.line * 2, fill=c["bag"])
    if a["HoldObjectsInFront"] and p.view == "back":
        draw.rectangle((p.cx - p.sw * 0.62, y(0.32), p.cx + p.sw * 0.62, y(0.44)), fill=held)
    if ident.hair == "long" and p.view != "back":
        hx = p.head_cx - (p.facing * p.head_w * 0.25 if p.view == "side" else 0.0)
        draw.rectangle((hx - p.head_w * 0.62, y(0.03), hx + p.head_w * 0.62, y(0.26)), fill=c["hair"])


def _draw_legs(draw: ImageDraw.ImageDraw, ident: Identity, p: _Pose) -> None:
    """Legs (skin), the lower garment over its length with its pattern, shoes or boots."""
    a, c, y, cx, sw = ident.attributes, ident.rgb, p.y, p.cx, p.sw
    if p.view == "side":
        stride = p.phase * p.hb * 0.12
        legs = [(cx + stride, cx, sw * 0.55), (cx - stride, cx, sw * 0.55)]
    else:
        stride = p.phase * p.hb * 0.03
        legs = [(cx + s * (sw * 0.22 - stride), cx + s * sw * 0.22, sw * 0.4) for s in (-1, 1)]
    end = {"Trousers": 0.94, "Shorts": 0.66, "Skirt&Dress": 0.5}[ident.lower]
    for ankle_x, hip_x, leg_w in legs:
        draw.polygon(_leg(p, ankle_x, hip_x, leg_w, 0.5, 0.95), fill=c["skin"])
        if end > 0.5:
            draw.polygon(_leg(p, ankle_x, hip_x, leg_w * 1.05, 0.48, end), fill=c["lower"])
            if a["LowerStripe"]:
                x_end = hip_x + (ankle_x - hip_x) * (end - 0.5) / 0.45
                draw.line((hip_x, y(0.5), x_end, y(end)), fill=c["pattern"], width=p.line)
            if a["LowerPattern"]:
                for k in range(int((end - 0.52) / 0.06) + 1):
                    f = 0.53 + 0.06 * k
                    px = hip_x + (ankle_x - hip_x) * (f - 0.5) / 0.45 + leg_w * (0.2 if k % 2 else -0.2)
                    _dot(draw, px, y(f), p.line, c["pattern"])
        if a["boots"]:
            draw.polygon(_leg(p, ankle_x, hip_x, leg_w * 1.15, 0.83, 0.96), fill=c["shoes"])
        toe = ankle_x + (p.facing * leg_w * 0.3 if p.view == "side" else 0.0)
        draw.ellipse((toe - leg_w * 0.6, y(0.935), toe + leg_w * 0.6, y(1.0)), fill=c["shoes"])
    if ident.lower != "Skirt&Dress":
        draw.rectangle((cx - sw * 0.42, y(0.47), cx + sw * 0.42, y(0.56)), fill=c["lower"])
        return
    skirt = [(cx - sw * 0.44, y(0.47)), (cx + sw * 0.44, y(0.47)), (cx + sw * 0.62, y(0.72)), (cx - sw * 0.62, y(0.72))]
    draw.polygon(skirt, fill=c["lower"])
    if a["LowerStripe"]:
        draw.line((cx, y(0.5), cx, y(0.71)), fill=c["pattern"], width=p.line)
    if a["LowerPattern"]:
        for k, f in enumerate((0.55, 0.63, 0.69)):
            _dot(draw, cx + sw * (0.25 if k % 2 else -0.25), y(f), p.line, c["pattern"])


def _draw_torso(draw: ImageDraw.ImageDraw, ident: Identity, p: _Pose) -> None:
    """The upper garment (down to the knees for a long coat) and its stripes, plaid, logo or splice."""
    c, y, cx, sw = ident.rgb, p.y, p.cx, p.sw
    bottom, half = (0.8, 0.56) if ident.attributes["LongCoat"] else (0.5, 0.42)
    draw.polygon([(cx - sw / 2, y(0.155)), (cx + sw / 2, y(0.155)), (cx + sw * half, y(bottom)),
                  (cx - sw * half, y(bottom))], fill=c["upper"])
    pattern = ident.upper_pattern
    if pattern == "UpperStride":
        step = max(2.0, p.hb * 0.04)
        for f in np.arange(y(0.19), y(0.48), 2 * step):
            draw.line((cx - sw * 0.44, f, cx + sw * 0.44, f), fill=c["pattern"], width=p.line)
    elif pattern == "UpperPlaid":
        step = max(3.0, p.hb * 0.06)
        for f in np.arange(y(0.18), y(0.49), step):
            draw.line((cx - sw * 0.45, f, cx + sw * 0.45, f), fill=c["pattern"], width=1)
        for x in np.arange(cx - sw * 0.4, cx + sw * 0.45, step):
            draw.line((x, y(0.16), x, y(0.49)), fill=c["pattern"], width=1)
    elif pattern == "UpperLogo":  # printed on the back too, so the label holds in every view
        r = sw * (0.16 if p.view == "side" else 0.2)
        draw.rectangle((cx - r, y(0.25) - r, cx + r, y(0.25) + r), fill=c["pattern"])
    elif pattern == "UpperSplice":
        draw.polygon([(cx - sw * 0.47, y(0.33)), (cx + sw * 0.47, y(0.33)), (cx + sw * 0.42, y(0.5)),
                      (cx - sw * 0.42, y(0.5))], fill=c["pattern"])


def _draw_arms(draw: ImageDraw.ImageDraw, ident: Identity, p: _Pose) -> list[tuple[float, float]]:
    """Arms swinging against the legs: sleeve in the upper colour, then skin; returns the hand positions."""
    c, y = ident.rgb, p.y
    sleeve = 0.35 if ident.attributes["ShortSleeve"] else 0.92
    arm_w = max(2, round(p.sw * (0.34 if p.view == "side" else 0.2)))
    swing = -p.phase * p.hb * (0.1 if p.view == "side" else 0.02)
    if p.view == "side":
        arms = [(p.head_cx, swing * p.facing)]
    else:
        arms = [(p.cx - p.sw / 2 - arm_w * 0.35, -swing), (p.cx + p.sw / 2 + arm_w * 0.35, swing)]
    hands = []
    for sx, dx in arms:
        hx, hy = sx + dx, y(0.5)
        draw.line((sx, y(0.17), hx, hy), fill=c["skin"], width=arm_w)
        draw.line((sx, y(0.17), sx + dx * sleeve, y(0.17) + (hy - y(0.17)) * sleeve), fill=c["upper"], width=arm_w)
        draw.ellipse((hx - arm_w * 0.6, hy - arm_w * 0.3, hx + arm_w * 0.6, hy + arm_w * 0.9), fill=c["skin"])
        hands.append((hx, hy))
    return hands


def _draw_carried(draw: ImageDraw.ImageDraw, ident: Identity, p: _Pose, hands: list[tuple[float, float]],
                  held: tuple[int, ...], rng: random.Random) -> None:
    """Backpack (bag from behind, straps from the front), shoulder bag, handbag, object held in front."""
    a, c, y, cx, sw = ident.attributes, ident.rgb, p.y, p.cx, p.sw
    dark = tuple(int(v * 0.7) for v in c["bag"])
    if a["Backpack"] and p.view == "back":
        box = (cx - sw * 0.38, y(0.19), cx + sw * 0.38, y(0.45))
        draw.rounded_rectangle(box, radius=p.line * 2, fill=c["bag"], outline=dark)
    elif a["Backpack"] and p.view == "front":
        for sx in (cx - sw * 0.3, cx + sw * 0.3):
            draw.line((sx, y(0.16), sx, y(0.36)), fill=dark, width=max(1, round(sw * 0.09)))
    if a["ShoulderBag"]:
        side = -1 if p.view == "side" else rng.choice((-1, 1))
        draw.line((cx - side * sw * 0.4, y(0.16), cx + side * sw * 0.45, y(0.46)), fill=dark, width=p.line)
        bx = cx + side * sw * (0.2 if p.view == "side" else 0.55)
        draw.rectangle((bx - sw * 0.2, y(0.43), bx + sw * 0.2, y(0.56)), fill=c["bag"])
    if a["HandBag"]:
        hx, hy = hands[rng.randrange(len(hands))]
        box = (hx - sw * 0.19, hy + p.hb * 0.01, hx + sw * 0.19, hy + p.hb * 0.11)
        draw.rectangle(box, fill=c["bag"], outline=dark)
    if a["HoldObjectsInFront"] and p.view != "back":
        ox = cx + (p.facing * sw * 0.45 if p.view == "side" else 0.0)
        draw.rectangle((ox - sw * 0.3, y(0.33), ox + sw * 0.3, y(0.45)), fill=held)


def _draw_head(draw: ImageDraw.ImageDraw, ident: Identity, p: _Pose) -> None:
    """Neck, head, hair (short, long or bald), eyes, glasses and hat, as seen in this view."""
    a, c, y, hcx, hw = ident.attributes, ident.rgb, p.y, p.head_cx, p.head_w
    draw.rectangle((hcx - hw * 0.22, y(0.11), hcx + hw * 0.22, y(0.165)), fill=c["skin"])
    head = (hcx - hw / 2, y(0.0), hcx + hw / 2, y(0.13))
    hair_box = (head[0] - 1, head[1] - 1, head[2] + 1, head[3])
    draw.ellipse(head, fill=c["skin"])
    if ident.hair != "bald":
        if p.view == "back":
            draw.ellipse(hair_box, fill=c["hair"])
            if ident.hair == "long":
                draw.rectangle((hcx - hw * 0.6, y(0.07), hcx + hw * 0.6, y(0.27)), fill=c["hair"])
        else:
            draw.chord(hair_box, 180, 360, fill=c["hair"])
            if p.view == "side":  # the back half of the head, away from the walking direction
                start = 90 if p.facing > 0 else -90
                draw.chord(hair_box, start, start + 180, fill=c["hair"])
    eye_y = y(0.065)
    if p.view == "front":
        for ex in (hcx - hw * 0.2, hcx + hw * 0.2):
            draw.point((ex, eye_y), fill=_EYE)
    elif p.view == "side":
        draw.point((hcx + p.facing * hw * 0.3, eye_y), fill=_EYE)
    if a["Glasses"]:  # from behind, the temples show across the hair, so the label holds in every view
        x0, x1 = (hcx, hcx + p.facing * hw * 0.5) if p.view == "side" else (hcx - hw * 0.42, hcx + hw * 0.42)
        draw.line((x0, eye_y, x1, eye_y), fill=_DARK, width=p.line)
    if a["Hat"]:
        draw.chord((head[0] - 1, y(-0.02), head[2] + 1, y(0.09)), 180, 360, fill=c["hat"])
        brim = (hw * 0.35 * p.facing,) * 2 if p.view == "side" else (-hw * 0.2, hw * 0.2)
        x0, x1 = head[0] + min(brim[0], 0), head[2] + max(brim[1], 0)
        draw.line((x0, y(0.035), x1, y(0.035)), fill=c["hat"], width=p.line + 1)


def _draw_person(draw: ImageDraw.ImageDraw, ident: Identity, p: _Pose, rng: random.Random) -> None:
    held = tuple(rng.randint(90, 220) for _ in range(3))  # colour of an object held in front
    _draw_behind(draw, ident, p, held)
    _draw_legs(draw, ident, p)
    _draw_torso(draw, ident, p)
    hands = _draw_arms(draw, ident, p)
    _draw_carried(draw, ident, p, hands, held, rng)
    _draw_head(draw, ident, p)


def _draw_occluder(draw: ImageDraw.ImageDraw, p: _Pose, rng: random.Random, height: int, width: int) -> None:
    """Cover roughly 20-50% of the body: a pole, a box, a car-like block or another person."""
    bw = p.sw * 1.4
    feet = p.y(1.0)
    kind = rng.choice(("pole", "box", "car", "person"))
    frac = rng.uniform(0.25, 0.5)
    color = rng.choice(list(COLORS.values()))
    if kind == "pole":
        w = frac * bw
        x0 = p.cx + rng.uniform(-0.35, 0.35) * bw - w / 2
        draw.rectangle((x0, -1, x0 + w, height + 1), fill=tuple(int(v * 0.6 + 40) for v in color))
        draw.line((x0 + w * 0.3, 0, x0 + w * 0.3, height), fill=tuple(min(255, int(v * 0.6 + 90)) for v in color))
    elif kind == "box":
        y0 = feet - frac * p.hb
        x0, x1 = p.cx - rng.uniform(0.7, 1.5) * bw, p.cx + rng.uniform(0.7, 1.5) * bw
        draw.rectangle((x0, y0, x1, height + 1), fill=tuple(int(v * 0.5 + 60) for v in color), outline=_DARK)
    elif kind == "car":
        y0 = feet - (frac + 0.05) * p.hb
        draw.rounded_rectangle((-width * 0.3, y0, width * 1.3, height + 4), radius=max(2, p.hb * 0.06), fill=color)
        draw.rectangle((-width * 0.3, y0 + p.hb * 0.03, width * 1.3, y0 + p.hb * 0.11), fill=(50, 60, 70))
        r = p.hb * 0.07
        for wx in (width * 0.15, width * 0.85):
            draw.ellipse((wx - r, height - r * 1.2, wx + r, height + r * 0.8), fill=_DARK)
    else:
        side = rng.choice((-1, 1))
        ox = p.cx + side * bw * rng.uniform(0.55, 0.8)
        w = bw * (0.6 + frac)
        draw.ellipse((ox - w / 2, p.y(0.12), ox + w / 2, p.y(1.05)), fill=color)
        draw.ellipse((ox - w * 0.2, p.y(-0.02), ox + w * 0.2, p.y(0.14)), fill=(200, 160, 130))


def render_person(
    identity: Identity,
    *,
    camera: int,
    seed: int,
    size: tuple[int, int] = (128, 64),
    view: str | None = None,
    occluded: bool = False,
) -> tuple[Image.Image, dict[str, int]]:
    """Draw ``identity`` as seen by ``camera``; return the RGB image and its 26 PA-100K attributes.

    ``size`` is (height, width). ``view`` is "front", "side" or "back" (random if None; it sets the
    Front/Side/Back attributes). ``occluded`` adds an occluder covering about 20-50% of the body.
    """
    if view is not None and view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS} or None, got {view!r}")
    height, width = size
    rng = random.Random(derive_seed(seed, identity.pid, camera))
    view = view or rng.choices(VIEWS, weights=(0.4, 0.25, 0.35))[0]
    img = _background(camera, rng, height, width)
    draw = ImageDraw.Draw(img)
    pose = _random_pose(identity, view, rng, height, width, camera_style(camera).scale)
    _draw_person(draw, identity, pose, rng)
    if occluded:
        _draw_occluder(draw, pose, rng, height, width)
    img = _finish(img, camera, rng)
    attributes = {name: identity.attributes.get(name, 0) for name in PA100K_ATTRIBUTES}
    attributes[_VIEW_ATTRIBUTE[view]] = 1
    return img, attributes
