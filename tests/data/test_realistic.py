"""The realistic benchmark pool draws the reference data's shapes: pages at the 1,024-token cap, photos at ~300-500
tokens, no image under 256 tokens, labels and captions of a few tokens, no sample over max_len 1280, the seven
stage-1 sources and the 30 stage-2 subsets mixed; deterministic by seed."""

import random
import statistics
from collections import Counter

import pytest

from moca_fast.data.images import image_size
from moca_fast.data.pairs import PairDataset
from moca_fast.data.processor import Processor
from moca_fast.data.realistic import (
    IMAGE_KINDS,
    MAX_LENGTH,
    STAGE1_SOURCES,
    STAGE2_SUBSETS,
    image_tokens,
    realistic_documents,
    realistic_pair_rows,
    stored_size,
)

CAP = 1024
PAGE_KINDS = ("page", "slide", "infographic")


@pytest.fixture(scope="module")
def reference_processor(tokenizer):
    return Processor(tokenizer, min_pixels=256 * 28 * 28, max_pixels=CAP * 28 * 28, max_length=MAX_LENGTH)


def _tokens(kind: str, n: int = 600) -> list[int]:
    rng = random.Random(kind)
    return [image_tokens(stored_size(kind, rng)) for _ in range(n)]


def test_image_sizes_follow_their_kinds():
    for kind in IMAGE_KINDS:
        tokens = _tokens(kind)
        assert 256 <= min(tokens) and max(tokens) <= CAP, kind  # min_pixels / max_pixels at the reference budget
    for kind in PAGE_KINDS:  # at the cap, up to smart_resize's rounding down to whole 28-px blocks
        assert min(_tokens(kind)) >= 0.9 * CAP, kind
    for kind in ("coco", "news"):
        assert 300 <= statistics.median(_tokens(kind)) <= 500, kind
    assert statistics.median(_tokens("small_photo")) < 300  # ImageNet / VOC: raised to the minimum
    web = _tokens("web")
    assert 0.1 < sum(t >= 0.9 * CAP for t in web) / len(web) < 0.5  # web images: some at the cap, most below


def test_documents_have_the_sources_shapes(reference_processor):
    documents = realistic_documents(140, seed=0)
    assert [d.text for d in documents] == [d.text for d in realistic_documents(140, seed=0)]
    assert [d.images for d in documents[:5]] == [d.images for d in realistic_documents(5, seed=0)]
    assert [d.text for d in documents] != [d.text for d in realistic_documents(140, seed=1)]
    sources = Counter(d.id.rsplit("-", 1)[0] for d in documents)
    assert set(sources) == {s.name for s in STAGE1_SOURCES}
    assert max(sources.values()) < 3 * min(sources.values())  # equal shares, up to sampling
    sizes = {
        d.id: reference_processor.measure(d.text, [image_size(im, d.id) for im in d.images], d.id) for d in documents
    }
    assert all(s.tokens <= MAX_LENGTH for s in sizes.values())
    uncut = [d for d in documents if sizes[d.id].images == len(d.images)]
    assert len(uncut) == len(documents)  # every image fits whole: none is dropped by max_len
    pages = [sizes[d.id].image_tokens for d in documents if d.id.startswith(("Docmatix", "VisRAG", "ColPali"))]
    assert sum(t >= 0.9 * CAP for t in pages) / len(pages) > 0.8  # document sources: pages at the cap
    dclm = [sizes[d.id].tokens for d in documents if d.id.startswith("DCLM")]
    assert all(sizes[d.id].images == 0 for d in documents if d.id.startswith("DCLM"))
    assert statistics.median(dclm) > 400 and max(dclm) == MAX_LENGTH  # long web text, cut at max_len


def test_pairs_mix_the_30_subsets_with_their_lengths(tmp_path, tokenizer, reference_processor):
    assert len(STAGE2_SUBSETS) == 30
    rows = realistic_pair_rows(90, tmp_path, seed=0)
    assert sum(map(len, rows.values())) == 90 and len(rows) > 20  # 90 draws over 30 equal shares
    dataset = PairDataset(rows, image_dir=tmp_path)  # the reference columns, every image present
    assert len(dataset) == 90

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    for name, subset_rows in rows.items():
        query, positive = STAGE2_SUBSETS[name]
        for row in subset_rows:
            assert bool(row["qry_image_path"]) == (query.kind is not None)
            assert bool(row["pos_image_path"]) == (positive.kind is not None)
            if positive.kind is None and positive.prompt == "{}":  # labels, answers, captions: plain text
                assert positive.text.lo <= tokens(row["pos_text"]) <= positive.text.hi + 1, (name, row["pos_text"])
    labels = [tokens(r["pos_text"]) for name in ("ImageNet_1K", "SUN397", "VOC2007") for r in rows.get(name, [])]
    captions = [tokens(r["pos_text"]) for r in rows.get("MSCOCO_i2t", []) + rows.get("VisualNews_i2t", [])]
    assert all(1 <= n <= 5 for n in labels) and all(6 <= n <= 61 for n in captions)
