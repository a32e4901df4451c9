"""The mteb wrapper: prompts by role and task type, one batch at a time, and mteb itself (the real package, offline)
running it on two local tasks built from the synthetic world, with the scores of our own harness."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from moca_fast import prompts
from moca_fast.eval.metrics import ndcg_at_k
from moca_fast.eval.mteb import MtebEncoder
from moca_fast.eval.vidore import evaluate_vidore


def test_batches_get_the_reference_prompts_by_role_and_task(embedder):
    a, b = Image.new("RGB", (60, 80), "red"), Image.new("RGB", (90, 50), "blue")
    encoder = MtebEncoder(embedder)
    pages = SimpleNamespace(name="Vidore2X", type="DocumentUnderstanding")
    other = SimpleNamespace(name="Any", type="Any2AnyRetrieval")
    queries = encoder.encode(
        [{"text": ["a question", "plain"], "image": [a, None]}, {"image": [b]}],
        task_metadata=pages,
        prompt_type="query",
    )
    np.testing.assert_allclose(
        queries,
        embedder.encode([prompts.image_question_query(a, "a question"), "plain", prompts.image_target(b)]),
        atol=1e-6,
    )
    documents = encoder.encode([{"image": [a, b]}], task_metadata=pages, prompt_type="document")
    np.testing.assert_allclose(
        documents, embedder.encode([prompts.document_page(a), prompts.document_page(b)]), atol=1e-6
    )
    targets = encoder.encode(
        [{"image": [b], "text": [""]}, {"text": ["a caption"]}], task_metadata=other, prompt_type="document"
    )
    np.testing.assert_allclose(targets, embedder.encode([prompts.image_target(b), "a caption"]), atol=1e-6)


def test_batches_are_embedded_as_they_come(embedder, monkeypatch):
    """mteb's loader yields decoded images: each batch is embedded before the next is read, never all at once."""
    seen = []

    def batches():
        for k in range(3):
            assert len(seen) == k  # the previous batch was embedded before this one is read
            yield {"text": [f"text {k}", f"more {k}"]}

    real = embedder.encode
    monkeypatch.setattr(embedder, "encode", lambda items, **kw: seen.append(len(items)) or real(items, **kw))
    out = MtebEncoder(embedder).encode(batches(), task_metadata=SimpleNamespace(type="Retrieval"))
    assert seen == [2, 2, 2] and out.shape == (6, embedder.dim)


def test_similarities_are_cosines():
    encoder = MtebEncoder.__new__(MtebEncoder)
    x, y = np.array([[3.0, 4.0], [1.0, 0.0]]), np.array([[0.0, 2.0], [1.0, 1.0]])
    np.testing.assert_allclose(encoder.similarity(x, y), [[0.8, 0.7 * 2**0.5], [0.0, 2**-0.5]], atol=1e-6)
    np.testing.assert_allclose(encoder.similarity_pairwise(x, y), [0.8, 2**-0.5], atol=1e-6)


# ------------------------------------------------------------------------------------------- mteb itself


def _local_task(name: str, task_type: str, category: str, split_data):
    """An mteb retrieval task whose data is `split_data` (no hub)."""
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    metadata = TaskMetadata(
        name=name,
        type=task_type,
        category=category,
        main_score="ndcg_at_5",
        modalities=["image", "text"],
        description="moca_fast's synthetic world",
        reference="https://github.com/embeddings-benchmark/mteb",
        dataset={"path": "NA", "revision": "NA"},
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        date=("2026-01-01", "2026-01-01"),
        dialect=[],
        domains=[],
        task_subtypes=[],
        license="cc-by-4.0",
        annotations_creators="derived",
        sample_creation="created",
        bibtex_citation="",
    )

    class LocalTask(AbsTaskRetrieval):
        def load_data(self, num_proc=None, **kwargs):
            self.dataset = {"default": {"test": split_data}}
            self.data_loaded = True

    LocalTask.metadata = metadata
    return LocalTask()


def _pages_task(beir):
    """The synthetic world's BEIR page retrieval as mteb's document-understanding task (ViDoRe's type)."""
    from datasets import Dataset

    corpus = [json.loads(line) for line in (beir / "corpus.jsonl").read_text().splitlines()]
    queries = [json.loads(line) for line in (beir / "queries.jsonl").read_text().splitlines()]
    qrels = [line.split("\t") for line in (beir / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    return _local_task(
        "SynPagesMteb",
        "DocumentUnderstanding",
        "t2i",
        dict(
            corpus=Dataset.from_dict(
                {
                    "id": [c["_id"] for c in corpus],
                    "image": [Image.open(beir / c["image"]).convert("RGB") for c in corpus],
                }
            ),
            queries=Dataset.from_dict({"id": [q["_id"] for q in queries], "text": [q["text"] for q in queries]}),
            relevant_docs={q: {d: int(s)} for q, d, s in qrels},
            top_ranked=None,
        ),
    )


def _scene_question_task(n: int = 5):
    """Any-to-any retrieval: an image with a question about it -> the caption (text) of its scene."""
    import random

    from datasets import Dataset

    from moca_fast.data.synthetic import random_scene, render

    rng = random.Random(3)
    scenes = []
    while len(scenes) < n:
        scene = random_scene(rng)
        if scene.caption not in [s.caption for s in scenes]:
            scenes.append(scene)
    images = [render(scene, k) for k, scene in enumerate(scenes)]
    question = "What does the image show?"
    split = dict(
        queries=Dataset.from_dict({"id": [f"q{k}" for k in range(n)], "image": images, "text": [question] * n}),
        corpus=Dataset.from_dict({"id": [f"d{k}" for k in range(n)], "text": [s.caption for s in scenes]}),
        relevant_docs={f"q{k}": {f"d{k}": 1} for k in range(n)},
        top_ranked=None,
    )
    ours = dict(
        queries=[prompts.image_question_query(image, question) for image in images],
        corpus=[s.caption for s in scenes],
        relevance=np.eye(n, dtype=np.float32),
    )
    return _local_task("SynSceneQuestionsMteb", "Any2AnyRetrieval", "it2t", split), ours


def test_mteb_runs_the_wrapper_on_image_and_text_tasks_with_our_scores(embedder, beir_data, checkpoint, tmp_path):
    mteb = pytest.importorskip("mteb")
    from moca_fast.eval.mteb import model_meta
    from tests.eval.tiny import SMALL_PIXELS

    meta = model_meta(checkpoint, name="local/tiny-moca", **SMALL_PIXELS)
    assert meta.modalities == ["image", "text"] and meta.embed_dim == embedder.dim
    model = meta.load_model(device="cpu")  # the README's path: mteb checks its own image extra (torchvision) first
    scenes, ours = _scene_question_task()
    results = mteb.evaluate(model, [_pages_task(beir_data), scenes], cache=None, show_progress_bar=False)
    scores = {r.task_name: r.scores["test"][0] for r in results.task_results}

    vidore = evaluate_vidore(embedder, beir_data)["datasets"]["SynPages"]  # our own harness, same checkpoint
    assert scores["SynPagesMteb"]["ndcg_at_5"] * 100 == pytest.approx(vidore["ndcg@5"], abs=1e-3)
    assert scores["SynPagesMteb"]["ndcg_at_10"] * 100 == pytest.approx(vidore["ndcg@10"], abs=1e-3)
    similarity = embedder.encode(ours["queries"]) @ embedder.encode(ours["corpus"]).T
    expected = ndcg_at_k(similarity, ours["relevance"], 5).mean()
    assert scores["SynSceneQuestionsMteb"]["ndcg_at_5"] == pytest.approx(expected, abs=1e-5)


def test_a_directly_built_wrapper_runs_image_tasks(embedder, beir_data):
    """`MtebEncoder(embedder)` carries its own mteb meta (image and text), so mteb runs image tasks through it."""
    mteb = pytest.importorskip("mteb")
    encoder = MtebEncoder(embedder)
    meta = encoder.mteb_model_meta
    assert meta.modalities == ["image", "text"] and meta.embed_dim == embedder.dim
    assert meta.similarity_fn_name == "cosine" and meta.use_instructions
    scenes, ours = _scene_question_task()
    results = mteb.evaluate(encoder, [_pages_task(beir_data), scenes], cache=None, show_progress_bar=False)
    scores = {r.task_name: r.scores["test"][0] for r in results.task_results}
    vidore = evaluate_vidore(embedder, beir_data)["datasets"]["SynPages"]
    assert scores["SynPagesMteb"]["ndcg_at_5"] * 100 == pytest.approx(vidore["ndcg@5"], abs=1e-3)
    similarity = embedder.encode(ours["queries"]) @ embedder.encode(ours["corpus"]).T
    assert scores["SynSceneQuestionsMteb"]["ndcg_at_5"] == pytest.approx(
        ndcg_at_k(similarity, ours["relevance"], 5).mean(), abs=1e-5
    )
