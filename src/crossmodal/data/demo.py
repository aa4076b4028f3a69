"""The embedded demo dataset: rendered memes with captions, labelled for sarcasm; no download needed.

Each scene has a *mood* (sunny or gloomy, carried by the palette) and each caption a *sentiment* (positive,
negative or neutral). The label needs both: ``neutral`` for a neutral caption, ``sincere`` when sentiment and mood
agree, ``sarcastic`` when they clash; ``label_noise`` of the labels are flipped. The same ``seed`` gives the same
manifest, byte for byte.

Usage::

    from crossmodal.config import DemoConfig
    from crossmodal.data.demo import generate_demo
    manifest = generate_demo("data/demo", DemoConfig(rows=1500, seed=7))   # -> data/demo/manifest.csv

Columns: ``id, image, text, label, group`` (``group`` is a fake poster id; there is no split column, the
pipeline makes a grouped, stratified split). With ``bad_rows`` six broken rows (ids ``bad-*``: a missing, a
truncated, an empty and a not-an-image file, a blank caption, a missing label) show the quarantine at work.
"""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from crossmodal.config import DemoConfig
from crossmodal.files import atomic_path

LABELS = ("neutral", "sarcastic", "sincere")

POS_ADJ = ["wonderful", "amazing", "fantastic", "lovely", "perfect", "brilliant", "beautiful", "glorious",
           "delightful", "awesome", "great", "superb", "fabulous", "marvellous"]
NEG_ADJ = ["terrible", "awful", "miserable", "horrible", "dreadful", "depressing", "disastrous", "lousy",
           "rotten", "horrendous", "ghastly", "hopeless", "dismal", "painful"]
POS_FEEL = ["so happy", "on top of the world", "grateful", "thrilled", "blessed", "over the moon", "delighted",
            "full of joy", "so excited", "really cheerful"]
NEG_FEEL = ["so sad", "miserable", "fed up", "exhausted", "heartbroken", "annoyed", "disappointed",
            "so done with everything", "really upset", "completely drained"]
POS_CLAUSE = ["everything went perfectly", "life is good", "couldn't ask for more", "best time ever",
              "this made my day", "pure happiness", "loving every minute", "so much fun", "what a joy",
              "I never want this to end"]
NEG_CLAUSE = ["everything went wrong", "nothing works today", "what a disaster", "I just want to go home",
              "this ruined my day", "could this get any worse", "a total nightmare", "so much for my plans",
              "I hate everything", "why does this always happen to me"]
PLACES = ["beach", "park", "office", "station", "lake", "market", "campus", "harbour", "garden", "city centre",
          "mountains", "zoo", "bus stop", "airport", "stadium", "bakery", "library", "bridge", "river", "square"]
TIMES = ["morning", "afternoon", "evening", "day", "weekend", "Monday", "holiday", "commute", "picnic", "trip"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]

# Positive and negative captions use the same sentences; {adj}/{feel}/{clause} take the sentiment.
SENTIMENT_TEMPLATES = [
    "What {a_adj} {time} at the {place}!", "{Worst} {time} ever, {clause}", "Feeling {feel} at the {place} this {time}",
    "Such {a_adj} {time}, {clause}", "Honestly, the {place} was {adj}", "Absolutely {adj} {time} at the {place}",
    "Another {adj} {time} at the {place}, {clause}", "{Love} this {place} on a {weekday}, {clause}", "{feel_cap} right now at the {place}. {clause_cap}",
    "The {place} today: {adj}. {clause_cap}", "Just got back from the {place} this {time}, {feel}", "{A_adj} {time}. {clause_cap}!",
]
NEUTRAL_TEMPLATES = [
    "Photo taken on {weekday} near the {place}", "The {place} at {clock}, {weekday}",
    "Snapshot from the {place}, {month} {daynum}", "Picture {n} from the {place} album",
    "Taken with my phone near the {place} at {clock}", "View of the {place} on {weekday} {part}",
    "Uploaded from the {place}, {month} {daynum}, {clock}", "Image of the {place}, {weekday} {part}",
    "{place_cap}, {month} {daynum}", "Walking past the {place} around {clock}",
    "Scan {n} of an old print: the {place}", "Frame {n}, {place}, {weekday} {part}",
]


# Sentiment-free hashtags, appended to some captions for variety (fewer identical captions).
TAGS = ["photo", "nofilter", "latergram", "citylife", "travel", "tbt", "picoftheday", "instadaily", "weekend",
        "outdoors", "streetphotography", "memories", "throwback", "snapshot", "mobilephoto", "daily", "life",
        "random", "meme", "caption"]


def caption(rng: random.Random, sentiment: str) -> str:
    """A caption with sentiment "positive", "negative" or "neutral"."""
    text = _caption(rng, sentiment)
    return text + " #" + rng.choice(TAGS) if rng.random() < 0.6 else text


def _caption(rng: random.Random, sentiment: str) -> str:
    place = rng.choice(PLACES)
    if sentiment == "neutral":
        return rng.choice(NEUTRAL_TEMPLATES).format(
            place=place, place_cap=place[:1].upper() + place[1:], weekday=rng.choice(WEEKDAYS),
            month=rng.choice(MONTHS), daynum=rng.randint(1, 28), n=rng.randint(2, 400),
            clock=f"{rng.randint(6, 21)}:{rng.choice(['00', '15', '30', '45'])}",
            part=rng.choice(["morning", "afternoon", "evening"]))
    pos = sentiment == "positive"
    feel = rng.choice(POS_FEEL if pos else NEG_FEEL)
    clause = rng.choice(POS_CLAUSE if pos else NEG_CLAUSE)
    adj = rng.choice(POS_ADJ if pos else NEG_ADJ)
    a_adj = ("an " if adj[0] in "aeiou" else "a ") + adj
    return rng.choice(SENTIMENT_TEMPLATES).format(
        adj=adj, a_adj=a_adj, A_adj=a_adj[:1].upper() + a_adj[1:], time=rng.choice(TIMES), place=place, feel=feel,
        clause=clause, feel_cap=feel[:1].upper() + feel[1:], clause_cap=clause[:1].upper() + clause[1:],
        Worst="Best" if pos else "Worst", Love="Love" if pos else "Hate", weekday=rng.choice(WEEKDAYS))


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def render_scene(rng: random.Random, nrng: np.random.Generator, mood: str, size: int) -> Image.Image:
    """Draw a sunny or gloomy scene; the palette (the global colour) is the strongest cue."""
    s = size
    sunny = mood == "sunny"
    if sunny:
        top, bottom = rng.choice([((110, 180, 245), (255, 225, 120)), ((255, 170, 60), (255, 230, 140)),
                                  ((90, 170, 240), (250, 205, 110))])
    else:
        top, bottom = rng.choice([((60, 68, 85), (125, 135, 150)), ((45, 55, 80), (105, 120, 140)),
                                  ((80, 85, 95), (140, 145, 155))])
    top, bottom = _jitter(rng, top, 18), _jitter(rng, bottom, 18)
    t = np.linspace(0.0, 1.0, s)[:, None, None]
    arr = (np.array(top)[None, None, :] * (1 - t) + np.array(bottom)[None, None, :] * t) * np.ones((1, s, 1))
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)

    def r(lo: float, hi: float) -> int:
        return int(rng.uniform(lo, hi) * s)

    if rng.random() < 0.5:  # ground band: sand/grass when sunny, wet asphalt when gloomy
        g = r(0.72, 0.88)
        ground = rng.choice([(235, 205, 140), (120, 190, 90)]) if sunny else rng.choice([(70, 75, 85), (85, 95, 90)])
        d.rectangle([0, g, s, s], fill=_jitter(rng, ground, 12))
    if sunny:
        cx, cy, rad = r(0.1, 0.9), r(0.08, 0.4), r(0.08, 0.16)
        for k in range(rng.randint(6, 12)):  # rays
            a = 2 * np.pi * k / 10 + rng.random()
            d.line([cx + np.cos(a) * rad * 1.2, cy + np.sin(a) * rad * 1.2, cx + np.cos(a) * rad * 1.9,
                    cy + np.sin(a) * rad * 1.9], fill=(255, 215, 40), width=max(1, s // 48))
        d.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=_jitter(rng, (255, 210, 30), 20))
    else:
        for _ in range(rng.randint(2, 4)):  # clouds: clusters of grey ellipses
            cx, cy, w = r(0.0, 1.0), r(0.05, 0.45), r(0.15, 0.3)
            shade = _jitter(rng, (115, 120, 130), 20)
            for _ in range(3):
                ox, oy = rng.randint(-w // 2, w // 2), rng.randint(-w // 5, w // 5)
                d.ellipse([cx + ox - w // 2, cy + oy - w // 3, cx + ox + w // 2, cy + oy + w // 3], fill=shade)
        slant = rng.uniform(-0.3, 0.3)
        for _ in range(rng.randint(25, 60)):  # rain streaks
            x, y, ln = r(0.0, 1.0), r(0.2, 1.0), r(0.05, 0.12)
            d.line([x, y, x + slant * ln, y + ln], fill=_jitter(rng, (170, 180, 200), 15), width=1)

    for _ in range(rng.randint(2, 5)):  # mood-free clutter: the same distribution for both moods
        x, y, w = r(0.0, 0.95), r(0.0, 0.95), r(0.04, 0.12)
        col = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))
        shape = rng.choice(["rect", "ellipse", "line"])
        if shape == "rect":
            d.rectangle([x, y, x + w, y + w // 2 + 1], fill=col)
        elif shape == "ellipse":
            d.ellipse([x, y, x + w, y + w], fill=col)
        else:
            d.line([x, y, x + w, y + rng.randint(-w, w)], fill=col, width=max(1, s // 64))

    # The face: smiling and sun-coloured, or frowning and blue-grey.
    fx, fy, fr = r(0.2, 0.8), r(0.45, 0.78), r(0.11, 0.18)
    face = _jitter(rng, (255, 220, 50) if sunny else (140, 155, 185), 15)
    d.ellipse([fx - fr, fy - fr, fx + fr, fy + fr], fill=face, outline=(40, 40, 40), width=max(1, s // 64))
    er = max(1, fr // 7)
    for ex in (fx - fr // 3, fx + fr // 3):
        d.ellipse([ex - er, fy - fr // 3 - er, ex + er, fy - fr // 3 + er], fill=(30, 30, 30))
    mw = max(2, s // 48)
    if sunny:
        d.arc([fx - fr // 2, fy - fr // 3, fx + fr // 2, fy + fr // 2], 20, 160, fill=(40, 20, 20), width=mw)
    else:
        d.arc([fx - fr // 2, fy + fr // 5, fx + fr // 2, fy + fr], 200, 340, fill=(40, 20, 20), width=mw)

    out = np.asarray(img, dtype=np.float32) + rng.uniform(-12, 12)  # brightness jitter
    out += nrng.normal(0.0, rng.uniform(3, 9), out.shape)  # sensor-like noise
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def generate_demo(out_dir: str | Path, cfg: DemoConfig | None = None) -> Path:
    """Write ``out_dir/manifest.csv`` and ``out_dir/images/``; return the manifest's path."""
    cfg = cfg or DemoConfig()
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    n_groups = max(1, cfg.rows // 5)
    rows: list[list[str]] = []
    seen: set[str] = set()
    for i in range(cfg.rows):
        row_seed = rng.getrandbits(64)  # one seed per row: rows stay identical if the row count changes
        rr, nr = random.Random(row_seed), np.random.default_rng(row_seed)
        mood = "sunny" if rr.random() < 0.5 else "gloomy"
        sentiment = rr.choice(["positive", "negative", "neutral"])
        if sentiment == "neutral":
            label = "neutral"
        else:
            label = "sincere" if (sentiment == "positive") == (mood == "sunny") else "sarcastic"
        noise, alt = rr.random(), rr.randrange(2)  # always drawn: images and captions do not depend on the noise
        if noise < cfg.label_noise:
            label = [lab for lab in LABELS if lab != label][alt]
        rid = f"m{i:05d}"
        _write(images / f"{rid}.jpg", _jpeg(render_scene(rr, nr, mood, cfg.image_size), rr.randint(80, 92)))
        text = caption(rr, sentiment)
        for _ in range(20):  # redraw repeats: identical captions across splits would read as leakage
            if text not in seen:
                break
            text = caption(rr, sentiment)
        seen.add(text)
        rows.append([rid, f"images/{rid}.jpg", text, label, f"poster-{rr.randrange(n_groups):04d}"])

    if cfg.bad_rows:
        br = random.Random(cfg.seed + 1)
        good = _jpeg(render_scene(br, np.random.default_rng(cfg.seed + 1), "sunny", cfg.image_size), 90)
        _write(images / "bad_truncated.jpg", good[: len(good) // 2])
        _write(images / "bad_empty.jpg", b"")
        _write(images / "bad_text.jpg", b"This is a text file, not a JPEG.\n")
        _write(images / "bad_ok.jpg", good)
        (images / "bad_missing.jpg").unlink(missing_ok=True)
        pos, neg = caption(br, "positive"), caption(br, "negative")
        rows += [
            ["bad-missing-image", "images/bad_missing.jpg", pos, "sincere", "poster-bad"],
            ["bad-truncated-jpeg", "images/bad_truncated.jpg", neg, "sarcastic", "poster-bad"],
            ["bad-empty-file", "images/bad_empty.jpg", pos, "sincere", "poster-bad"],
            ["bad-not-an-image", "images/bad_text.jpg", neg, "sarcastic", "poster-bad"],
            ["bad-empty-caption", "images/bad_ok.jpg", "   ", "neutral", "poster-bad"],
            ["bad-missing-label", "images/bad_ok.jpg", pos, "", "poster-bad"],
        ]

    manifest = out / "manifest.csv"
    with atomic_path(manifest) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["id", "image", "text", "label", "group"])
        writer.writerows(rows)
    return manifest
