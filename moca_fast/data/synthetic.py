"""The built-in synthetic world: small, deterministic, learnable data for both stages and for evaluation.

Scenes. A scene is `count` (1..3) shapes of one kind and colour in one quadrant of a white 112 px square,
optionally with a word written in the middle: five attributes, each from a small vocabulary (`ATTRIBUTES`),
and a regular caption, e.g. "two red circles in the top left with the word cat". A layout seed places the
shapes in slots of their quadrant with a little jitter; the same scene and seed give the same pixels.
Pages. A document page is a title and three fact lines ("red circle 4") drawn on white; facts are unique
within one corpus, so a question about a fact has exactly one relevant page.

Stage 1: `make_documents` gives interleaved documents (scenes each followed by its caption, a page followed by
its text, or text only). Stage 2: `make_pairs` gives pairs for four tasks, whose hard negatives each differ
from the target in exactly one attribute (one fact, for pages):
  t2i   caption (text-to-image prompt)            -> scene image (image-target prompt)
  i2t   scene image + "What does the image show?" -> caption
  vqa   scene image + a question on one attribute -> its answer; the negatives change that attribute
  page  question on one fact                      -> page image (document prompt); the negatives change that fact
Prompts are the reference's (moca_fast/prompts.py), with `<|image_1|>` marking the image as in MMEB data (the readers
turn it into the
placeholder triple). Evaluation re-draws scenes with other seeds; MMEB candidates are the gold target, three
one-attribute variants and random scenes (chance 1/8 for t2i and i2t).

On disk (`write_world(root)` writes all of it; each writer also works alone):
  root/cpt/documents/                    stage 1, `Dataset.save_to_disk`: id, text, images (list of PNG bytes);
                                         `write_documents` also writes parquet, or JSON lines + images/ folder
  root/cl/<task>.jsonl                   stage 2, reference columns; neg_text / neg_image_path are strings
                                         holding a Python list literal, as in the reference data
  root/cl/images/<task>/<id>-<role>.png  paths in rows are relative to root/cl
  root/eval/mmeb/<subset>/test-00000-of-00001.parquet
                                         MMEB rows: qry_text, qry_img_path, tgt_text (list), tgt_img_path (list),
                                         candidate 0 gold; subsets SynT2I, SynI2T, SynVQA
  root/eval/mmeb/images/<subset>/*.png   paths in rows are relative to root/eval/mmeb
  root/eval/beir/SynPages/               BEIR: queries.jsonl {_id, text}; corpus.jsonl {_id, title, text, image
                                         (path relative to this folder)}; qrels/test.tsv (query-id, corpus-id,
                                         score, with a header row); images/*.png
"""

from __future__ import annotations

import functools
import io
import json
import random
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from ..prompts import (
    DOCUMENT_PAGE_INSTRUCTION,
    IMAGE_QUESTION_INSTRUCTION,
    IMAGE_TARGET_INSTRUCTION,
    TEXT_TO_IMAGE_INSTRUCTION,
)
from .documents import Document
from .pairs import MMEB_IMAGE_TOKEN, NEGATIVE_RATIO
from .tokens import IMAGE_PLACEHOLDER

IMAGE_SIZE = 112
ATTRIBUTES: dict[str, tuple] = {
    "shape": ("circle", "square", "triangle", "diamond"),
    "colour": ("red", "green", "blue", "yellow", "purple", "orange"),
    "quadrant": ("top left", "top right", "bottom left", "bottom right"),
    "count": (1, 2, 3),
    "word": (None, "cat", "dog", "sun", "car", "tree", "fish"),
}
QUESTIONS = {
    "shape": "What shape is shown?",
    "colour": "What colour are the shapes?",
    "quadrant": "Where are the shapes?",
    "count": "How many shapes are there?",
    "word": "Which word is written?",
}
TASKS = ("t2i", "i2t", "vqa", "page")
N_CANDIDATES = 8  # MMEB candidates per query: gold + 3 one-attribute variants + random scenes
N_PAGES = 48  # pages in the BEIR corpus (at most 72: 3 unique facts each out of 216)

# The reference's prompts (moca_fast/prompts.py), with the image marked as MMEB rows mark it.
T2I_QUERY = TEXT_TO_IMAGE_INSTRUCTION
IMAGE_QUESTION_QUERY = MMEB_IMAGE_TOKEN + IMAGE_QUESTION_INSTRUCTION
IMAGE_TARGET = MMEB_IMAGE_TOKEN + IMAGE_TARGET_INSTRUCTION
PAGE_TARGET = MMEB_IMAGE_TOKEN + DOCUMENT_PAGE_INSTRUCTION
I2T_QUESTION = "What does the image show?"

COLOUR_RGB = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (225, 195, 20),
    "purple": (140, 60, 175),
    "orange": (240, 130, 30),
}
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
_FACTS = [
    (colour, shape, number)
    for colour in ATTRIBUTES["colour"]
    for shape in ATTRIBUTES["shape"]
    for number in range(1, 10)
]


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    quadrant: str
    count: int
    word: str | None

    @property
    def caption(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        caption = f"{_NUMBER_WORDS[self.count]} {self.colour} {noun} in the {self.quadrant}"
        return caption + (f" with the word {self.word}" if self.word else "")

    def answer(self, attribute: str) -> str:
        value = getattr(self, attribute)
        if attribute == "count":
            return _NUMBER_WORDS[value]
        return value if value is not None else "no word"


@dataclass(frozen=True)
class Page:
    title: str
    facts: tuple[tuple[str, str, int], ...]  # (colour, shape, number)

    @property
    def lines(self) -> list[str]:
        return [self.title] + [fact_text(fact) for fact in self.facts]


def fact_text(fact: tuple[str, str, int]) -> str:
    return " ".join(map(str, fact))


def page_question(fact: tuple[str, str, int]) -> str:
    return f"Which page lists {fact_text(fact)}?"


def random_scene(rng: random.Random) -> Scene:
    return Scene(**{name: rng.choice(values) for name, values in ATTRIBUTES.items()})


def random_pages(n: int, rng: random.Random) -> list[Page]:
    """`n` pages whose 3n facts are all different."""
    facts = rng.sample(_FACTS, 3 * n)
    titles = [word for word in ATTRIBUTES["word"] if word]
    return [Page(f"{rng.choice(titles)} notes", tuple(facts[3 * k : 3 * k + 3])) for k in range(n)]


def scene_variants(scene: Scene, n: int, rng: random.Random, attribute: str | None = None) -> list[Scene]:
    """`n` distinct scenes each differing from `scene` in exactly one attribute: `attribute`, else n different ones."""
    if attribute is not None:
        others = [value for value in ATTRIBUTES[attribute] if value != getattr(scene, attribute)]
        return [replace(scene, **{attribute: value}) for value in rng.sample(others, n)]
    return [
        replace(scene, **{name: rng.choice([v for v in ATTRIBUTES[name] if v != getattr(scene, name)])})
        for name in rng.sample(list(ATTRIBUTES), n)
    ]


def page_variants(page: Page, fact_index: int, n: int, rng: random.Random) -> list[Page]:
    """`n` copies of `page` whose fact `fact_index` has another number (nothing else changes)."""
    colour, shape, number = page.facts[fact_index]
    numbers = rng.sample([k for k in range(1, 10) if k != number], n)
    return [
        replace(page, facts=page.facts[:fact_index] + ((colour, shape, k),) + page.facts[fact_index + 1 :])
        for k in numbers
    ]


# ---------------------------------------------------------------------------------------------- rendering


@functools.cache
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def render(item: Scene | Page, layout_seed: int) -> Image.Image:
    """A scene or a page as a 112 x 112 RGB image; the layout seed decides slots and jitter."""
    rng = random.Random(layout_seed)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
    draw = ImageDraw.Draw(image)
    if isinstance(item, Page):
        x = rng.randint(4, 10)
        draw.text((x, 6 + rng.randint(0, 4)), item.title.upper(), fill="black", font=_font(13))
        for k, line in enumerate(item.lines[1:]):
            draw.text((x, 34 + 22 * k + rng.randint(0, 3)), line, fill=(30, 30, 30), font=_font(11))
        return image
    half, radius = IMAGE_SIZE // 2, 9
    x0, y0 = half * ("right" in item.quadrant), half * ("bottom" in item.quadrant)
    slots = [(x0 + fx * half, y0 + fy * half) for fy in (0.25, 0.68) for fx in (0.25, 0.68)]
    for cx, cy in rng.sample(slots, item.count):
        cx, cy = cx + rng.uniform(-2, 2), cy + rng.uniform(-2, 2)
        if item.shape == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=COLOUR_RGB[item.colour])
        else:
            corners = {
                "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
                "triangle": [(0, -1), (1, 0.8), (-1, 0.8)],
                "diamond": [(0, -1), (1, 0), (0, 1), (-1, 0)],
            }[item.shape]
            draw.polygon([(cx + radius * u, cy + radius * v) for u, v in corners], fill=COLOUR_RGB[item.colour])
    if item.word:
        draw.text((half, half), item.word, fill="black", font=_font(12), anchor="mm")
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- in memory


def make_documents(n: int, seed: int) -> list[Document]:
    """Stage-1 documents: 1..3 scenes each followed by its caption, a page and its text, or text only."""
    rng = random.Random(f"documents:{seed}")
    documents = []
    for k in range(n):
        doc_id, kind = f"doc-{k:06d}", rng.choice(("scenes", "scenes", "page", "text"))
        if kind == "page":
            page = random_pages(1, rng)[0]
            text = f"{IMAGE_PLACEHOLDER}The page reads: {'. '.join(page.lines)}."
            documents.append(Document(doc_id, text, [png_bytes(render(page, rng.getrandbits(32)))]))
            continue
        scenes = [random_scene(rng) for _ in range(rng.randint(1, 3))]
        if kind == "text":
            documents.append(Document(doc_id, " ".join(f"A picture of {s.caption}." for s in scenes), []))
            continue
        text = " ".join(f"{IMAGE_PLACEHOLDER}This picture shows {s.caption}." for s in scenes)
        documents.append(Document(doc_id, text, [png_bytes(render(s, rng.getrandbits(32))) for s in scenes]))
    return documents


@dataclass(frozen=True)
class SyntheticPair:
    """A stage-2 pair before rendering; `asked` is the attribute (vqa) or fact index (page) the query is about."""

    id: str
    task: str
    target: Scene | Page
    negatives: tuple[Scene | Page, ...]
    asked: str | int | None = None


def make_pairs(n_per_task: int, seed: int) -> list[SyntheticPair]:
    """`n_per_task` pairs for each task, each with NEGATIVE_RATIO one-attribute hard negatives."""
    rng = random.Random(f"pairs:{seed}")
    pairs = []
    for task in TASKS:
        for k in range(n_per_task):
            pair_id = f"{task}-{k:06d}"
            if task == "page":
                page, fact_index = random_pages(1, rng)[0], rng.randrange(3)
                negatives = page_variants(page, fact_index, NEGATIVE_RATIO, rng)
                pairs.append(SyntheticPair(pair_id, task, page, tuple(negatives), fact_index))
                continue
            scene = random_scene(rng)
            asked = rng.choice(list(ATTRIBUTES)) if task == "vqa" else None
            negatives = scene_variants(scene, NEGATIVE_RATIO, rng, asked)
            pairs.append(SyntheticPair(pair_id, task, scene, tuple(negatives), asked))
    return pairs


def pair_sides(pair: SyntheticPair) -> list[tuple[str, Scene | Page | None]]:
    """(text, item to render or None) for the query, the positive and each negative, in the reference's format."""
    target = pair.target
    if pair.task == "t2i":
        return [(T2I_QUERY.format(target.caption), None)] + [(IMAGE_TARGET, s) for s in (target, *pair.negatives)]
    if pair.task == "page":
        return [(page_question(target.facts[pair.asked]), None)] + [(PAGE_TARGET, p) for p in (target, *pair.negatives)]
    if pair.task == "i2t":
        query, answers = I2T_QUESTION, [s.caption for s in (target, *pair.negatives)]
    else:
        query, answers = QUESTIONS[pair.asked], [s.answer(pair.asked) for s in (target, *pair.negatives)]
    return [(IMAGE_QUESTION_QUERY.format(query), target)] + [(answer, None) for answer in answers]


# ---------------------------------------------------------------------------------------------- on disk


def _save(item: Scene | Page | None, root: Path, relative: str, rng: random.Random) -> str:
    """Render `item` to root/relative and return `relative`; "" (no image) for None."""
    if item is None:
        return ""
    (root / relative).parent.mkdir(parents=True, exist_ok=True)
    render(item, rng.getrandbits(32)).save(root / relative)
    return relative


def _write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def write_documents(documents: list[Document], path: str | Path, fmt: str) -> Path:
    """Write stage-1 documents as a saved dataset folder ("dataset"), a parquet file, or JSON lines ("jsonl")
    with the images as PNG files in images/ beside it (paths relative to the file's folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        records = []
        for doc in documents:
            relative = [f"images/{doc.id}-{k}.png" for k in range(len(doc.images))]
            for name, data in zip(relative, doc.images):
                (path.parent / name).parent.mkdir(parents=True, exist_ok=True)
                (path.parent / name).write_bytes(data)
            records.append({"id": doc.id, "text": doc.text, "images": relative})
        _write_jsonl(path, records)
        return path
    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("images", pa.list_(pa.binary()))])
    table = pa.Table.from_pylist([{"id": d.id, "text": d.text, "images": d.images} for d in documents], schema=schema)
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "dataset":
        import datasets  # only this format needs it

        datasets.Dataset(datasets.table.InMemoryTable(table)).save_to_disk(str(path))
    else:
        raise ValueError(f"unknown documents format {fmt!r}: use 'dataset', 'parquet' or 'jsonl'")
    return path


def pair_rows(pairs: list[SyntheticPair], folder: str | Path, seed: int) -> dict[str, list[dict]]:
    """Stage-2 rows in the reference columns, {task: rows}, their images written under folder/images (paths in the
    rows relative to `folder`): `PairDataset(rows, image_dir=folder)` reads them without any file of rows."""
    folder, rng = Path(folder), random.Random(f"layouts:{seed}")
    rows = defaultdict(list)
    for pair in pairs:
        roles = ["q", "p"] + [f"n{k}" for k in range(len(pair.negatives))]
        sides = [
            (text, _save(item, folder, f"images/{pair.task}/{pair.id}-{role}.png", rng))
            for role, (text, item) in zip(roles, pair_sides(pair))
        ]
        (query, query_image), (positive, positive_image), *negatives = sides
        rows[pair.task].append(
            {
                "qry": query,
                "qry_image_path": query_image,
                "pos_text": positive,
                "pos_image_path": positive_image,
                "neg_text": repr([text for text, _ in negatives]),
                "neg_image_path": repr([image for _, image in negatives]),
            }
        )
    return dict(rows)


def write_pairs(pairs: list[SyntheticPair], folder: str | Path, seed: int) -> dict[str, Path]:
    """Write stage-2 rows, one JSON-lines file per task, and their images; returns {task: rows file}."""
    folder = Path(folder)
    rows = pair_rows(pairs, folder, seed)
    paths = {task: folder / f"{task}.jsonl" for task in rows}
    for task, task_rows in rows.items():
        _write_jsonl(paths[task], task_rows)
    return paths


def _mmeb_candidates(scene: Scene, rng: random.Random) -> list[Scene]:
    candidates = [scene, *scene_variants(scene, 3, rng)]
    while len(candidates) < N_CANDIDATES:
        other = random_scene(rng)
        if other not in candidates:
            candidates.append(other)
    return candidates


def write_mmeb(folder: str | Path, n_queries: int, seed: int) -> dict[str, Path]:
    """Write the MMEB-format subsets SynT2I, SynI2T, SynVQA (candidate 0 gold); returns {subset: parquet file}."""
    folder, rng = Path(folder), random.Random(f"mmeb:{seed}")
    paths = {}
    for subset in ("SynT2I", "SynI2T", "SynVQA"):
        rows = [_mmeb_row(subset, random_scene(rng), folder, f"images/{subset}/{k:06d}", rng) for k in range(n_queries)]
        paths[subset] = folder / subset / "test-00000-of-00001.parquet"
        paths[subset].parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), paths[subset])
    return paths


def _mmeb_row(subset: str, scene: Scene, folder: Path, stem: str, rng: random.Random) -> dict:
    if subset == "SynT2I":
        candidates = _mmeb_candidates(scene, rng)
        return {
            "qry_text": T2I_QUERY.format(scene.caption),
            "qry_img_path": "",
            "tgt_text": [IMAGE_TARGET] * len(candidates),
            "tgt_img_path": [_save(c, folder, f"{stem}-c{j}.png", rng) for j, c in enumerate(candidates)],
        }
    if subset == "SynI2T":
        question, answers = I2T_QUESTION, [c.caption for c in _mmeb_candidates(scene, rng)]
    else:  # every value of one attribute, the scene's own first
        attribute = rng.choice(list(ATTRIBUTES))
        others = scene_variants(scene, len(ATTRIBUTES[attribute]) - 1, rng, attribute)
        question, answers = QUESTIONS[attribute], [s.answer(attribute) for s in (scene, *others)]
    return {
        "qry_text": IMAGE_QUESTION_QUERY.format(question),
        "qry_img_path": _save(scene, folder, f"{stem}-q.png", rng),
        "tgt_text": answers,
        "tgt_img_path": [""] * len(answers),
    }


def write_beir(folder: str | Path, n_queries: int, seed: int) -> Path:
    """Write a BEIR-format page-retrieval set: N_PAGES page images, up to 3 * N_PAGES fact questions."""
    folder, rng = Path(folder), random.Random(f"beir:{seed}")
    pages = random_pages(N_PAGES, rng)
    corpus = [
        {"_id": f"page-{k:03d}", "title": "", "text": "", "image": _save(page, folder, f"images/page-{k:03d}.png", rng)}
        for k, page in enumerate(pages)
    ]
    all_facts = [(k, fact) for k, page in enumerate(pages) for fact in page.facts]
    located = rng.sample(all_facts, min(n_queries, len(all_facts)))
    _write_jsonl(
        folder / "queries.jsonl",
        [{"_id": f"q-{j:04d}", "text": page_question(fact)} for j, (_, fact) in enumerate(located)],
    )
    _write_jsonl(folder / "corpus.jsonl", corpus)
    (folder / "qrels").mkdir(exist_ok=True)
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q-{j:04d}\tpage-{k:03d}\t1\n" for j, (k, _) in enumerate(located))
    )
    return folder


@dataclass(frozen=True)
class World:
    """Where `write_world` put each part of the world."""

    documents: Path
    pairs: dict[str, Path]
    mmeb: dict[str, Path]
    beir: Path


def write_world(
    root: str | Path, *, seed: int = 0, n_documents: int = 512, n_pairs_per_task: int = 512, n_eval_queries: int = 100
) -> World:
    root = Path(root)
    return World(
        documents=write_documents(make_documents(n_documents, seed), root / "cpt" / "documents", "dataset"),
        pairs=write_pairs(make_pairs(n_pairs_per_task, seed), root / "cl", seed),
        mmeb=write_mmeb(root / "eval" / "mmeb", n_eval_queries, seed),
        beir=write_beir(root / "eval" / "beir" / "SynPages", n_eval_queries, seed),
    )
