"""Real-scene protocols (grew, gait3d, real-scene), rank-k / mAP / mINP on hand-built cases with
known answers, the cross-view gallery, k-reciprocal re-ranking against a plain twin, and the
GREW / HID submission files."""
import csv
import json
import math

import numpy as np
import pytest
import torch

from fastgait.evaluation import (
    evaluate, grew_submission, hid_submission, k_reciprocal_rerank, rank_metrics, summary, to_csv, to_markdown,
    write_report,
)
from fastgait.engine.evaluation import combined_table


def test_rank_metrics_by_hand():
    gallery = np.array(["A", "B", "A", "C", "B"])
    probes = np.array(["A", "B", "C", "D"])
    dist = np.array([
        [0.5, 0.1, 0.9, 0.3, 0.2],  # B B C A A: first hit at rank 4; AP (1/4 + 2/5) / 2; INP 2/5
        [0.2, 0.1, 0.3, 0.4, 0.5],  # B A A C B: hit at 1; AP (1 + 2/5) / 2; INP 2/5
        [0.3, 0.2, 0.1, 0.05, 0.9],  # C first: AP 1, INP 1
        [0.1, 0.2, 0.3, 0.4, 0.5],  # D: not in the gallery
    ])
    r = rank_metrics(dist, probes, gallery, ranks=(1, 2, 3, 4, 5, 10, 20))
    assert r["rank-1"] == pytest.approx(200 / 3) and r["rank-2"] == pytest.approx(200 / 3)
    assert r["rank-3"] == pytest.approx(200 / 3) and r["rank-4"] == 100 and r["rank-5"] == 100
    assert r["rank-10"] == 100 and r["rank-20"] == 100  # ranks beyond the gallery: scored at its size
    assert r["mAP"] == pytest.approx(100 * (0.325 + 0.7 + 1) / 3)
    assert r["mINP"] == pytest.approx(100 * (0.4 + 0.4 + 1) / 3)
    assert (r["probes"], r["gallery"], r["probes_without_gallery"]) == (4, 5, 1)
    torch_r = rank_metrics(torch.from_numpy(dist), probes, gallery, ranks=(1, 2, 3, 4, 5, 10, 20))
    assert torch_r == r


def test_rank_metrics_ties_keep_gallery_order_and_no_match_is_nan():
    r = rank_metrics(np.zeros((1, 3)), np.array([1]), np.array([0, 1, 1]))
    assert r["rank-1"] == 0 and r["mAP"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2) and r["mINP"] == pytest.approx(200 / 3)
    r = rank_metrics(np.zeros((2, 2)), np.array([5, 6]), np.array([0, 1]))
    assert math.isnan(r["rank-1"]) and math.isnan(r["mAP"]) and r["probes_without_gallery"] == 2


def test_rank_metrics_match_a_plain_loop_on_random_data():
    rng = np.random.default_rng(0)
    for _ in range(5):
        dist = rng.random((13, 29))
        probes, gallery = rng.integers(0, 9, 13), rng.integers(0, 7, 29)
        r = rank_metrics(dist, probes, gallery)
        cmc, aps, inps = np.zeros(29), [], []
        for i in range(13):
            order = sorted(range(29), key=lambda j: (dist[i, j], j))
            matches = [gallery[j] == probes[i] for j in order]
            if not any(matches):
                continue
            first = matches.index(True)
            cmc[first:] += 1
            hits, ap = 0, 0.0
            for rank, m in enumerate(matches, 1):
                if m:
                    hits += 1
                    ap += hits / rank
            aps.append(ap / hits)
            last = max(k for k, m in enumerate(matches) if m)
            inps.append(hits / (last + 1))
        n = len(aps)
        for k in (1, 5, 10, 20):
            assert r[f"rank-{k}"] == pytest.approx(100 * cmc[k - 1] / n)
        assert r["mAP"] == pytest.approx(100 * np.mean(aps)) and r["mINP"] == pytest.approx(100 * np.mean(inps))


# One gallery on a line (one-part 1-D embeddings: the Euclidean distance is |x - y|).
GALLERY = [("0001", 0.0), ("0002", 2.0), ("0001", 5.0), ("0003", 9.0)]
PROBES = [("0001", 1.8), ("0003", 8.0), ("0004", 4.0)]
# p0: 0002 0001 0001 0003 -> miss, AP (1/2 + 2/3)/2, INP 2/3; p1: hit, AP 1, INP 1; p2: no gallery
EXPECTED = {"rank-1": 50.0, "rank-5": 100.0, "rank-10": 100.0, "rank-20": 100.0,
            "mAP": 100 * (7 / 12 + 1) / 2, "mINP": 100 * (2 / 3 + 1) / 2}


def line_case(metric="euc", parts=1):
    """Embeddings [n, c, parts] for the case above; 'cos': unit vectors at 10 degrees per unit (same order)."""
    items = [(s, x, "gallery") for s, x in GALLERY] + [(s, x, "probe") for s, x in PROBES]
    if metric == "cos":
        angle = np.radians([10 * x for _, x, _ in items])
        vectors = np.stack([np.cos(angle), np.sin(angle)], 1)
    else:
        vectors = np.array([[x] for _, x, _ in items])
    embeddings = np.repeat(vectors[:, :, None], parts, axis=2).astype(np.float32)
    subjects = [s for s, _, _ in items]
    roles = [r for _, _, r in items]
    return embeddings, subjects, roles


def check(result, n_probes=3):
    for key, value in EXPECTED.items():
        assert result[key] == pytest.approx(value, abs=1e-4), key
    assert (result["probes"], result["gallery"], result["probes_without_gallery"]) == (n_probes, 4, 1)


@pytest.mark.parametrize("metric", ["euc", "cos"])
@pytest.mark.parametrize("parts", [1, 3])
def test_gait3d_probe_keys_list_and_json(tmp_path, metric, parts):
    embeddings, subjects, roles = line_case(metric, parts)
    types = [f"camid{i % 2}_videoid{i}" for i in range(len(subjects))]
    views = [f"seq{i}" for i in range(len(subjects))]
    keys = [f"{s}-{t}-{v}" for s, t, v, r in zip(subjects, types, views, roles) if r == "probe"]
    with pytest.warns(UserWarning, match="1 of 3 probes have no sequence of their subject in the gallery"):
        result = evaluate(embeddings, subjects, types, views, protocol="gait3d", metric=metric, probe=keys)
    check(result)
    assert result["protocol"] == "gait3d" and result["metric"] == metric and not result["reranked"]
    with pytest.warns(UserWarning):
        assert evaluate(embeddings, subjects, types, views, protocol="auto", metric=metric, probe=keys)["protocol"] == "gait3d"
    (tmp_path / "Gait3D.json").write_text(json.dumps({"TRAIN_SET": [], "TEST_SET": [], "PROBE_SET": keys}))
    (tmp_path / "probe.json").write_text(json.dumps(keys))
    for source in (tmp_path / "Gait3D.json", str(tmp_path / "probe.json")):
        with pytest.warns(UserWarning):
            check(evaluate(embeddings, subjects, types, views, protocol="gait3d", metric=metric, probe=source))


def test_real_scene_mask_and_grew_types():
    embeddings, subjects, roles = line_case()
    mask = np.array([r == "probe" for r in roles])
    with pytest.warns(UserWarning):
        check(evaluate(embeddings, subjects, ["x"] * 7, ["v"] * 7, protocol="real-scene", probe=mask))
    types = ["01", "02", "02", "01", "03", "03", "03"]
    with pytest.warns(UserWarning):
        check(evaluate(embeddings, subjects, types, ["v"] * 7, protocol="grew"))
    with pytest.warns(UserWarning):
        check(evaluate(embeddings, subjects, types, ["v"] * 7, protocol="auto"))  # 01/02/03: grew
    # the probe types of a real-scene set may be given instead of a mask
    with pytest.warns(UserWarning):
        check(evaluate(embeddings, subjects, types, ["v"] * 7, protocol="real-scene", probe=["03"]))


def test_real_scene_errors_are_clear():
    embeddings, subjects, roles = line_case()
    types, views = ["t"] * 7, ["v"] * 7
    with pytest.raises(ValueError, match="needs its probe set"):
        evaluate(embeddings, subjects, types, views, protocol="gait3d")
    with pytest.raises(ValueError, match=r"none of the 1 probe keys.*e.g. 0001-t-v"):
        evaluate(embeddings, subjects, types, views, protocol="gait3d", probe=["9-9-9"])
    with pytest.raises(ValueError, match="no gallery sequences"):
        evaluate(embeddings, subjects, types, views, protocol="real-scene", probe=np.ones(7, bool))
    with pytest.raises(ValueError, match="no probe sequences"):
        evaluate(embeddings, subjects, ["01"] * 7, views, protocol="grew")
    with pytest.raises(ValueError, match="one boolean per sequence"):
        evaluate(embeddings, subjects, types, views, protocol="real-scene", probe=np.ones(3, bool))
    with pytest.raises(ValueError, match="protocol must be one of casia-b, oumvlp, grew, gait3d, real-scene"):
        evaluate(embeddings, subjects, types, views, protocol="hid")
    with pytest.raises(ValueError, match="re-ranking applies to the real-scene"):
        evaluate(embeddings, subjects, ["nm-01"] * 7, views, protocol="casia-b", rerank=True)


def test_casia_b_probes_without_gallery_are_counted_and_no_gallery_is_an_error():
    # subject 1 has no gallery sequence in view 090: its probe from 000 cannot be matched there
    rows = [(0, "nm-01", "000", 0.0), (0, "nm-01", "090", 0.0), (1, "nm-01", "000", 5.0),
            (0, "nm-05", "000", 0.1), (1, "nm-05", "000", 5.1), (0, "nm-05", "090", 0.1), (1, "nm-05", "090", 4.9)]
    labels, types, views, x = zip(*rows)
    embeddings = np.array(x, np.float32)[:, None, None]
    with pytest.warns(UserWarning, match=r"1 of 4 \(probe, gallery view\) pairs have no sequence"):
        result = evaluate(embeddings, labels, types, views, protocol="casia-b")
    assert result["NM"]["probes_without_gallery"] == 1
    assert result["NM"]["matrix"][0, 1] == 50.0  # the unmatched probe counts as a miss
    with pytest.raises(ValueError, match=r"no gallery sequences \(types \['nm-01', 'nm-02', 'nm-03', 'nm-04'\]\)"):
        evaluate(embeddings, labels, ["nm-05"] * 7, views, protocol="casia-b")
    with pytest.raises(ValueError, match=r"no gallery sequences \(types \['01'\]\)"):
        evaluate(embeddings, labels, ["00"] * 7, views, protocol="oumvlp")


def test_cross_view_gallery_by_hand():
    rows = [  # subject, type, view, position
        ("A", "nm-02", "000", 0.0),  # the probe's own subject and view: left out for A@000
        ("B", "nm-02", "000", 1.0), ("A", "nm-02", "090", 2.0), ("B", "nm-02", "090", 5.0),
        ("A", "nm-01", "000", 0.0),  # -> B@000 (1), A@090 (2), B@090: miss, AP 1/2
        ("B", "nm-01", "090", 1.2),  # -> B@000 (0.2) first: hit, AP 1 (B@090 left out)
    ]
    labels, types, views, x = zip(*rows)
    result = evaluate(np.array(x, np.float32)[:, None, None], labels, types, views, protocol="casia-b",
                      cross_view_gallery=True)
    assert list(result) == ["NM"]
    nm = result["NM"]
    np.testing.assert_allclose(nm["per_view"], [0.0, 100.0])
    np.testing.assert_allclose(nm["per_view_mAP"], [50.0, 100.0])
    assert nm["mean"] == 50.0 and nm["mAP"] == 75.0 and nm["matrix"] is None and nm["gallery"] == "cross-view"
    assert "| NM | 0.0 | 100.0 | 50.0 |" in to_markdown(result)


def plain_rerank(dist, n_probe, k1, k2, lam):
    """A loop-by-loop twin of the paper's algorithm (sets and explicit sums), for comparison."""
    n = dist.shape[0]
    d = (dist / dist.max(0)).T
    ranking = [sorted(range(n), key=lambda j: (d[i, j], j)) for i in range(n)]

    def reciprocal(i, k):
        return [j for j in ranking[i][: k + 1] if i in ranking[j][: k + 1]]

    V = np.zeros((n, n))
    for i in range(n):
        R = reciprocal(i, k1)
        expanded = set(R)
        for j in R:
            candidate = reciprocal(j, int(round(k1 / 2)))
            if len(set(candidate) & set(R)) > 2 / 3 * len(candidate):
                expanded |= set(candidate)
        expanded = sorted(expanded)
        w = np.exp(-d[i, expanded])
        V[i, expanded] = w / w.sum()
    if k2 > 1:
        V = np.stack([V[ranking[i][:k2]].mean(0) for i in range(n)])
    out = np.zeros((n_probe, n - n_probe))
    for i in range(n_probe):
        for j in range(n_probe, n):
            jaccard = 1 - np.minimum(V[i], V[j]).sum() / np.maximum(V[i], V[j]).sum()
            out[i, j - n_probe] = (1 - lam) * jaccard + lam * d[i, j]
    return out


@pytest.mark.parametrize("seed, k1, k2, lam", [(0, 20, 6, 0.3), (1, 4, 1, 0.5), (2, 6, 6, 0.0), (3, 3, 2, 0.3)])
def test_rerank_matches_the_plain_twin(seed, k1, k2, lam):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(23, 5))
    dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.testing.assert_allclose(k_reciprocal_rerank(dist, 7, k1, k2, lam), plain_rerank(dist, 7, k1, k2, lam),
                               atol=1e-12)


def test_rerank_lambda_one_is_the_normalised_distance_and_it_fixes_a_hard_case():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(15, 3))
    dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.testing.assert_allclose(k_reciprocal_rerank(dist, 5, lambda_value=1.0), (dist / dist.max(0)).T[:5, 5:])
    with pytest.raises(ValueError, match="square"):
        k_reciprocal_rerank(dist[:5], 5)
    # two tight gallery clusters; the probe lies slightly nearer cluster B's outlier than cluster A
    pts = {"probe": [0.0], "A": [-1.0, -1.1, -1.2, -1.05], "B_outlier": [0.9], "B": [3.0, 3.1, 3.2]}
    items = [("probe", 0.0)] + [(k, v) for k in ("A", "B_outlier", "B") for v in pts[k]]
    pos = np.array([v for _, v in items])
    labels = np.array(["A"] + ["A"] * 4 + ["B"] * 4)
    embeddings = pos[:, None, None].astype(np.float32)
    mask = np.zeros(len(items), bool)
    mask[0] = True
    plain = evaluate(embeddings, labels, ["t"] * 9, ["v"] * 9, protocol="real-scene", probe=mask)
    reranked = evaluate(embeddings, labels, ["t"] * 9, ["v"] * 9, protocol="real-scene", probe=mask,
                        rerank={"k1": 4, "k2": 1, "lambda_value": 0.3})
    assert plain["rank-1"] == 0.0 and reranked["rank-1"] == 100.0 and reranked["reranked"]


def test_grew_submission_file(tmp_path):
    embeddings, subjects, _ = line_case()
    types = ["01", "02", "02", "01", "03", "03", "03"]
    subjects = ["00001", "00002", "00001", "00003", "probe", "probe", "probe"]
    views = ["a", "b", "c", "d", "vid_9", "vid_7", "vid_8"]
    path = grew_submission(embeddings, subjects, types, views, tmp_path / "eval" / "grew.csv")
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["videoId"] + [f"rank{k}" for k in range(1, 5)]  # the gallery holds only 4 sequences
    # probe at 1.8: 2 (00002), 0 (00001), 5 (00001), 9 (00003); ids written as integers, as OpenGait
    assert rows[1] == ["vid_9", "2", "1", "1", "3"] and rows[2] == ["vid_7", "3", "1", "2", "1"]
    assert len(rows) == 4


def test_hid_submission_file(tmp_path):
    embeddings, _, _ = line_case()
    subjects = ["0001", "0002", "0001", "0003", "probe", "probe", "probe"]
    views = ["g0", "g1", "g2", "g3", "v1", "v2", "v3"]
    path = hid_submission(embeddings, subjects, views, tmp_path / "hid.csv", rerank=False)
    assert path.read_text().splitlines() == ["videoID,label", "v1,0002", "v2,0003", "v3,0001"]
    reranked = hid_submission(embeddings, subjects, views, tmp_path / "hid2.csv")
    assert reranked.read_text().splitlines()[0] == "videoID,label" and len(reranked.read_text().splitlines()) == 4


def test_rendering_real_scene(tmp_path):
    embeddings, subjects, roles = line_case()
    with pytest.warns(UserWarning):
        result = evaluate(embeddings, subjects, ["t"] * 7, ["v"] * 7, protocol="real-scene",
                          probe=np.array([r == "probe" for r in roles]))
    table = to_markdown(result)
    assert "| rank-1 | rank-5 | rank-10 | rank-20 | mAP | mINP |" in table and "| real-scene | 50.0 | 100.0 |" in table
    assert to_csv(result).splitlines()[1].startswith("real-scene,50.00,100.00,100.00,100.00,79.17,83.33,3,1,4")
    assert summary(result) == "rank-1 50.0 | rank-5 100.0 | mAP 79.2 | mINP 83.3"
    paths = write_report(result, tmp_path / "eval", stem="scores")
    assert set(paths) == {"md", "csv", "json"}
    saved = json.loads(paths["json"].read_text())
    assert saved["mINP"] == pytest.approx(EXPECTED["mINP"]) and saved["probes_without_gallery"] == 1
    assert "1 probes without a sequence of their subject in the gallery" in paths["md"].read_text()
    combined = combined_table(result, result)
    assert "| model | 50.0 |" in combined and "| GEI+NN | 50.0 |" in combined


def test_chunked_scoring_equals_one_pass(monkeypatch):
    from fastgait.evaluation import ranking

    rng = np.random.default_rng(5)
    dist, probes, gallery = rng.random((50, 37)), rng.integers(0, 9, 50), rng.integers(0, 7, 37)
    whole, top = ranking.rank_metrics(dist, probes, gallery), ranking.top_k(dist, 20)
    monkeypatch.setattr(ranking, "CHUNK", 7)
    chunked = ranking.rank_metrics(dist, probes, gallery)
    assert chunked.keys() == whole.keys() and all(chunked[k] == pytest.approx(whole[k]) for k in whole)
    np.testing.assert_array_equal(ranking.top_k(dist, 20), top)
