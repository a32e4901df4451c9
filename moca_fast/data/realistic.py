"""Benchmark data shaped like the reference's training data: image sizes, text lengths and task mixes of MoCa's
stage-1 sources and 30 stage-2 subsets, drawn deterministically by seed (the sources of every figure and the
reasoning behind each estimate: realistic.md beside this module).

What matters to speed is shape, not content: how many tokens each image becomes at the reference's pixel budget
(256..1024 tokens; document pages at the 1,024 cap, photos ~300-500), how long each text is (labels and answers
1-8 tokens, captions 10-40, web documents up to max_len 1280), how many images a sample holds, and in what mix.
Images are plain synthetic pictures (a coloured ground and a rectangle, cheap to draw; JPEG) stored at the
size the reference's processor resizes their drawn native size to (multiples of 28 px, at most 1024 * 28 * 28
pixels): a larger file would only cost decoding. Texts are words that, each after a space, are one token in the
offline tokenizer (and in Qwen's), so a text of n words is n tokens.

  realistic_documents(n, seed)              stage-1 documents, the seven sources in equal shares
  realistic_pair_rows(n, folder, seed)      stage-2 rows in the reference columns, the 30 subsets in equal
                                            shares, images written under folder/images
  realistic_inputs(n, seed)                 embedding inputs: the subsets' queries and positives, in memory
"""

from __future__ import annotations

import io
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..prompts import (
    DOCUMENT_PAGE_INSTRUCTION,
    IMAGE_QUESTION_INSTRUCTION,
    IMAGE_TARGET_INSTRUCTION,
    TEXT_TO_IMAGE_INSTRUCTION,
)
from .documents import Document
from .image_patches import MAX_PIXELS, MIN_PIXELS, resized_size
from .pairs import MMEB_IMAGE_TOKEN, NEGATIVE_RATIO
from .tokens import IMAGE_PLACEHOLDER

MAX_LENGTH = 1280  # the reference's max_len, image tokens included: no drawn sample is longer
WORDS = (
    "the a of and in is page red blue green circle shape image two three one above below left right top bottom "
    "small large document chart table report revenue quarter grew costs question picture coloured plain "
    "background what where many which word written quick brown fox jumps over lazy dog center middle four "
    "five six seven eight nine ten"
).split()


@dataclass(frozen=True)
class Length:
    """A text length in tokens: uniform over lo..hi, or log-normal around `median` (spread `sigma`) clipped to it."""

    lo: int
    hi: int
    median: float | None = None
    sigma: float = 0.0

    def draw(self, rng: random.Random) -> int:
        if self.median is None:
            return rng.randint(self.lo, self.hi)
        return min(self.hi, max(self.lo, round(rng.lognormvariate(math.log(self.median), self.sigma))))


# Native (width, height) of each kind of image; aspect = height / width.
def _oriented(rng: random.Random, long_side: float, short_side: float, portrait_share: float) -> tuple[int, int]:
    w, h = round(long_side), round(short_side)
    return (h, w) if rng.random() < portrait_share else (w, h)


IMAGE_KINDS = {
    # ImageNet / VOC: ~500 x 375 and smaller, below min_pixels, so raised to 256 tokens.
    "small_photo": lambda r: _oriented(r, r.uniform(333, 500), r.uniform(250, 375), 0.25),
    # COCO (Visual7W, VisDial, OK-VQA, A-OKVQA, MSCOCO): long side 640, short mostly 427 or 480.
    "coco": lambda r: _oriented(r, 640, r.choice((480, 480, 427, 427, r.uniform(360, 640))), 0.25),
    # News photos (VisualNews, N24News): landscape 4:3 to 16:9, long side 550-800.
    "news": lambda r: _oriented(r, (side := r.uniform(550, 800)), side / r.uniform(1.33, 1.78), 0.1),
    # Web images (PixelProse, LAION for mmE5, NLVR2 for CIRR, WebQA, InfoSeek, memes): long side log-normal
    # around 700 px (300..2000), aspect 1..2; about a quarter reach the 1,024-token cap.
    "web": lambda r: _oriented(
        r, (side := min(2000, max(300, r.lognormvariate(math.log(700), 0.45)))), side / r.uniform(1.0, 2.0), 0.3
    ),
    "nights": lambda r: (512, 512),  # NIGHTS: 512 x 512 generated variations
    "crop": lambda r: (r.randint(60, 300), r.randint(60, 300)),  # grounding crops: small, raised to 256 tokens
    # Charts (ChartQA: Statista ~800 x 557, Pew): width 800-1200, aspect 0.55-0.85.
    "chart": lambda r: ((w := r.uniform(800, 1200)), w * r.uniform(0.55, 0.85)),
    "figure": lambda r: ((w := r.uniform(500, 1200)), w * r.uniform(0.4, 1.0)),  # arXiv figures
    # Document pages (DocVQA scans, PDF renders, slides) and infographics: all above max_pixels, at the cap.
    "page": lambda r: ((w := r.uniform(1000, 1800)), w * r.uniform(1.25, 1.45)),
    "slide": lambda r: ((w := r.uniform(1280, 1920)), w * 9 / 16),
    "infographic": lambda r: (r.uniform(600, 1200), r.uniform(1500, 5000)),
}


REFERENCE_PIXELS = (MIN_PIXELS, MAX_PIXELS)


def stored_size(kind: str, rng: random.Random, pixels: tuple[int, int] = REFERENCE_PIXELS) -> tuple[int, int]:
    """(width, height) of an image of `kind` as a processor with `pixels` (min, max) resizes it (multiples of 28)."""
    return resized(IMAGE_KINDS[kind](rng), pixels)


def resized(size: tuple[float, float], pixels: tuple[int, int]) -> tuple[int, int]:
    h, w = resized_size(max(28, round(size[0])), max(28, round(size[1])), 28, *pixels)
    return w, h


def image_tokens(size: tuple[int, int]) -> int:
    """LLM tokens of a stored image at the reference's budget (one per 28 x 28 block)."""
    return size[0] * size[1] // 28**2


def draw_image(size: tuple[int, int], rng: random.Random) -> Image.Image:
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    x0, y0 = rng.randrange(size[0] // 2), rng.randrange(size[1] // 2)
    ImageDraw.Draw(image).rectangle(
        (x0, y0, x0 + size[0] // 3, y0 + size[1] // 3), fill=tuple(rng.randrange(256) for _ in range(3))
    )
    return image


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=50)  # the fastest format to write that PIL reads back whole
    return buffer.getvalue()


def words(n: int, rng: random.Random) -> str:
    """n words, each after a space: n tokens (a word at the start of a text, without its space, may split)."""
    return "".join(" " + word for word in rng.choices(WORDS, k=n))


# --------------------------------------------------------------------------------------------------- stage 1


@dataclass(frozen=True)
class Source:
    """A stage-1 source: `images` images (count drawn from the tuple), each of a kind drawn from `kinds`, and
    a text of `text` tokens (cut so that the sample stays within MAX_LENGTH)."""

    name: str
    kinds: tuple[str, ...]
    images: tuple[int, ...]
    text: Length


STAGE1_SOURCES = (  # 500k samples each in the paper: equal shares
    Source("DCLM", (), (0,), Length(50, MAX_LENGTH, median=900, sigma=0.9)),
    Source("PixelProse", ("web",), (1,), Length(40, 500, median=160, sigma=0.4)),
    Source("MAmmoTH-VL", ("web", "coco", "chart", "page", "figure"), (1,), Length(20, 900, median=250, sigma=0.6)),
    Source("MMEB-train", ("coco", "news", "web", "small_photo", "page"), (1, 2), Length(3, 120, median=25, sigma=0.6)),
    Source("Docmatix", ("page",), (1,), Length(30, 250, median=180, sigma=0.5)),
    Source("VisRAG", ("page", "slide", "chart"), (1,), Length(6, 60, median=18, sigma=0.4)),
    Source("ColPali", ("page", "infographic", "figure"), (1,), Length(5, 40, median=14, sigma=0.4)),
)


def realistic_documents(n: int, seed: int, pixels: tuple[int, int] = REFERENCE_PIXELS) -> list[Document]:
    """`n` stage-1 documents, each from a source drawn in equal shares: its images, each followed by a share of
    its text (text-only sources: the text alone), cut to fit max_len at the reference's budget. `pixels` (a
    smaller budget, e.g. the tests') stores the images smaller: the same distributions, another draw."""
    rng = random.Random(f"realistic-documents:{seed}")
    documents = []
    for k in range(n):
        source = rng.choice(STAGE1_SOURCES)
        native = [IMAGE_KINDS[rng.choice(source.kinds)](rng) for _ in range(rng.choice(source.images))]
        sizes = [resized(s, REFERENCE_PIXELS) for s in native]
        while sum(image_tokens(s) + 2 for s in sizes) > MAX_LENGTH:  # a second image that does not fit goes
            sizes.pop()
        room = MAX_LENGTH - sum(image_tokens(s) + 2 for s in sizes)
        n_words = min(source.text.draw(rng), room)
        if not sizes:
            documents.append(Document(f"{source.name}-{k:06d}", words(n_words, rng), []))
            continue
        cuts = sorted(rng.randint(0, n_words) for _ in range(len(sizes) - 1))
        pieces = [b - a for a, b in zip([0, *cuts], [*cuts, n_words])]
        text = "".join(IMAGE_PLACEHOLDER + words(m, rng) for m in pieces)
        documents.append(
            Document(
                f"{source.name}-{k:06d}",
                text,
                [jpeg_bytes(draw_image(resized(s, pixels), rng)) for s in native[: len(sizes)]],
            )
        )
    return documents


# --------------------------------------------------------------------------------------------------- stage 2


@dataclass(frozen=True)
class Side:
    """One side of a pair: an image of `kind` or none, and `prompt` with `text` tokens of words where its {}
    is (the reference's instructions; the image first, marked as MMEB rows mark it)."""

    kind: str | None
    text: Length
    prompt: str = "{}"


NO_TEXT = Length(0, 0)
LABEL, ANSWER, QUESTION = Length(1, 4), Length(1, 8), Length(4, 30, median=10, sigma=0.35)
COCO_CAPTION, NEWS_CAPTION = Length(8, 25, median=12, sigma=0.25), Length(6, 60, median=22, sigma=0.45)
QUESTION_PROMPT = MMEB_IMAGE_TOKEN + IMAGE_QUESTION_INSTRUCTION
IMAGE_PROMPT = MMEB_IMAGE_TOKEN + IMAGE_TARGET_INSTRUCTION
PAGE_PROMPT = MMEB_IMAGE_TOKEN + DOCUMENT_PAGE_INSTRUCTION


def _classify(kind: str, question: Length = Length(3, 6)) -> tuple[Side, Side]:
    return Side(kind, question, QUESTION_PROMPT), Side(None, LABEL)


def _vqa(kind: str, answer: Length = ANSWER) -> tuple[Side, Side]:
    return Side(kind, QUESTION, QUESTION_PROMPT), Side(None, answer)


def _t2i(caption: Length, kind: str) -> tuple[Side, Side]:
    return Side(None, caption, TEXT_TO_IMAGE_INSTRUCTION), Side(kind, NO_TEXT, IMAGE_PROMPT)


def _i2t(kind: str, caption: Length) -> tuple[Side, Side]:
    return Side(kind, Length(3, 6), QUESTION_PROMPT), Side(None, caption)


def _page_retrieval(question: Length, kind: str = "page") -> tuple[Side, Side]:
    return Side(None, question), Side(kind, NO_TEXT, PAGE_PROMPT)


STAGE2_SUBSETS: dict[str, tuple[Side, Side]] = {  # name -> (query, positive); 50k rows each: equal shares
    # MMEB-train (20)
    "ImageNet_1K": _classify("small_photo"),
    "N24News": _classify("news", Length(15, 60, median=30, sigma=0.4)),  # image + its news caption -> category
    "HatefulMemes": _classify("web"),
    "VOC2007": _classify("small_photo"),
    "SUN397": _classify("small_photo"),
    "OK-VQA": _vqa("coco", Length(1, 3)),
    "A-OKVQA": _vqa("coco", Length(1, 3)),
    "DocVQA": _vqa("page"),
    "InfographicsVQA": _vqa("infographic", Length(1, 5)),
    "ChartQA": _vqa("chart", Length(1, 3)),
    "Visual7W": _vqa("coco", Length(2, 8)),
    "VisDial": (
        Side(None, Length(60, 300, median=150, sigma=0.3), TEXT_TO_IMAGE_INSTRUCTION),
        Side("coco", NO_TEXT, IMAGE_PROMPT),
    ),  # a caption + 10 question-answer rounds -> the image
    "CIRR": (Side("web", Length(6, 30, median=14, sigma=0.35), QUESTION_PROMPT), Side("web", NO_TEXT, IMAGE_PROMPT)),
    "VisualNews_t2i": _t2i(NEWS_CAPTION, "news"),
    "VisualNews_i2t": _i2t("news", NEWS_CAPTION),
    "MSCOCO_t2i": _t2i(COCO_CAPTION, "coco"),
    "MSCOCO_i2t": _i2t("coco", COCO_CAPTION),
    "NIGHTS": (Side("nights", NO_TEXT, IMAGE_PROMPT), Side("nights", NO_TEXT, IMAGE_PROMPT)),
    "WebQA": (
        Side(None, Length(8, 40, median=16, sigma=0.4), TEXT_TO_IMAGE_INSTRUCTION),
        Side("web", Length(10, 80, median=25, sigma=0.5), MMEB_IMAGE_TOKEN + "{}"),
    ),  # image + its caption
    "MSCOCO": (Side("coco", Length(2, 6), QUESTION_PROMPT), Side("crop", NO_TEXT, IMAGE_PROMPT)),  # grounding
    # the other sources (10)
    "VisRAG": _page_retrieval(Length(6, 60, median=18, sigma=0.4), "page"),
    "ColPali": _page_retrieval(Length(5, 40, median=14, sigma=0.4), "page"),
    "TAT-DQA": _page_retrieval(Length(8, 40, median=16, sigma=0.35), "page"),
    "ArxivQA": _vqa("figure", Length(5, 60, median=20, sigma=0.5)),
    "InfoSeek_it2t": _vqa("web", Length(1, 10)),
    "InfoSeek_it2it": (
        Side("web", QUESTION, QUESTION_PROMPT),
        Side("web", Length(10, 120, median=40, sigma=0.5), MMEB_IMAGE_TOKEN + "{}"),
    ),
    "mmE5_classification": _classify("web"),
    "mmE5_vqa": _vqa("web", Length(1, 30, median=6, sigma=0.6)),
    "mmE5_i2t": _i2t("web", Length(8, 60, median=20, sigma=0.4)),
    "mmE5_t2i": _t2i(Length(8, 60, median=20, sigma=0.4), "web"),
}


def _side_text(side: Side, rng: random.Random) -> str:
    return side.prompt.replace("{}", words(side.text.draw(rng), rng), 1)


def _side_image(side: Side, folder: Path, relative: str, rng: random.Random, pixels: tuple[int, int]) -> str:
    """Draw `side`'s image to folder/relative and return `relative`; "" when the side has none."""
    if side.kind is None:
        return ""
    (folder / relative).parent.mkdir(parents=True, exist_ok=True)
    draw_image(stored_size(side.kind, rng, pixels), rng).save(folder / relative, quality=50)
    return relative


def realistic_inputs(n: int, seed: int) -> list[tuple[str, list[Image.Image]]]:
    """`n` embedding inputs shaped as the stage-2 subsets' queries and positives in their mix: (text with
    IMAGE_PLACEHOLDER where its image goes, [image] or [])."""
    rng = random.Random(f"realistic-inputs:{seed}")
    inputs = []
    for _ in range(n):
        side = STAGE2_SUBSETS[rng.choice(sorted(STAGE2_SUBSETS))][rng.randrange(2)]
        text = _side_text(side, rng).replace(MMEB_IMAGE_TOKEN, IMAGE_PLACEHOLDER)
        inputs.append((text, [draw_image(stored_size(side.kind, rng), rng)] if side.kind else []))
    return inputs


def realistic_pair_rows(
    n: int, folder: str | Path, seed: int, pixels: tuple[int, int] = REFERENCE_PIXELS
) -> dict[str, list[dict]]:
    """`n` stage-2 pairs, each from a subset drawn in equal shares, with NEGATIVE_RATIO hard negatives shaped
    like its positive: {subset: rows in the reference columns}, images under folder/images/<subset>/ (paths
    relative to `folder`); `pixels` as in realistic_documents."""
    folder, rng = Path(folder), random.Random(f"realistic-pairs:{seed}")
    names = sorted(STAGE2_SUBSETS)
    rows = defaultdict(list)
    for k in range(n):
        name = rng.choice(names)
        query, positive = STAGE2_SUBSETS[name]
        stem = f"images/{name}/{k:06d}"
        negatives = [
            (_side_text(positive, rng), _side_image(positive, folder, f"{stem}-n{j}.jpg", rng, pixels))
            for j in range(NEGATIVE_RATIO)
        ]
        rows[name].append(
            {
                "qry": _side_text(query, rng),
                "qry_image_path": _side_image(query, folder, f"{stem}-q.jpg", rng, pixels),
                "pos_text": _side_text(positive, rng),
                "pos_image_path": _side_image(positive, folder, f"{stem}-p.jpg", rng, pixels),
                "neg_text": repr([text for text, _ in negatives]),
                "neg_image_path": repr([path for _, path in negatives]),
            }
        )
    return dict(rows)
